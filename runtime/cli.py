"""``cxr-run``: bedside predictions and LIME explanations from a model bundle (no PyTorch)."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from cxr.runtime.cli_options import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_PIXELS,
    DEFAULT_QUEUE_DELAY_US,
    AllowUnvalidated,
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


@app.command()
def predict(
    inputs: List[str] = typer.Argument(
        ..., help="Image files, folders (searched recursively, files judged by content) or globs."
    ),
    model: Path = typer.Option(..., "--model", help="Model bundle folder (from 'cxr-export onnx')."),
    backend: str = typer.Option(
        "auto", help="auto (engine -> ORT CUDA -> OpenVINO -> ORT CPU), tensorrt, onnxruntime or openvino."
    ),
    precision: Optional[str] = typer.Option(None, help="fp32 (default), fp16 or int8: which graph / engine."),
    batch_size: int = typer.Option(16, help="Images per backend call (capped by the engine profile)."),
    server: Optional[str] = typer.Option(
        None,
        "--server",
        help="Send to a 'cxr-run serve' server instead: http://HOST:PORT or grpc://HOST:PORT.",
    ),
    server_model: str = typer.Option("cxr", help="Model name on the server."),
    timeout: float = typer.Option(30.0, help="With --server: seconds to wait for each reply."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="FILE.jsonl or FILE.csv (default: JSON lines on stdout)."
    ),
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
    """One JSON record per input: path, label, probs, backend, precision, error (+ explanation). Exit 2 if
    some failed."""
    from cxr.runtime.backends.select import check_validated
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.errors import CxrUsageError
    from cxr.runtime.inputs import discover, not_images_line
    from cxr.runtime.output import RecordWriter
    from cxr.runtime.predict import PredictOptions, predict_stream
    from cxr.runtime.segment import SEGMENTERS

    started = time.perf_counter()
    if segmenter not in SEGMENTERS:
        raise CxrUsageError(f"--segmenter must be one of {', '.join(SEGMENTERS)}, got {segmenter!r}")
    if top_k < 0:
        raise CxrUsageError("--top-k must be 0 or more")
    bundle = Bundle.open(model, expect_digest, trusted_key)
    explain_config = (
        explain_options(samples, max_samples, segmenter, num_features, seed, settle_agreement, sampler)
        if explain
        else None
    )
    if explain and explain_dir is None:
        explain_dir = (out.parent if out else Path(".")) / "explanations"
    found = discover(inputs)
    paths = found.inputs
    explainer = None
    if server is not None:
        classifier, reason = _open_server(server, server_model, timeout, bundle, backend, precision, explain)
    else:
        classifier, reason, explainer = _open_local(bundle, backend, precision or "fp32", explain, len(paths))
    classifier_open_s = time.perf_counter() - started
    failed, warned, shown, first_result_s = 0, 0, set(), None
    with classifier:
        try:
            print(f"backend: {reason}", file=sys.stderr)
            caution = check_validated(bundle, classifier, allow_unvalidated) if server is None else None
            if caution:
                print(f"warning: {caution}", file=sys.stderr)
            options = PredictOptions(batch_size, top_k, max_pixels, explain_config, explain_dir, strict)
            with RecordWriter(out, bundle.card.classes) as writer:
                for record in predict_stream(paths, bundle, classifier, options, explainer, found.errors):
                    failed += record["error"] is not None
                    warned += bool(record["warnings"]) and record["error"] is None
                    _warn_once(record, shown)
                    writer.write(record)
                    if first_result_s is None:
                        first_result_s = time.perf_counter() - started
        finally:
            if explainer is not None:
                explainer.close()
    parts = [
        f"{len(paths) - failed} predicted",
        f"{warned} of them with warnings (see their 'warnings')" if warned else "",
        f"{failed} failed (see their 'error')" if failed else "",
        not_images_line(found.not_images) if found.not_images else "",
        f"wrote {out}" if out else "",
        _opening_line(first_result_s, classifier_open_s, explainer.open_s if explainer else None),
    ]
    print("; ".join(p for p in parts if p), file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _opening_line(first_result_s: float | None, classifier_s: float, explainer_s: float | None) -> str:
    """How long the first answer took and what opening cost (the explainer's warm-up overlaps the first
    batch)."""
    if first_result_s is None:
        return ""
    explainer = f", explainer {explainer_s:.1f} s beside it" if explainer_s is not None else ""
    return (
        f"first result {first_result_s:.1f} s after start (classifier open {classifier_s:.1f} s{explainer})"
    )


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

    if sampler is not None and sampler not in SAMPLERS:
        raise CxrUsageError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    paired = None if sampler is None else sampler == "paired"
    if samples.strip().lower() == "auto":
        if not 0 <= agreement <= 1:
            raise CxrUsageError(f"--settle-agreement must be between 0 and 1, got {agreement}")
        return ExplainConfig(
            max_samples,
            segmenter,
            num_features,
            seed,
            adaptive=True,
            min_agreement=agreement,
            paired=paired,
        )
    if agreement:
        raise CxrUsageError("--settle-agreement applies to --samples auto only")
    if not samples.strip().isdigit():
        raise CxrUsageError(f"--samples must be a whole number or 'auto', got {samples!r}")
    return ExplainConfig(int(samples), segmenter, num_features, seed, paired=paired)


def _warn_once(record: dict, shown: set[str]) -> None:
    """Each kind of warning once per run on stderr (the records carry every one)."""
    for text in record.get("warnings") or []:
        kind = re.sub(r"[\d.]+", "N", text)
        if kind not in shown:
            shown.add(kind)
            print(
                f"warning: {record['path']}: {text} (shown once; every record lists its warnings)",
                file=sys.stderr,
            )


def _open_local(bundle, backend: str, precision: str, explain: bool, images: int):
    """The classifier, and with ``--explain`` the explainer opening beside it from the start: its warm-up (the
    cuDNN search on a GPU) is the longest part of the first answer, so it overlaps the classifier's open and
    the first batch. Once the classifier is open the explainer must match its backend and precision.
    ``images``: the job's size (a short one opens the explainer with a quicker search)."""
    from cxr.runtime.backends.select import open_classifier, open_explainer
    from cxr.runtime.predict import OpeningExplainer

    explainer = (
        OpeningExplainer(lambda: open_explainer(bundle, backend, precision, images)[0]) if explain else None
    )
    try:
        classifier, reason = open_classifier(bundle, backend, precision)
    except BaseException:
        if explainer is not None:
            explainer.close()
        raise
    if explainer is not None:
        explainer.match(
            classifier.name,
            classifier.precision,
            lambda: open_explainer(bundle, classifier.name, classifier.precision, images)[0],
        )
    return classifier, reason, explainer


