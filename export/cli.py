"""``cxr-export``: run -> bundle (onnx), fp16 and int8 graphs, TensorRT engines, parity report, Triton
repository."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from cxr.runtime.backends.registry import parity_choices
from cxr.runtime.cli_options import (
    DEFAULT_MAX_BATCH,
    DEFAULT_QUEUE_DELAY_US,
    Instances,
    MaxBatch,
    QueueDelayUs,
)
from cxr.runtime.cli_util import new_app, run_app
from cxr.runtime.formats import FORMATS

app = new_app("Export a trained run to a model bundle: ONNX (fp32/fp16/int8), TensorRT engines, parity.")


def print_digest(bundle: Path) -> None:
    """The bundle digest after a stage rewrote the card: what 'cxr-run ... --expect-digest' pins."""
    from cxr.runtime.card import read_card_and_digest

    print(f"bundle digest: {read_card_and_digest(bundle)[1]}")


@app.command()
def keygen(
    out: Path = typer.Argument(..., help="Key name: writes OUT.key (private, mode 600) and OUT.pub."),
    force: bool = typer.Option(
        False, "--force", help="If OUT.key or OUT.pub exists, move the old pair aside (never deleted)."
    ),
) -> None:
    """A new Ed25519 key pair for 'cxr-export sign' and 'cxr-run --trusted-key'; an existing key is never
    replaced."""
    from cxr.runtime.signing import generate_key

    private, public = Path(f"{out}.key"), Path(f"{out}.pub")
    moved = generate_key(private, public, force)
    if moved is not None:
        print(f"moved the old pair aside to {moved} and {moved.with_suffix('.pub')}")
    print(f"wrote {private} (keep it secret) and {public} (give it to the bedside machines)")


@app.command()
def sign(
    bundle: Path = typer.Argument(
        ..., help="Bundle folder, after its last export stage (any later stage voids it)."
    ),
    key: Path = typer.Option(..., "--key", help="Ed25519 private key (PEM), e.g. from 'cxr-export keygen'."),
) -> None:
    """Sign the bundle's card (which hashes every file) so 'cxr-run --trusted-key' can vouch for it."""
    from cxr.export.stage import bundle_lock
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.signing import sign_card

    with bundle_lock(bundle, "sign"):  # no stage may swap the bundle while it is signed
        Bundle.open(bundle)  # a valid bundle only: links, card and graphs checked
        target = sign_card(bundle, key)
    print(f"signed {bundle / 'card.json'} -> {target.name}")
    print_digest(bundle)


@app.command()
def onnx(
    run: Path = typer.Argument(..., help="Run folder from 'cxr-train fit'."),
    out: Path = typer.Option(..., "--out", help="Bundle folder to write."),
    opset: int = typer.Option(17, help="ONNX opset (13-21)."),
    ood_keep: Optional[float] = typer.Option(
        None,
        help="Re-threshold the run's out-of-distribution gate to let this share of its validation films pass "
        "(default: as fitted, 0.95).",
    ),
) -> None:
    """fp32 model.onnx (dynamic batch, uint8 pixels in) and the LIME explainer graph, checked against
    PyTorch."""
    import cxr.train.models  # noqa: F401  (registers DPN-SE)
    from cxr.export.onnx_export import export_onnx

    if ood_keep is not None and not 0.5 <= ood_keep < 1:
        from cxr.runtime.errors import CxrUsageError

        raise CxrUsageError(f"--ood-keep must be in [0.5, 1), got {ood_keep}")
    export_onnx(run, out, opset, ood_keep)
    print_digest(out)


@app.command()
def fp16(bundle: Path = typer.Argument(..., help="Bundle folder.")) -> None:
    """Mixed-precision model.fp16.onnx / explain.fp16.onnx (fp32 I/O, overflow-prone nodes kept fp32)."""
    from cxr.export.fp16 import export_fp16

    written, notes = export_fp16(bundle)
    print(
        f"wrote {', '.join(written)} in {bundle}; kept in fp32: "
        f"{notes['model']['fp32_nodes_overflow'] or 'no overflowing nodes'}"
    )
    print_digest(bundle)


@app.command()
def int8(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    calib: Path = typer.Option(..., "--calib", help="Folder of real images (any layout) for calibration."),
    samples: int = typer.Option(64, help="Calibration images to use."),
    check: int = typer.Option(
        64,
        help="Further held-out images that choose the calibration and the layers kept "
        "in float (0: no choosing, first --calibration method, nothing kept).",
    ),
    check_data: Optional[Path] = typer.Option(
        None,
        metavar="<path>",
        help="Folder of held-out images for that choice (default: more of --calib). Use images the "
        "model never trained on, such as its validation split: on training images agreement looks better "
        "than it is.",
    ),
    calibration: str = typer.Option(
        "minmax,percentile,nncf",
        help="Methods to try, best held-out agreement wins: minmax, percentile, entropy (ONNX Runtime; "
        "histogram methods see 16 images), nncf (NNCF: every image, with bias correction).",
    ),
    agreement: float = typer.Option(
        FORMATS["int8"].parity.min_agreement, help="Top-1 agreement with fp32 the sensitivity sweep aims for."
    ),
    seed: int = typer.Option(0, help="Which images are drawn."),
) -> None:
    """Explicit Q/DQ model.int8.onnx calibrated on real images and checked on held-out ones, and
    explain.int8.onnx: that same int8 network behind the LIME composer."""
    from cxr.export.int8 import export_int8

    methods = tuple(m.strip() for m in calibration.split(",") if m.strip())
    report = export_int8(bundle, calib, samples, check, seed, methods, agreement, check_data=check_data)
    model = report.notes["model"]
    kept = kept_summary(model["kept_in_float"])
    held = f", held-out agreement {model['held_out_agreement']:.4f}" if "held_out_agreement" in model else ""
    print(
        f"wrote {', '.join(report.written)} in {bundle} ({model['calibration']} calibration{held}; "
        f"kept in float: {kept})"
    )
    print(report.verdict)
    print_digest(bundle)


