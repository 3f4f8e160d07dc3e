"""``cxr-bench quickstart``: the whole pipeline on generated phantoms, on a CPU-only machine, in minutes.

synth -> fit (small DPN-SE) -> export onnx + fp16 -> engine (when TensorRT is present) -> predict --explain
-> parity -> latency; ends by saying where the overlays, the parity table and the latency report are.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def step(title: str) -> None:
    log.info(f"\n== {title}")


def run_quickstart(
    out: Path, arch: str = "dpn_se_tiny", epochs: int = 8, size: int = 96, per_class: int = 60
) -> int:
    import cxr.train.models  # noqa: F401
    from cxr.bench.latency import run_latency
    from cxr.export.fp16 import export_fp16
    from cxr.export.onnx_export import export_onnx
    from cxr.export.parity import DEFAULT_RULES, run_parity
    from cxr.runtime.backends.tensorrt import tensorrt_available
    from cxr.runtime.explain import ExplainConfig
    from cxr.runtime.predict_job import PredictJob, run_predict
    from cxr.train.fit import FitConfig, fit
    from cxr.train.synth import write_phantoms

    started = time.perf_counter()
    data, run, bundle, reports = out / "data", out / "run", out / "bundle", out / "reports"
    step(f"1/7 synthetic phantoms -> {data}")
    write_phantoms(data, per_class=per_class, size=size + size // 4, seed=0)
    step(f"2/7 train {arch} for {epochs} epochs at {size}px -> {run}")
    fit(
        FitConfig(
            data=data, out=run, arch=arch, epochs=epochs, image_size=size, batch_size=16, lr=3e-3, seed=0
        )
    )
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
    step("5/7 predict + LIME explanations on 4 images (cxr-run, no PyTorch)")
    images = [
        str(sorted((data / c).glob("*.png"))[0])
        for c in ("covid19", "normal", "pneumonia_bacterial", "pneumonia_viral")
    ]
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
    step("6/7 parity: ONNX fp32 / fp16 vs PyTorch")
    parity = run_parity(bundle, data, ["onnx", "fp16", "engine"], DEFAULT_RULES, reports / "parity.json")
    step("7/7 latency")
    run_latency(bundle, reports, None, [1, 8, 32], warmup_s=0.5, duration_s=2.0)
    minutes = (time.perf_counter() - started) / 60
    log.info(f"\nquick start finished in {minutes:.1f} min")
    log.info(f"  overlays:     {reports / 'overlays'}  (red = supports the class, blue = against)")
    log.info(f"  predictions:  {predictions}")
    log.info(f"  parity table: {reports / 'parity.json'}  ({'PASS' if parity['passed'] else 'FAIL'})")
    log.info(f"  latency:      {reports}/latency_*.json and .png")
    return 0 if predicted.exit_code == 0 and parity["passed"] else 1