def _open_server(
    url: str, model_name: str, timeout: float, bundle, backend: str, precision: Optional[str], explain: bool
):
    """The remote classifier, after checking the server runs this bundle's model; a down server is not fatal
    (every file then gets the connection error, as a failed file does locally)."""
    from cxr.runtime.backends.triton_client import TritonClientBackend, model_mismatch
    from cxr.runtime.errors import CxrError, CxrUsageError

    if explain:
        raise CxrUsageError("--explain runs on the local backend; drop --server to explain")
    if backend != "auto":
        raise CxrUsageError("--backend is chosen by the server; drop it with --server")
    remote = TritonClientBackend(url, model_name, timeout)
    try:
        served = remote.server_card()
    except CxrError as exc:
        return remote, f"not reachable: {exc}"
    mismatch = model_mismatch(bundle.card, served)
    if mismatch:
        raise CxrError(f"server {url} serves another model than {bundle.folder} ({mismatch})")
    if precision and precision != remote.precision:
        raise CxrUsageError(f"--precision {precision}: server {url} runs {remote.precision}")
    return remote, f"server {url}, model {model_name}"


@app.command()
def info(
    model: Path = typer.Option(..., "--model", help="Model bundle folder."),
    expect_digest: ExpectDigest = None,
    trusted_key: TrustedKey = None,
) -> int:
    """The card, file hashes (checked), and what actually runs each graph here (a one-image probe each)."""
    from cxr.runtime.backends.select import int8_cpu_risk, open_classifier, open_explainer
    from cxr.runtime.bundle import GRAPHS, PRECISIONS, Bundle, onnx_name
    from cxr.runtime.card import parity_state, sha256_file
    from cxr.runtime.errors import CxrError

    bundle = Bundle.open(model, expect_digest, trusted_key)
    card = bundle.card.to_dict()
    files = card.pop("files")
    print(json.dumps(card, indent=2))
    print(f"\ndigest: {bundle.digest}  (pin it: --expect-digest {bundle.digest})")
    print("\nfiles:")
    bad = 0
    for name, digest in files.items():  # names are plain file names: the card refuses anything else
        path = bundle.folder / name
        state = "missing" if not path.is_file() else ("ok" if sha256_file(path) == digest else "SHA MISMATCH")
        bad += state != "ok"
        print(f"  {name:<28} {digest[:16]}  {state}")
    print("\nruns here (--backend auto, one-image probe):")
    openers = {"model": open_classifier, "explain": open_explainer}
    for precision in PRECISIONS:
        for graph in GRAPHS:
            if not bundle.has(onnx_name(graph, precision)):
                print(f"  {precision} {graph:<8} no graph (create it with cxr-export)")
                continue
            try:
                opened, reason = openers[graph](bundle, "auto", precision)
                state = parity_state(bundle.card, precision, opened.name == "tensorrt")
                risk = int8_cpu_risk(bundle.card, opened) if state == "passed" else None
                state, reason = ("not here", f"{reason}; {risk}") if risk else (state, reason)
                opened.close()
            except CxrError as exc:
                reason, state = f"cannot run: {exc}", "-"
            print(f"  {precision} {graph:<8} parity {state:<8} {reason}")
    if bad:
        print(
            f"error: {bad} bundle file(s) missing or changed since export: do not use this bundle",
            file=sys.stderr,
        )
        return EXIT_FATAL
    return EXIT_OK


@app.command()
def serve(
    model: Path = typer.Option(..., "--model", help="Model bundle folder."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    http_port: int = typer.Option(8000, help="HTTP/REST port (KServe v2 protocol)."),
    grpc_port: int = typer.Option(8001, help="gRPC port."),
    metrics_port: int = typer.Option(8002, help="Prometheus metrics port (/metrics)."),
    max_batch: MaxBatch = DEFAULT_MAX_BATCH,
    max_queue_delay_us: QueueDelayUs = DEFAULT_QUEUE_DELAY_US,
    max_queue: int = typer.Option(0, help="Reject requests beyond this many queued (0: no limit)."),
    instances: Instances = 1,
    backend: str = typer.Option(
        "auto", help="auto (engine -> ORT CUDA -> OpenVINO -> ORT CPU), tensorrt, onnxruntime or openvino."
    ),
    precision: str = typer.Option("fp32", help="fp32, fp16 or int8."),
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
        host,
        http_port,
        grpc_port,
        metrics_port,
        max_batch,
        max_queue_delay_us,
        max_queue,
        instances,
        backend,
        precision,
        max_pixels,
        name,
        log_file,
        allow_unvalidated,
    )

    def ready(backend_line: str) -> None:
        print(
            f"serving {name} on http://{host}:{http_port} (gRPC {host}:{grpc_port}, metrics "
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
