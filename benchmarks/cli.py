"""``cxr-bench``: latency, LIME cost and fidelity, serve load, the OOD gate, ablation tables and reports.

The one-question research scripts are not here: they live in ``research/`` (see its README)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from cxr.runtime.cli_options import (
    DEFAULT_MAX_BATCH,
    DEFAULT_QUEUE_DELAY_US,
    BackendName,
    Instances,
    MaxBatch,
    QueueDelayUs,
)
from cxr.runtime.cli_util import new_app, parse_int_list, run_app
from typing_extensions import Annotated

app = new_app("Benchmarks: per-image latency, throughput and LIME cost; serve load; OOD gate; reports.")


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
    from cxr.bench.latency import format_latency, run_latency

    wanted = [b.strip() for b in backends.split(",")] if backends else None
    results = run_latency(
        model,
        out,
        wanted,
        parse_int_list(batch_sizes, "--batch-sizes"),
        warmup_s,
        duration_s,
        interleave=interleave,
    )
    print(format_latency(results))


# --fidelity and its own options: --samples auto against the fixed --samples budget
Fidelity = Annotated[
    bool,
    typer.Option(
        "--fidelity",
        help="Instead: --samples auto against the --samples budget "
        "(top-5 overlap, rank correlation, deletion curve, compute saved).",
    ),
]
Repeatability = Annotated[
    int,
    typer.Option(
        "--repeatability",
        help="With --fidelity: for the first N images also draw a second fixed-budget map with seed + 1, "
        "to show how far the reference itself moves with the seed.",
    ),
]
Sampler = Annotated[
    str, typer.Option(help="With --fidelity: the rows of --samples auto, paired (its default) or plain.")
]
SettleAgreement = Annotated[
    float,
    typer.Option(help="With --fidelity: --samples auto's --settle-agreement (0-1; 0, the default, is off)."),
]


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
    backend: BackendName = "auto",  # ours, and stock lime's classifier
    peer: str = typer.Option(
        "stock", help="Comma-separated peers: stock (lime), captum (Captum Lime on PyTorch), none."
    ),
    fidelity: Fidelity = False,
    repeatability: Repeatability = 0,
    sampler: Sampler = "paired",
    settle_agreement: SettleAgreement = 0.0,
    out: Path = typer.Option(Path("bench-results"), "--out", help="Folder for lime.json and lime.png."),
) -> None:
    """Seconds per explanation (first image and steady state) for ours per precision, against lime and
    Captum."""
    from cxr.bench.lime_bench import format_lime, run_lime_bench
    from cxr.runtime.bundle import check_precision
    from cxr.runtime.errors import CxrUsageError
    from cxr.runtime.inputs import expand_inputs

    if count < 1:
        raise CxrUsageError("--count must be at least 1")
    precisions = tuple(check_precision(p.strip()) for p in precision.split(",") if p.strip())
    peers = tuple(p.strip() for p in peer.split(",") if p.strip() and p.strip() != "none")
    paths = expand_inputs(images)[:count] if images else []
    if fidelity:
        rule = _fidelity_rule(precisions, repeatability, sampler, settle_agreement)
        _lime_fidelity(model, out, paths, samples, seed, backend, precisions[0], repeatability, rule)
        return
    sample_sweep = parse_int_list(sweep, "--sweep")
    results = run_lime_bench(
        model, out, paths, samples, seed, segmenter, sample_sweep, precisions, backend, peers
    )
    print(format_lime(results))


def _fidelity_rule(
    precisions: tuple[str, ...], repeatability: int, sampler: str, settle_agreement: float
) -> dict[str, object]:
    """--fidelity's options checked; the stopping rule of its --samples auto."""
    from cxr.runtime.errors import CxrUsageError
    from cxr.runtime.explain import SAMPLERS

    if len(precisions) != 1:
        raise CxrUsageError(f"--fidelity takes one --precision, got {','.join(precisions)!r}")
    if repeatability < 0:
        raise CxrUsageError("--repeatability must be 0 or more")
    if sampler not in SAMPLERS or not 0 <= settle_agreement <= 1:
        raise CxrUsageError(
            f"--sampler must be one of {', '.join(SAMPLERS)} and --settle-agreement within 0-1, got "
            f"{sampler!r} and {settle_agreement}"
        )
    return {"paired": sampler == "paired", "min_agreement": settle_agreement}


