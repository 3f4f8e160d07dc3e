"""``cxr-bench``: latency, LIME cost, reports, and the quick start."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from cxr.runtime.cli_options import (
    DEFAULT_MAX_BATCH,
    DEFAULT_QUEUE_DELAY_US,
    Instances,
    MaxBatch,
    QueueDelayUs,
)
from cxr.runtime.cli_util import new_app, parse_int_list, run_app

app = new_app("Benchmarks: per-image latency, throughput and LIME cost; reports; the quick start.")


@app.command()
def latency(
    model: Path = typer.Option(..., "--model", help="Model bundle folder."),
    backends: Optional[str] = typer.Option(
        None, help="Subset, e.g. pytorch,onnxruntime-fp16,tensorrt (default: all here)."
    ),
    batch_sizes: str = typer.Option("1,8,32,64", help="Batch sizes for throughput."),
    warmup_s: float = typer.Option(1.0, help="Warm-up seconds per backend."),
    duration_s: float = typer.Option(5.0, help="Measured seconds per backend."),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Folder for the JSON and PNG."),
    interleave: bool = typer.Option(
        True,
        "--interleave/--one-at-a-time",
        help="Batch-1 latency in turns across backends (all open at once), so host drift moves all alike "
        "and their ratios hold; or one backend at a time (less memory: one open at a time).",
    ),
) -> None:
    """p50/p95/p99 at batch 1 and img/s per batch size, PyTorch eager as the baseline."""
    from cxr.bench.latency import run_latency

    wanted = [b.strip() for b in backends.split(",")] if backends else None
    run_latency(
        model,
        out,
        wanted,
        parse_int_list(batch_sizes, "--batch-sizes"),
        warmup_s,
        duration_s,
        interleave=interleave,
    )


@app.command()
def lime(
    model: Path = typer.Option(..., "--model", help="Model bundle folder."),
    images: List[str] = typer.Argument(
        None, help="Images, folders or globs to explain (default: a generated phantom)."
    ),
    count: int = typer.Option(
        10, help="Explain at most this many of the images (the first is the cold start)."
    ),
    samples: int = typer.Option(1000, help="LIME samples."),
    seed: int = typer.Option(0, help="Seed."),
    segmenter: str = typer.Option("slic", help="slic or quickshift."),
    sweep: str = typer.Option("250,500,1000", help="Sample counts timed for our explainer (first image)."),
    precision: str = typer.Option(
        "fp32",
        help="Comma-separated precisions of our explainer, e.g. fp16,fp32 (with --fidelity: one, the "
        "precision of --samples auto; the reference map stays fp32).",
    ),
    backend: str = typer.Option(
        "auto", help="auto, tensorrt, onnxruntime or openvino (ours, and stock lime's classifier)."
    ),
    peer: str = typer.Option(
        "stock", help="Comma-separated peers: stock (lime), captum (Captum Lime on PyTorch), none."
    ),
    fidelity: bool = typer.Option(
        False,
        "--fidelity",
        help="Instead: --samples auto against the --samples budget "
        "(top-5 overlap, rank correlation, deletion curve, compute saved).",
    ),
    repeatability: int = typer.Option(
        0,
        "--repeatability",
        help="With --fidelity: for the first N images also draw a second fixed-budget map with seed + 1, "
        "to show how far the reference itself moves with the seed.",
    ),
    sampler: str = typer.Option(
        "paired", help="With --fidelity: the rows of --samples auto, paired (its default) or plain."
    ),
    settle_agreement: float = typer.Option(
        0.0, help="With --fidelity: --samples auto's --settle-agreement (0-1; 0, the default, is off)."
    ),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Folder for lime.json and lime.png."),
) -> None:
    """Seconds per explanation (first image and steady state) for ours per precision, against lime and
    Captum."""
    from cxr.bench.lime_bench import run_lime_bench
    from cxr.runtime.bundle import check_precision
    from cxr.runtime.errors import CxrUsageError
    from cxr.runtime.inputs import expand_inputs

    if count < 1:
        raise CxrUsageError("--count must be at least 1")
    precisions = tuple(check_precision(p.strip()) for p in precision.split(",") if p.strip())
    peers = tuple(p.strip() for p in peer.split(",") if p.strip() and p.strip() != "none")
    paths = expand_inputs(images)[:count] if images else []
    if fidelity:
        from cxr.bench.lime_fidelity import run_fidelity
        from cxr.runtime.explain import SAMPLERS

        if len(precisions) != 1:
            raise CxrUsageError(f"--fidelity takes one --precision, got {precision!r}")
        if repeatability < 0:
            raise CxrUsageError("--repeatability must be 0 or more")
        if sampler not in SAMPLERS or not 0 <= settle_agreement <= 1:
            raise CxrUsageError(
                f"--sampler must be one of {', '.join(SAMPLERS)} and --settle-agreement within 0-1, got "
                f"{sampler!r} and {settle_agreement}"
            )
        rule = {"paired": sampler == "paired", "min_agreement": settle_agreement}
        run_fidelity(
            model,
            out,
            paths,
            samples,
            seed,
            backend,
            precision=precisions[0],
            repeatability=repeatability,
            rule=rule,
        )
        return
    run_lime_bench(
        model,
        out,
        paths,
        samples,
        seed,
        segmenter,
        parse_int_list(sweep, "--sweep"),
        precisions,
        backend,
        peers,
    )


@app.command("all")
def run_all(
    model: Path = typer.Option(..., "--model", help="Model bundle folder."),
    image: Optional[Path] = typer.Option(None, help="Image for the LIME benchmark."),
    duration_s: float = typer.Option(5.0, help="Measured seconds per latency backend."),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Output folder."),
) -> None:
    """Latency and LIME, one folder, one summary."""
    from cxr.bench.latency import run_latency
    from cxr.bench.lime_bench import run_lime_bench

    run_latency(model, out, None, [1, 8, 32, 64], 1.0, duration_s)
    run_lime_bench(model, out, [image] if image else [], 1000, 0, "slic", [250, 500, 1000])


@app.command()
def ablation(
    reports: List[Path] = typer.Argument(
        ..., help="evaluation.json files from 'cxr-train evaluate', one per run."
    ),
    out: Path = typer.Option(Path("clinical.md"), "--out", help="Markdown table (a .json beside it)."),
    title: str = typer.Option("Shortcut-suppression ablation", help="Heading of the table."),
) -> None:
    """One table over several evaluations: accuracy and gain over the shortcut baseline with their intervals,
    viral/bacterial F1, the LIME audit."""
    from cxr.bench.ablation import run_ablation

    print(run_ablation(reports, out, title))


@app.command("serve-load")
def serve_load(
    model: Path = typer.Option(..., "--model", help="Model bundle folder."),
    data: List[str] = typer.Argument(
        ..., help="Images, folders or globs sent by the clients (e.g. the 600 dev images)."
    ),
    clients: str = typer.Option(
        "8,32,64", help="Concurrent clients, one image per request; a comma list runs each count in turn."
    ),
    max_requests: int = typer.Option(2000, help="Stop each client count after this many requests."),
    max_seconds: float = typer.Option(120.0, help="... or after this many seconds."),
    max_batch: MaxBatch = DEFAULT_MAX_BATCH,
    max_queue_delay_us: QueueDelayUs = DEFAULT_QUEUE_DELAY_US,
    instances: Instances = 1,
    precision: str = typer.Option("fp32", help="fp32, fp16 or int8 (server and local alike)."),
    protocol: str = typer.Option("http", help="http (through the guarded front) or grpc (Triton directly)."),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Folder for serve_load.json and .png."),
) -> None:
    """Loopback load test of 'cxr-run serve' vs local predict: per client count throughput, p50/p95/p99,
    failed requests, batch sizes formed, equality; the server's peak memory."""
    from cxr.bench.serve_load import PROTOCOLS, LoadOptions, run_serve_load
    from cxr.runtime.errors import CxrUsageError

    counts = tuple(int(c) for c in clients.split(",") if c.strip().isdigit())
    if len(counts) != len(clients.split(",")) or min(counts, default=0) < 1:
        raise CxrUsageError(f"--clients must be whole numbers of at least 1, e.g. 8,32,64; got {clients!r}")
    if max_requests < 1 or max_seconds <= 0 or protocol not in PROTOCOLS:
        raise CxrUsageError(
            "--max-requests must be at least 1, --max-seconds more than 0, --protocol http or grpc"
        )
    options = LoadOptions(
        clients=counts,
        max_requests=max_requests,
        max_seconds=max_seconds,
        max_batch=max_batch,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        precision=precision,
        protocol=protocol,
    )
    run_serve_load(model, data, out, options)


