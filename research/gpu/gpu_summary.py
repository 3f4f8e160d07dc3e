"""``python -m research.gpu.gpu_summary OUT``: the headline numbers of ``gpu_check.sh`` in one
``summary.json``.

Every figure is read from a file the same run wrote (lime.json, latency_*.json, parity_gpu.json,
predict_explain.json, steps.txt); a step that failed leaves its keys null, never a guess."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _steps(out: Path) -> dict[str, dict[str, int]]:
    """steps.txt lines 'name rc=N Ss' -> {name: {rc, seconds}}."""
    steps = {}
    if (out / "steps.txt").is_file():
        for line in (out / "steps.txt").read_text().splitlines():
            name, rc, seconds = line.split()
            steps[name] = {"rc": int(rc.removeprefix("rc=")), "seconds": int(seconds.removesuffix("s"))}
    return steps


def throughput(latency: dict[str, Any] | None, backend: str, batch: str = "64") -> float | None:
    entry = (latency or {}).get("backends", {}).get(backend)
    return round(entry["throughput_img_s"][batch], 1) if entry else None


def summarise(out: Path) -> dict[str, Any]:
    lime = _read(out / "lime.json") or {}
    latency = None  # latency_*.json here and in compile/ (torch.compile measured on its own), merged
    for path in sorted(out.glob("latency_*.json")) + sorted(out.glob("compile/latency_*.json")):
        part = _read(path)
        latency = (
            part if latency is None else {**latency, "backends": {**latency["backends"], **part["backends"]}}
        )
    parity = _read(out / "parity_gpu.json")
    fit = _read(out / "run" / "metrics.json")
    ours = lime.get("ours", {})
    predict = _read(out / "predict_explain.json") or {}  # research.gpu.predict_explain: run_predict's values
    steps = _steps(out)
    env = (lime or latency or {}).get("environment", {})
    summary = {
        "explain_fp16_s_per_image": ours.get("fp16", {}).get("steady_s_per_image"),
        "explain_fp32_s_per_image": ours.get("fp32", {}).get("steady_s_per_image"),
        "explain_first_image_s": ours.get("fp16", {}).get("first_image_s"),
        "explain_images": lime.get("images"),
        "explain_runs_on": {p: r["backend"] for p, r in ours.items()},
        "captum_lime_s_per_image": lime.get("captum", {}).get("steady_s_per_image"),
        "speedup_vs_captum": lime.get("speedup_vs_captum"),
        "stock_lime_s_per_image": lime.get("stock_lime", {}).get("total_s"),
        "predict_explain_fp16": predict.get("timing"),
        "predict_explain_fp16_opening": predict.get("opening"),
        "predict_explain_fp16_step_s": steps.get("predict_explain", {}).get("seconds"),
        "ort_fp16_b64_img_s": throughput(latency, "onnxruntime-fp16"),
        "ort_fp32_b64_img_s": throughput(latency, "onnxruntime-fp32"),
        "ort_fp16_exhaustive_b64_img_s": throughput(latency, "onnxruntime-exhaustive-fp16"),
        "ort_fp32_exhaustive_b64_img_s": throughput(latency, "onnxruntime-exhaustive-fp32"),
        "torch_eager_fp16_b64_img_s": throughput(latency, "pytorch-fp16"),
        "torch_eager_fp32_b64_img_s": throughput(latency, "pytorch-fp32"),
        "torch_compile_fp16_b64_img_s": throughput(latency, "torch-compile-fp16"),
        "b1_p50_ms": {
            name: round(r["b1_ms"]["p50"], 2) for name, r in (latency or {}).get("backends", {}).items()
        },
        "parity_gpu": {
            label: {
                "passed": r["passed"],
                "max_abs_dprob": r["max_abs_dprob"],
                "top1_agreement": r["top1_agreement"],
                "runs_on": r.get("runs_on"),
            }
            for label, r in (parity or {}).get("backends", {}).items()
        }
        or None,
        "parity_n": (parity or {}).get("n"),
        "explain_variants": _read(out / "explain_variants.json"),
        "cold_start": {
            key: {k: v for k, v in value.items() if k.startswith("median_")}
            for key, value in (_read(out / "cold_start.json") or {}).get("variants", {}).items()
        }
        or None,
        "fp16_variants": _read(out / "fp16_variants.json"),
        "fit_val": {k: (fit or {}).get("val", {}).get(k) for k in ("n", "accuracy", "macro_f1")}
        if fit
        else None,
        "gpu": env.get("gpu"),
        "onnxruntime": env.get("onnxruntime"),
        "torch": env.get("torch"),
        "steps": steps,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, nargs="?", default=Path("."), help="gpu_check.sh's OUT_DIR")
    print(json.dumps(summarise(parser.parse_args(argv).out), indent=2))


if __name__ == "__main__":
    main()
