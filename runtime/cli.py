"""``cxr-run``: bedside predictions and LIME explanations from a model bundle (no PyTorch)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer
from cxr.runtime.cli_options import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_PIXELS,
    DEFAULT_QUEUE_DELAY_US,
    PRECISION_HELP,
    AllowUnvalidated,
    BackendName,
    ExpectDigest,
    Instances,
    MaxBatch,
    MaxPixels,
    QueueDelayUs,
    TrustedKey,
)
from cxr.runtime.cli_util import new_app, run_app

app = new_app(
    "Run a cxr-edge model bundle on chest X-rays (PNG, JPEG, DICOM): predictions and LIME maps.",
    log_stream="stderr",
)

EXIT_OK, EXIT_FATAL, EXIT_SOME_FAILED = 0, 1, 2
log = logging.getLogger("cxr.runtime.cli")


@app.command()
def predict(
    inputs: List[str] = typer.Argument(
        ..., help="Image files, folders (searched recursively, files judged by content) or globs."
    ),
    model: Path = typer.Option(..., "--model", help="Model bundle folder (from 'cxr-export onnx')."),
    backend: BackendName = "auto",
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP),
    batch_size: int = typer.Option(16, help="Images per backend call (capped by the engine profile)."),
    server: Optional[str] = typer.Option(
        None,
        "--server",
        help="Send to a 'cxr-run serve' server instead: http://HOST:PORT or grpc://HOST:PORT.",
    ),
    server_model: str = typer.Option("cxr", help="Model name on the server."),
    timeout: float = typer.Option(30.0, help="With --server: seconds to wait for each reply."),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        help="FILE.jsonl or FILE.csv (default: JSON lines on stdout). Records are appended as they finish, "
        "so an interrupted run keeps them; an existing file needs --resume or --overwrite.",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue --out: skip inputs it already records for this bundle."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    top_k: int = typer.Option(0, help="Also list the K most probable classes."),
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    explain: bool = typer.Option(
        False, "--explain", help="Add a LIME explanation and an overlay PNG per image."
    ),
    explain_dir: Optional[Path] = typer.Option(
        None, help="Where overlay PNGs go (default: explanations/ beside --out, or ./explanations)."
    ),
    samples: str = typer.Option(
        "1000", help="LIME samples per image, or 'auto': sample in rounds until the map is settled."
    ),
    max_samples: int = typer.Option(1000, help="With --samples auto: the most samples drawn."),
    settle_agreement: float = typer.Option(
        0.0,
        help="With --samples auto: also wait until, refitted on bootstrap resamples, the five strongest "
        "segments keep at least this share (0-1, e.g. 0.9). On an fp32 explainer 0.9 kept 98 % of the "
        "1000-sample map's top 5 instead of 95 %, for ~3 % more samples; on int8 it mostly adds samples. "
        "Off (0) by default.",
    ),
    sampler: Optional[str] = typer.Option(
        None,
        help="How LIME draws its on/off rows: 'paired' (each row followed by its complement: the same map on "
        "fewer samples) or 'plain' (lime's, the paper's). Default: paired with --samples auto, plain with a "
        "fixed budget.",
    ),
    segmenter: str = typer.Option("slic", help="slic (default) or quickshift (the paper's)."),
    num_features: int = typer.Option(8, help="Segments painted in the overlay."),
    seed: int = typer.Option(0, help="LIME seed: same image + seed + backend -> same weights."),
    workers: Optional[int] = typer.Option(
        None,
        help="Threads reading and preprocessing inputs ahead of the backend (default: one per core; 1: read "
        "on the backend's thread).",
    ),
    strict: bool = typer.Option(
        False,
        "--strict",
        help="Fail inputs with a warning (not a CR/DX radiograph, colour, "
        "near-binary, under 64 px) instead of predicting them.",
    ),
    expect_digest: ExpectDigest = None,
    trusted_key: TrustedKey = None,
    allow_unvalidated: AllowUnvalidated = False,
) -> int:
    """One JSON record per input: path, label, probs, backend, precision, error, warnings (+ explanation).
    Exit 2 if some failed, 1 if the run could not finish, 130/143 when interrupted (records kept)."""
    from cxr.runtime.predict_job import PredictJob, run_predict

    job = PredictJob(
        inputs=inputs,
        model=model,
        backend=backend,
        precision=precision,
        batch_size=batch_size,
        server=server,
        server_model=server_model,
        timeout=timeout,
        out=out,
        resume=resume,
        overwrite=overwrite,
        top_k=top_k,
        max_pixels=max_pixels,
        explain=(
            explain_options(samples, max_samples, segmenter, num_features, seed, settle_agreement, sampler)
            if explain
            else None
        ),
        explain_dir=explain_dir,
        strict=strict,
        workers=workers,
        expect_digest=expect_digest,
        trusted_key=trusted_key,
        allow_unvalidated=allow_unvalidated,
    )
    summary = run_predict(job)
    if summary.failed:
        log.warning(f"warning: {summary.line()}")
    else:
        log.info(summary.line())
    stop = summary.stop_line()
    if stop:
        log.error(f"error: {stop}")
    return summary.exit_code


def explain_options(
    samples: str,
    max_samples: int,
    segmenter: str,
    num_features: int,
    seed: int,
    agreement: float = 0.0,
    sampler: str | None = None,
):
    """--samples N (a fixed budget) or --samples auto (rounds until settled, at most --max-samples, with
    --settle-agreement as the rule's third condition); --sampler paired|plain (default: by --samples)."""
    from cxr.runtime.errors import CxrUsageError
    from cxr.runtime.explain import SAMPLERS, ExplainConfig

    if not 0 <= seed < 2**32:
        raise CxrUsageError(f"--seed must be a whole number from 0 to {2**32 - 1}, got {seed}")
    if sampler is not None and sampler not in SAMPLERS:
        raise CxrUsageError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    paired = None if sampler is None else sampler == "paired"
    if samples.strip().lower() == "auto":
        if not 0 <= agreement <= 1:
            raise CxrUsageError(f"--settle-agreement must be between 0 and 1, got {agreement}")
        return ExplainConfig(
            samples=max_samples,
            segmenter=segmenter,
            num_features=num_features,
            seed=seed,
            adaptive=True,
            min_agreement=agreement,
            paired=paired,
        )
    if agreement:
        raise CxrUsageError("--settle-agreement applies to --samples auto only")
    if not samples.strip().isdigit():
        raise CxrUsageError(f"--samples must be a whole number or 'auto', got {samples!r}")
    return ExplainConfig(
        samples=int(samples), segmenter=segmenter, num_features=num_features, seed=seed, paired=paired
    )


@app.command()
def info(
    model: Path = typer.Option(..., "--model", help="Model bundle folder."),
    expect_digest: ExpectDigest = None,
    trusted_key: TrustedKey = None,
) -> int:
    """The card, file hashes (checked), and what actually runs each graph here (each opened and checked as
    predict opens it). Exit 1 if a file changed or no classifier graph runs here."""
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.bundle_info import bundle_info

    info = bundle_info(Bundle.open(model, expect_digest, trusted_key))
    answers = info.card.get("known_answers", {})  # a page of numbers: one line a file here
    shown = {name: f"{a.get('probe_set')}, by {a.get('computed_by')}" for name, a in answers.items()}
    print(json.dumps({**info.card, "known_answers": shown}, indent=2))
    print(f"\ndigest: {info.digest}  (pin it: --expect-digest {info.digest})")
    print("\nfiles:")
    for file in info.files:
        print(f"  {file.name:<28} {file.digest[:16]}  {file.state}")
    print("\nruns here (--backend auto, opened and checked as predict opens it):")
    for graph in info.graphs:
        if not graph.present:
            print(f"  {graph.precision} {graph.graph:<8} no graph (create it with cxr-export)")
        else:
            print(f"  {graph.precision} {graph.graph:<8} parity {graph.parity:<8} {graph.reason}")
    problem = info.problem()
    if problem:
        log.error(f"error: {problem}")
        return EXIT_FATAL
    return EXIT_OK


@app.command()
def serve(
    model: Path = typer.Option(..., "--model", help="Model bundle folder."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    http_port: int = typer.Option(8000, help="HTTP/REST port (KServe v2 protocol)."),
    grpc_port: int = typer.Option(8001, help="gRPC port."),
    grpc_host: str = typer.Option(
        "127.0.0.1",
        help="Address gRPC listens on. Triton parses gRPC itself (the guarded front covers HTTP only), so it "
        "stays on loopback unless named here.",
    ),
    metrics_port: int = typer.Option(8002, help="Prometheus metrics port (/metrics)."),
    max_batch: MaxBatch = DEFAULT_MAX_BATCH,
    max_queue_delay_us: QueueDelayUs = DEFAULT_QUEUE_DELAY_US,
    max_queue: int = typer.Option(0, help="Reject requests beyond this many queued (0: no limit)."),
    instances: Instances = 1,
    backend: BackendName = "auto",
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    name: str = typer.Option("cxr", help="Model name (also NAME_encoded and NAME_card)."),
    log_file: Optional[Path] = typer.Option(
        None, help="Triton's log (default: cxr-triton-HTTP_PORT.log in the temp folder)."
    ),
    allow_unvalidated: AllowUnvalidated = False,
    expect_digest: ExpectDigest = None,
    trusted_key: TrustedKey = None,
) -> None:
    """Serve the bundle through NVIDIA Triton Inference Server (PyTriton): dynamic batching, health,
    metrics."""
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.serve import ServeOptions, triton_log_file
    from cxr.runtime.serve import serve as run_server

    options = ServeOptions(
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        grpc_host=grpc_host,
        metrics_port=metrics_port,
        max_batch=max_batch,
        max_queue_delay_us=max_queue_delay_us,
        max_queue=max_queue,
        instances=instances,
        backend=backend,
        precision=precision,
        max_pixels=max_pixels,
        name=name,
        log_file=log_file,
        allow_unvalidated=allow_unvalidated,
    )

    def ready(backend_line: str) -> None:
        print(
            f"serving {name} on http://{host}:{http_port} (gRPC {grpc_host}:{grpc_port}, metrics "
            f"http://{host}:{metrics_port}/metrics) with {backend_line}; Triton log: "
            f"{triton_log_file(options)}; "
            "Ctrl+C stops",
            file=sys.stderr,
            flush=True,
        )

    run_server(Bundle.open(model, expect_digest, trusted_key), options, ready)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