@app.command()
def ood(
    model: Path = typer.Option(
        ..., "--model", help="Model bundle folder (with its out-of-distribution gate)."
    ),
    run: Path = typer.Option(..., "--run", help="The run the bundle came from (its split.json)."),
    data: Path = typer.Argument(..., help="The data folder the run was trained on."),
    out: Path = typer.Option(Path("bench-results/ood"), "--out", help="Folder for ood.json, ood.md, images."),
    compare: bool = typer.Option(
        False, "--compare", help="Also fit and measure the candidate gates on the run's training films."
    ),
    seed: int = typer.Option(0, help="Seed of the crops and turns of the non-chest images."),
) -> None:
    """AUROC and share flagged of the gate per kind of non-chest image (photographs, documents, textures,
    CT/MR/US frames, other anatomy, rotated films) against the run's validation films, and its cost."""
    from cxr.bench.ood import run_ood

    run_ood(model, run, data, out, compare, seed)


@app.command()
def report(
    results: List[Path] = typer.Argument(..., help="latency_*.json files (e.g. CPU and GPU machine)."),
) -> None:
    """A markdown table comparing result files, with ratios against the PyTorch baseline."""
    from cxr.bench.report import markdown_report

    print(markdown_report(results))


@app.command()
def quickstart(
    out: Path = typer.Option(Path("quickstart"), "--out", help="Folder for data, run, bundle and reports."),
    arch: str = typer.Option("dpn_se_tiny", help="Architecture (small for CPU)."),
    epochs: int = typer.Option(8, help="Epochs."),
) -> int:
    """The whole pipeline on generated phantoms: train, export, (engine), predict + LIME, parity, latency."""
    from cxr.quickstart import run_quickstart

    return run_quickstart(out, arch, epochs)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
