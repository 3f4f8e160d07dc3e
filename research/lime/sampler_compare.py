"""Paired against plain LIME rows, scored on rows the reference map never saw.

    python -m research.lime.sampler_compare BUNDLE IMAGES... --tapes DIR --rows 400 --seed 1 --out c.json

The reference is each image's fp32 fixed-budget map kept by ``python -m research.lime.settle_sweep --tapes
DIR`` (lime's plain rows at the sweep's seed). Here the fp32 explainer answers ``--rows`` plain rows and
``--rows`` paired rows (``runtime/explain.py``), both drawn at ``--seed``: another seed, so neither shares a
row with the reference (a prefix of the reference's own pass would flatter every stop). Per sampler, it
reports

- the map on the first n rows (every 50) against the reference: top-5 overlap and Spearman;
- each stopping rule replayed on those rows through ``explain_image`` itself (a tape, as the sweep replays),
  capped at ``--rows``: where it stops and its top-5 overlap.

The table and ``<out>.png`` (overlap and Spearman against rows, per sampler) are written after every image."""

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
from cxr.runtime.explain import SAMPLERS, ExplainConfig, explain_image, lime_fit
from cxr.runtime.inputs import expand_inputs
from cxr.runtime.safe_io import atomic_write
from cxr.runtime.settle import SPREAD_BOUND

from research.lime.settle_sweep import Rule, Tape, open_tape, replay_stop, tape_reference

log = logging.getLogger(__name__)

RULES = (Rule(SPREAD_BOUND, 3), Rule(SPREAD_BOUND, 2), Rule(SPREAD_BOUND, 3, 0.9))
STEP = 50


def compare_image(
    image: np.ndarray,
    explainer: ExplainerBackend,
    reference: dict[int, float],
    label: int,
    rows: int,
    seed: int,
    rules: tuple[Rule, ...] = RULES,
) -> dict[str, Any]:
    """Both samplers' curves and rule stops on one image (see the module docstring)."""
    result: dict[str, Any] = {"label": label}
    for sampler in SAMPLERS:
        fixed = ExplainConfig(samples=rows, seed=seed, paired=sampler == "paired")
        tape = Tape(explainer)
        explain_image(image, tape, fixed, label=label)
        taped = tape.arrays()
        curve = {}
        for n in range(STEP * 2, rows + 1, STEP):
            weights = lime_fit(taped["rows"][:n], taped["probs"][:n], label, seed)[0]
            curve[str(n)] = compare_weights(reference, weights)
        stops = {rule.key: replay_stop(image, tape, fixed, rule, reference, label) for rule in rules}
        result[sampler] = {"curve": curve, "rules": stops}
    return result


def summarise(per_image: list[dict[str, Any]], rules: tuple[Rule, ...]) -> dict[str, Any]:
    """Means over images: per sampler, the curve and each rule's samples and overlap."""
    table: dict[str, Any] = {}
    for sampler in SAMPLERS:
        runs = [image[sampler] for image in per_image]
        table[sampler] = {
            "curve": {
                n: {
                    "top5_overlap": float(np.mean([r["curve"][n]["top5_overlap"] for r in runs])),
                    "spearman": float(np.mean([r["curve"][n]["spearman"] for r in runs])),
                }
                for n in runs[0]["curve"]
            },
            "rules": {
                rule.key: {
                    "mean_samples": float(np.mean([r["rules"][rule.key]["samples"] for r in runs])),
                    "mean_top5_overlap": float(np.mean([r["rules"][rule.key]["top5_overlap"] for r in runs])),
                }
                for rule in rules
            },
        }
    return table


def run_compare(
    bundle_dir: Path,
    paths: list[Path],
    tapes: Path,
    rows: int = 400,
    seed: int = 1,
    backend: str = "auto",
    out: Path | None = None,
    rules: tuple[Rule, ...] = RULES,
) -> dict[str, Any]:
    """Every image with a sweep tape in ``tapes``; the result (with ``out``, its file and plot) after each."""
    bundle = Bundle.open(bundle_dir)
    per_image: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    with open_explainer(bundle, backend, "fp32")[0] as explainer:
        for path, image in zip(paths, load_images(bundle, paths, 0)):
            taped, settings = open_tape(tapes, path)
            if settings.get("model") != bundle.digest or settings.get("seed") == seed:
                raise CxrError(
                    f"{tapes}: taped for another bundle, or at seed {seed} (the rows must not be the "
                    "reference's)"
                )
            label, budget = int(taped["label"]), settings.get("budget")
            compared = compare_image(image, explainer, tape_reference(taped), label, rows, seed, rules)
            per_image.append({"image": str(path), **compared})
            log.info(f"  {len(per_image)}/{len(paths)} compared")
            result = {
                "model": bundle.digest,
                "runs_on": explainer.provider,
                "reference": f"fp32 {budget}-sample map, plain rows at seed {settings.get('seed')}",
                "rows": rows,
                "seed": seed,
                "images": len(per_image),
                "summary": summarise(per_image, rules),
                "per_image": per_image,
            }
            if out:
                atomic_write(out, json.dumps(result, indent=2) + "\n")
                plot_compare(result, out.with_suffix(".png"))
    return result


def plot_compare(result: dict[str, Any], path: Path) -> None:
    """Top-5 overlap and Spearman against rows, one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for sampler, table in result["summary"].items():
        counts = [int(n) for n in table["curve"]]
        for axis, metric in zip(axes, ("top5_overlap", "spearman")):
            axis.plot(counts, [table["curve"][str(n)][metric] for n in counts], marker="o", label=sampler)
    axes[0].axhline(0.9, color="tab:red", linestyle=":", label="target 90 %")
    for axis, title in zip(axes, ("top-5 overlap with the reference", "Spearman with the reference")):
        axis.set_xlabel("LIME rows")
        axis.set_title(title)
        axis.legend(fontsize=8)
    fig.suptitle(f"paired vs plain rows, {result['images']} images, seed {result['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_compare(result: dict[str, Any]) -> str:
    lines = [f"{result['images']} images, rows at seed {result['seed']} against the {result['reference']}"]
    for sampler, table in result["summary"].items():
        curve = ", ".join(
            f"{n}: {v['top5_overlap']:.1%}/{v['spearman']:.3f}" for n, v in table["curve"].items()
        )
        lines.append(f"{sampler:>7} overlap/Spearman by rows: {curve}")
        for key, rule in table["rules"].items():
            lines.append(
                f"{'':>7} rule {key}: {rule['mean_top5_overlap']:.1%} at {rule['mean_samples']:.0f} samples"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("images", nargs="+", help="Images, folders or globs (each with a sweep tape).")
    parser.add_argument("--tapes", type=Path, required=True, help="The settle_sweep --tapes folder (fp32).")
    parser.add_argument("--rows", type=int, default=400, help="Rows per sampler and image (the rules' cap).")
    parser.add_argument("--seed", type=int, default=1, help="Seed of the rows (not the reference's).")
    parser.add_argument("--backend", default="auto", help="auto, onnxruntime or openvino.")
    parser.add_argument("--out", type=Path, default=Path("sampler_compare.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.rows < 2 * STEP:
        raise SystemExit(f"error: --rows must be at least {2 * STEP}, got {args.rows}")
    try:
        result = run_compare(
            args.bundle, expand_inputs(args.images), args.tapes, args.rows, args.seed, args.backend, args.out
        )
    except CxrError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(format_compare(result))


if __name__ == "__main__":
    main()
