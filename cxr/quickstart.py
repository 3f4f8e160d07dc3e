"""``cxr-quickstart``: the whole pipeline on generated phantoms, on a CPU-only machine, in minutes.

synth -> fit (small DPN-SE) -> export onnx + fp16 -> engine (when TensorRT is present) -> predict --explain
-> parity -> latency. Each stage is the library call its own CLI makes; the command ends by printing where the
overlays, the parity table and the latency report are (``bash quickstart.sh`` sets up .venv and runs it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import typer

log = logging.getLogger(__name__)
CLASSES = ("covid19", "normal", "pneumonia_bacterial", "pneumonia_viral")


@dataclass(frozen=True, kw_only=True)
class QuickstartResult:
    """Where everything went, and whether predict and parity passed."""

    reports: Path
    predictions: Path
    minutes: float
    predicted_ok: bool
    parity_passed: bool

    @property
    def exit_code(self) -> int:
        return 0 if self.predicted_ok and self.parity_passed else 1

    def lines(self) -> list[str]:
        return [
            f"quick start finished in {self.minutes:.1f} min",
            f"  overlays:     {self.reports / 'overlays'}  (red = supports the class, blue = against)",
            f"  predictions:  {self.predictions}",
            f"  parity table: {self.reports / 'parity.json'}  ({'PASS' if self.parity_passed else 'FAIL'})",
            f"  latency:      {self.reports}/latency_*.json and .png",
        ]


def step(title: str) -> None:
    log.info(f"\n== {title}")


def run_quickstart(
    out: Path, arch: str = "dpn_se_tiny", epochs: int = 8, size: int = 96, per_class: int = 60
) -> QuickstartResult:
    """Every stage once, into ``out`` (data, run, bundle, reports)."""
    started = time.perf_counter()
    data, run, bundle, reports = out / "data", out / "run", out / "bundle", out / "reports"
    _train(data, run, arch, epochs, size, per_class)
    _export(run, bundle)
    predictions, predicted_ok = _predict(data, bundle, reports)
    parity_passed = _parity_and_latency(data, bundle, reports)
    return QuickstartResult(
        reports=reports,
        predictions=predictions,
        minutes=(time.perf_counter() - started) / 60,
        predicted_ok=predicted_ok,
        parity_passed=parity_passed,
    )


def _train(data: Path, run: Path, arch: str, epochs: int, size: int, per_class: int) -> None:
    import cxr.train.models  # noqa: F401
    from cxr.train.fit import FitConfig, fit
    from cxr.train.synth import write_phantoms

    step(f"1/7 synthetic phantoms -> {data}")
    write_phantoms(data, per_class=per_class, size=size + size // 4, seed=0)
    step(f"2/7 train {arch} for {epochs} epochs at {size}px -> {run}")
    fit(
        FitConfig(
            data=data, out=run, arch=arch, epochs=epochs, image_size=size, batch_size=16, lr=3e-3, seed=0
        )
    )


def _export(run: Path, bundle: Path) -> None:
    from cxr.export.fp16 import export_fp16
    from cxr.export.onnx_export import export_onnx
    from cxr.runtime.backends.tensorrt import tensorrt_available

    step(f"3/7 export ONNX fp32 + fp16 -> {bundle}")
    export_onnx(run, bundle)
    export_fp16(bundle)
    step("4/7 TensorRT engine")
    if tensorrt_available():
        from cxr.export.engine_build import build_engines

        build_engines(bundle, "fp16")
    else:
        log.info(
            "skipped: TensorRT is not installed here (on a GPU machine: pip install 'cxr-edge[trt]', then "
            f"cxr-export build-engine {bundle} --precision fp16)"
        )


def _predict(data: Path, bundle: Path, reports: Path) -> tuple[Path, bool]:
    """One phantom of each class predicted and explained, as ``cxr-run predict --explain`` does."""
    from cxr.runtime.explain import ExplainConfig
    from cxr.runtime.predict_job import PredictJob, run_predict

    step("5/7 predict + LIME explanations on 4 images (cxr-run, no PyTorch)")
    images = [str(sorted((data / c).glob("*.png"))[0]) for c in CLASSES]
    predictions = reports / "predictions.jsonl"
    reports.mkdir(parents=True, exist_ok=True)
    job = PredictJob(
        inputs=images,
        model=bundle,
        out=predictions,
        overwrite=True,
        explain=ExplainConfig(samples=500),
        explain_dir=reports / "overlays",
    )
    predicted = run_predict(job)
    log.info(predicted.line())
    return predictions, predicted.exit_code == 0


def _parity_and_latency(data: Path, bundle: Path, reports: Path) -> bool:
    from cxr.bench.latency import format_latency, run_latency
    from cxr.export.parity import DEFAULT_RULES, format_parity, run_parity

    step("6/7 parity: ONNX fp32 / fp16 vs PyTorch")
    parity = run_parity(bundle, data, ["onnx", "fp16", "engine"], DEFAULT_RULES, reports / "parity.json")
    log.info(format_parity(parity))
    step("7/7 latency")
    log.info(format_latency(run_latency(bundle, reports, None, [1, 8, 32], warmup_s=0.5, duration_s=2.0)))
    return bool(parity["passed"])


app = typer.Typer(
    help=__doc__.splitlines()[0].strip("`"),
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command()
def quickstart(
    out: Path = typer.Option(Path("quickstart"), "--out", help="Folder for data, run, bundle and reports."),
    arch: str = typer.Option("dpn_se_tiny", help="Architecture (small for CPU)."),
    epochs: int = typer.Option(8, help="Epochs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings, errors and the closing note."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug messages too, with their source."),
) -> int:
    """The whole pipeline on generated phantoms: train, export, (engine), predict + LIME, parity, latency."""
    from cxr.runtime.cli_util import set_verbosity

    set_verbosity(quiet, verbose)
    result = run_quickstart(out, arch, epochs)
    print("\n".join(result.lines()))
    return result.exit_code


def main() -> None:
    from cxr.runtime.cli_util import run_app

    run_app(app)


if __name__ == "__main__":
    main()
