"""``python -m research.gpu.predict_explain BUNDLE OUT IMAGE...`` (repository root): ``cxr-run predict
--explain`` as the library call the CLI makes (``run_predict``), timed per record; writes
OUT/predict_explain.json.

What ``gpu_check.sh`` reports for predict with explanations: when the first result came, how long each graph
took to open, and the seconds per explanation (overlay included) after the first. The figures are the run's
own values (its summary and each record's timing), not read back from its log.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from cxr.runtime.explain import ExplainConfig
from cxr.runtime.predict_job import PredictJob, run_predict


def predict_explain(
    bundle: Path, images: list[str], out: Path, precision: str = "fp16", samples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Predict and explain ``images`` as ``cxr-run predict --explain --precision P`` does, records in
    OUT/predict_explain_P.jsonl and overlays in OUT/overlays; returns the opening and the per-image timing."""
    seconds: list[float] = []

    def timed(record: dict[str, Any]) -> None:
        timing = (record.get("explanation") or {}).get("timing")
        if timing:
            seconds.append(timing["total_s"] + timing.get("overlay_s", 0.0))

    job = PredictJob(
        inputs=images,
        model=bundle,
        precision=precision,
        out=out / f"predict_explain_{precision}.jsonl",
        overwrite=True,
        explain=ExplainConfig(samples=samples, seed=seed),
        explain_dir=out / "overlays",
    )
    summary = run_predict(job, on_record=timed)
    return {
        "precision": precision,
        "exit_code": summary.exit_code,
        "opening": {
            "first_result_s": summary.first_result_s,
            "classifier_open_s": summary.classifier_open_s,
            "explainer_open_s": summary.explainer_open_s,
        },
        "timing": _timing(seconds, summary.predicted + summary.failed, summary.failed),
    }


def _timing(seconds: list[float], images: int, errors: int) -> dict[str, Any] | None:
    """Per image after the first (the first carries the warm-up); None with fewer than two explanations."""
    if len(seconds) < 2:
        return None
    return {
        "images": images,
        "explained": len(seconds),
        "errors": errors,
        "first_s": seconds[0],
        "steady_s_per_image": float(np.mean(seconds[1:])),
        "steady_p95_s": float(np.percentile(seconds[1:], 95)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--precision", default="fp16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    result = predict_explain(args.bundle, args.images, args.out, args.precision)
    (args.out / "predict_explain.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