def kept_summary(nodes: list[str], shown: int = 4) -> str:
    """The float-kept nodes for the one summary line: all when few, else a count (the card lists them)."""
    if len(nodes) <= shown:
        return ", ".join(nodes) or "none"
    return f"{len(nodes)} nodes, e.g. {', '.join(nodes[:2])} (all in card.json)"


@app.command("build-engine")
def build_engine(
    bundle: Path = typer.Argument(..., help="Bundle folder (build on the target GPU)."),
    precision: str = typer.Option("fp16", help="fp16, int8 or fp32: picks the matching ONNX graph."),
    min_batch: int = typer.Option(1, help="Profile min batch."),
    opt_batch: int = typer.Option(64, help="Profile opt batch (LIME batches)."),
    max_batch: int = typer.Option(64, help="Profile max batch."),
    timing_cache: Optional[Path] = typer.Option(None, help="Timing cache file, reused and saved."),
    workspace_gb: float = typer.Option(4.0, help="Builder workspace limit in GiB."),
) -> None:
    """Strongly typed TensorRT plans (classifier + explainer) with *.engine.json sidecars."""
    from cxr.export.engine_build import Profile, build_engines
    from cxr.runtime.bundle import check_precision

    check_precision(precision)
    build_engines(bundle, precision, Profile(min_batch, opt_batch, max_batch), timing_cache, workspace_gb)
    print_digest(bundle)


@app.command()
def parity(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    data: Path = typer.Argument(..., help="Labelled ImageFolder."),
    backends: str = typer.Option(
        "onnx,fp16,int8,engine,openvino-bf16",
        help=f"Any of {', '.join(parity_choices())}: an ONNX graph on ONNX Runtime, or every file another "
        "backend runs.",
    ),
    report: Optional[Path] = typer.Option(None, "--report", help="JSON report (default BUNDLE/parity.json)."),
    run: Optional[Path] = typer.Option(
        None, "--run", help="PyTorch run folder (default: the card's source run)."
    ),
    fp32_max_dprob: float = typer.Option(FORMATS["fp32"].parity.max_abs_dprob, help="fp32: max |dprob|."),
    fp16_agreement: float = typer.Option(
        FORMATS["fp16"].parity.min_agreement,
        help="fp16 and bf16: the agreement the flip rate is tested against.",
    ),
    int8_agreement: float = typer.Option(
        FORMATS["int8"].parity.min_agreement, help="int8: the agreement the flip rate is tested against."
    ),
    alpha: float = typer.Option(
        FORMATS["fp16"].parity.alpha,
        help="fp16/int8/bf16: significance of the flip-rate and per-class McNemar tests.",
    ),
) -> int:
    """Compare every available backend with PyTorch on the same labelled images; exit 1 on failure."""
    import cxr.train.models  # noqa: F401
    from cxr.export.parity import format_parity, parity_rules, report_location, run_parity

    rules = parity_rules(fp32_max_dprob, fp16_agreement, int8_agreement, alpha)
    results = run_parity(
        bundle, data, [b.strip() for b in backends.split(",") if b.strip()], rules, report, run
    )
    print(format_parity(results))
    print(f"report: {report_location(bundle, report)}")
    print_digest(bundle)
    return 0 if results["passed"] else 1


@app.command()
def triton(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    out: Path = typer.Option(
        ..., "--out", help="Model repository folder (created; the model folder is replaced)."
    ),
    precision: str = typer.Option("fp16", help="fp32, fp16 or int8: which engine / graph to serve."),
    max_batch: MaxBatch = DEFAULT_MAX_BATCH,
    format: str = typer.Option(
        "auto", "--format", help="auto (plan if the bundle has one, else ONNX), tensorrt or onnx."
    ),
    kind: str = typer.Option("gpu", help="Instance kind: gpu or cpu (ONNX only)."),
    instances: Instances = 1,
    max_queue_delay_us: QueueDelayUs = DEFAULT_QUEUE_DELAY_US,
    trt_accelerator: bool = typer.Option(
        False, "--trt-accelerator", help="ONNX on GPU: let ORT hand the graph to TensorRT."
    ),
    name: str = typer.Option("cxr", help="Model name in the repository."),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing folder of that name not written by cxr-export."
    ),
) -> None:
    """A Triton model repository (config.pbtxt, model file, labels, client preprocessing note), validated."""
    from cxr.export.triton_repo import RepoOptions, export_repository, read_config
    from cxr.runtime.bundle import Bundle

    options = RepoOptions(
        precision=precision,
        max_batch=max_batch,
        format=format,
        kind=kind,
        instances=instances,
        max_queue_delay_us=max_queue_delay_us,
        trt_accelerator=trt_accelerator,
        name=name,
        force=force,
    )
    model_dir = export_repository(Bundle.open(bundle), out, options)
    print(
        f"wrote {model_dir} ({read_config(model_dir).platform}, max_batch_size {max_batch}); serve with: "
        f"tritonserver --model-repository {out}"
    )


@app.command("triton-check")
def triton_check(
    repo: Path = typer.Argument(..., help="Model repository folder."),
    name: str = typer.Option("cxr", help="Model name in the repository."),
) -> int:
    """Check a model repository against its graph: names, dtypes, dims, batch limits, labels. Exit 1 on
    problems."""
    from cxr.export.triton_repo import validate_repository

    problems = validate_repository(repo, name)
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{repo / name}: " + (f"{len(problems)} problem(s)" if problems else "valid"))
    return 1 if problems else 0


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