def _lime_fidelity(
    model: Path,
    out: Path,
    paths: list[Path],
    samples: int,
    seed: int,
    backend: str,
    precision: str,
    repeatability: int,
    rule: dict[str, object],
) -> None:
    from cxr.bench.lime_fidelity import format_fidelity, run_fidelity

    summary = run_fidelity(
        model, out, paths, samples, seed, backend, precision=precision, repeatability=repeatability, rule=rule
    )
    print(format_fidelity(summary))


@app.command("all")
def run_all(
    model: Path = typer.Option(..., "--model", help="Model bundle folder."),
    image: Optional[Path] = typer.Option(None, help="Image for the LIME benchmark."),
    duration_s: float = typer.Option(5.0, help="Measured seconds per latency backend."),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Output folder."),
) -> None:
    """Latency and LIME, one folder, one summary."""
    from cxr.bench.latency import format_latency, run_latency
    from cxr.bench.lime_bench import format_lime, run_lime_bench

    print(format_latency(run_latency(model, out, None, [1, 8, 32, 64], 1.0, duration_s)))
    print(
        format_lime(run_lime_bench(model, out, [image] if image else [], 1000, 0, "slic", [250, 500, 1000]))
    )


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
    precision: str = typer.Option("fp32", help="fp32, fp16, int8 or bf16 (server and local alike)."),
    protocol: str = typer.Option("http", help="http (through the guarded front) or grpc (Triton directly)."),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Folder for serve_load.json and .png."),
) -> None:
    """Loopback load test of 'cxr-run serve' vs local predict: per client count throughput, p50/p95/p99,
    failed requests, batch sizes formed, equality; the server's peak memory."""
    from cxr.bench.serve_load import PROTOCOLS, LoadOptions, format_serve_load, run_serve_load
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
    print(format_serve_load(run_serve_load(model, data, out, options)))


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
    precision: str = typer.Option(
        "fp32",
        "--precision",
        help="The graph whose features the gate reads (int8: the parts its export kept).",
    ),
) -> None:
    """AUROC and share flagged of the gate per kind of non-chest image (photographs, documents, textures,
    CT/MR/US frames, other anatomy, rotated films) against the run's validation films, and its cost."""
    from cxr.bench.ood import markdown, run_ood
    from cxr.runtime.bundle import check_precision

    print(markdown(run_ood(model, run, data, out, compare, seed, check_precision(precision))), end="")


@app.command()
def pipeline(
    model: Path = typer.Option(..., "--model", help="Model bundle folder."),
    inputs: List[str] = typer.Argument(..., help="Images, folders or globs (mixed sizes make the point)."),
    backend: str = typer.Option("auto", help="The backend for both measurements."),
    precision: str = typer.Option(
        "fp32", help="fp32, fp16, int8 or bf16 (OpenVINO on AVX512-BF16/AMX-BF16 CPUs)."
    ),
    batch_size: int = typer.Option(16, help="Images per backend call, for both."),
    workers: str = typer.Option("1,2", help="Reading-thread counts to measure predict with."),
    limit: Optional[int] = typer.Option(None, help="Use at most this many images."),
    rounds: int = typer.Option(
        1, help="Rounds of predict runs, the backend alone measured between them (a shared host drifts)."
    ),
    out: Path = typer.Option(Path("bench-results/pipeline"), "--out", help="Folder for pipeline.json/.md."),
) -> None:
    """End-to-end img/s of predict on a folder against the backend alone at the same batch, in one run,
    with the time per stage (decode, preprocess, infer, write)."""
    from cxr.bench.pipeline import markdown, run_pipeline

    counts = tuple(parse_int_list(workers, "--workers"))
    report = run_pipeline(model, inputs, out, backend, precision, batch_size, counts, limit, rounds)
    print(markdown(report), end="")


@app.command()
def report(
    results: List[Path] = typer.Argument(..., help="latency_*.json files (e.g. CPU and GPU machine)."),
) -> None:
    """A markdown table comparing result files, with ratios against the PyTorch baseline."""
    from cxr.bench.report import markdown_report

    print(markdown_report(results))


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
