"""How much of a low-precision LIME map is the precision's own error, and can a few fp32 rows correct it?

    python -m research.lime.lime_noise BUNDLE IMAGES... --tapes DIR --fp32-rows 160 --out noise.json

Reads the tapes that ``python -m research.lime.settle_sweep --tapes DIR`` kept (the low-precision explainer's
answer to each of the fixed budget's rows, and the fp32 fixed-budget map), runs the fp32 explainer on the
first ``fp32-rows`` of the same rows, and reports per image:

- signal: std over the rows of the explained class's probability at low precision (what LIME's ridge fits);
- error: std of (fp32 - low precision) over the same rows. Where error is near signal, the low-precision map
  is largely the quantization's pattern, and no stopping rule brings it to the fp32 map;
- ceiling: the low-precision full-budget map's top-5 overlap with the fp32 map, the most any stopping rule at
  that precision can reach;
- corrected: LIME's weights are linear in the fitted target (a weighted ridge), so the low-precision map on n
  rows plus the ridge fit of (fp32 - low precision) on the first m rows is a control variate for the fp32
  map: unbiased, and cheap where the difference is small. Its top-5 overlap, per (n, m).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from cxr.bench.lime_bench import load_images
from cxr.bench.lime_fidelity import compare_weights
from cxr.runtime.backends.base import ExplainerBackend
from cxr.runtime.backends.select import open_explainer
from cxr.runtime.bundle import Bundle
from cxr.runtime.errors import CxrError
from cxr.runtime.explain import ExplainConfig, lime_fit
from cxr.runtime.inputs import expand_inputs
from cxr.runtime.safe_io import atomic_write
from cxr.runtime.segment import segment, segment_means

from research.lime.settle_sweep import open_tape, tape_reference

log = logging.getLogger(__name__)

SAMPLES = (300, 400, 500, 1000)
FP32_ROWS = (32, 64, 96, 128, 160)


def fp32_rows(
    image: np.ndarray, explainer: ExplainerBackend, rows: np.ndarray, config: ExplainConfig
) -> np.ndarray:
    """The fp32 explainer's probabilities for ``rows`` of this image (segmented as explain_image does)."""
    segments = segment(image, config.segmenter, config.n_segments, config.seed)
    explainer.set_image(image, segment_means(image, segments), segments)
    step = explainer.limits.max_batch
    return np.concatenate([explainer.run(rows[i : i + step]) for i in range(0, len(rows), step)])


def measure_noise(
    image: np.ndarray, explainer: ExplainerBackend, tape: dict[str, np.ndarray], fp32_count: int
) -> dict[str, Any]:
    """One image's signal, error, ceiling and control-variate overlaps (see the module docstring)."""
    rows, low, label = tape["rows"], tape["probs"], int(tape["label"])
    reference = tape_reference(tape)
    high = fp32_rows(image, explainer, rows[:fp32_count], ExplainConfig())[:, label]
    difference = (high - low[:fp32_count, label])[:, None]  # a one-column target for lime's fit
    result: dict[str, Any] = {
        "label": label,
        "signal": float(np.std(low[:, label])),
        "error": float(np.std(difference)),
        "ceiling": compare_weights(reference, lime_fit(rows, low, label, 0)[0])["top5_overlap"],
        "overlap": {},
    }
    for n in sorted({*(s for s in SAMPLES if s < len(rows)), len(rows)}):
        plain = lime_fit(rows[:n], low[:n], label, 0)[0]
        result["overlap"][f"n{n}"] = compare_weights(reference, plain)["top5_overlap"]
        for m in (r for r in FP32_ROWS if r <= fp32_count):
            correction = lime_fit(rows[:m], difference[:m], 0, 0)[0]
            corrected = {k: v + correction.get(k, 0.0) for k, v in plain.items()}
            result["overlap"][f"n{n}+fp32 m{m}"] = compare_weights(reference, corrected)["top5_overlap"]
    return result


def run_noise(
    bundle_dir: Path, paths: list[Path], tapes: Path, fp32_count: int, precision: str, backend: str = "auto"
) -> dict[str, Any]:
    """Every image's ``measure_noise`` and their means; ``backend`` runs the fp32 rows (the sweep's kind)."""
    bundle = Bundle.open(bundle_dir)
    per_image = {}
    with open_explainer(bundle, backend, "fp32")[0] as explainer:
        for path, image in zip(paths, load_images(bundle, paths, 0)):
            tape, settings = open_tape(tapes, path)
            if settings.get("model") != bundle.digest or settings.get("precision") != precision:
                raise CxrError(f"{path}: taped for another bundle or precision than {bundle_dir} {precision}")
            per_image[str(path)] = measure_noise(image, explainer, tape, fp32_count)
            log.info(f"  {path.name}: {json.dumps(per_image[str(path)])}")
    rows = list(per_image.values())
    return {
        "model": bundle.digest,
        "precision": precision,
        "images": len(rows),
        "mean_signal": float(np.mean([r["signal"] for r in rows])),
        "mean_error": float(np.mean([r["error"] for r in rows])),
        "mean_ceiling": float(np.mean([r["ceiling"] for r in rows])),
        "mean_overlap": {k: float(np.mean([r["overlap"][k] for r in rows])) for k in rows[0]["overlap"]},
        "per_image": per_image,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("images", nargs="+", help="The images settle_sweep taped.")
    parser.add_argument("--tapes", type=Path, required=True)
    parser.add_argument("--precision", default="int8", help="The precision the tapes hold.")
    parser.add_argument("--fp32-rows", type=int, default=max(FP32_ROWS))
    parser.add_argument("--backend", default="auto", help="Where the fp32 rows run (as in the sweep).")
    parser.add_argument("--out", type=Path, default=Path("lime_noise.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = expand_inputs(args.images)
    result = run_noise(args.bundle, paths, args.tapes, args.fp32_rows, args.precision, args.backend)
    atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print(
        f"{result['images']} images at {result['precision']}: signal {result['mean_signal']:.4f}, error "
        f"{result['mean_error']:.4f}, ceiling {result['mean_ceiling']:.1%}"
    )
    for key, value in result["mean_overlap"].items():
        print(f"  {key:>16}: {value:.1%}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
