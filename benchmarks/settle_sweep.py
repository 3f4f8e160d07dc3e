"""Tune ``--samples auto``'s stopping rule with one model pass per image.

``--samples auto`` draws the same rows as the fixed budget (same seed), only fewer of them. So one full
fixed-budget pass of ``ours`` (e.g. the int8 explainer) per image, taped, answers every stopping rule: each
rule replays the tape and stops where it would have stopped. Each stop is scored against the fp32
fixed-budget map, as ``cxr-bench lime --fidelity`` scores it (top-5 overlap, samples). Cost per image: one
fp32 map and one pass of ``ours``, whatever the number of rules.

Tune on images other than those the fidelity benchmark reports on.

    python -m cxr.bench.settle_sweep BUNDLE IMAGES... --precision int8 --out sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from cxr.bench.lime_bench import load_images
from cxr.bench.lime_fidelity import compare_maps, reference_and_ours, run_settings
from cxr.runtime.backends.base import ExplainerBackend
from cxr.runtime.bundle import Bundle
from cxr.runtime.explain import ExplainConfig, explain_image
from cxr.runtime.inputs import expand_inputs
from cxr.runtime.safe_io import atomic_write
from cxr.runtime.settle import SPREAD_BOUND, STABLE_FITS

log = logging.getLogger(__name__)

BOUNDS = (0.05, 0.075, 0.1, 0.15)
FITS = (3, 4, 5)


class Tape(ExplainerBackend):
    """Records what ``backend`` answers for each batch of rows; replays those answers afterwards, refusing
    any row it did not record (a rule must see exactly what the real explainer would have computed)."""

    def __init__(self, backend: ExplainerBackend) -> None:
        self.backend = backend
        self.name, self.precision, self.limits = backend.name, backend.precision, backend.limits
        self.rows: list[np.ndarray] = []
        self.probs: list[np.ndarray] = []
        self.replaying = False
        self.cursor = 0

    def replay(self) -> Tape:
        self.replaying, self.cursor = True, 0
        return self

    def _set_image(self, image: np.ndarray, fill: np.ndarray, segments: np.ndarray) -> None:
        if not self.replaying:
            self.backend.set_image(image, fill, segments)
        self.columns, self.cursor = self.backend.columns, 0

    def _run(self, z: np.ndarray) -> np.ndarray:
        if not self.replaying:
            self.rows.append(z.copy())
            self.probs.append(self.backend.run(z))
            return self.probs[-1]
        index = self.cursor
        if index >= len(self.rows) or not np.array_equal(self.rows[index], z):
            raise RuntimeError(f"replay asked for rows the tape does not hold (batch {index})")
        self.cursor += 1
        return self.probs[index]


def sweep_image(
    image: np.ndarray,
    reference_backend: ExplainerBackend,
    ours: ExplainerBackend,
    budget: int,
    seed: int,
    rules: list[tuple[float, int]],
) -> dict[str, Any]:
    """The fp32 fixed-budget map, one taped fixed-budget pass of ``ours``, and each (bound, fits) rule's
    stop scored against that map."""
    fixed = ExplainConfig(samples=budget, seed=seed)
    tape = Tape(ours)
    if ours is reference_backend:  # an fp32 sweep: the reference pass is the full pass, taped once
        reference = full = explain_image(image, tape, fixed)
    else:
        reference = explain_image(image, reference_backend, fixed)
        full = explain_image(image, tape, fixed, label=reference.label)
    seconds_per_row = full.timing["model_s"] / max(1, full.samples)
    scores = {}
    for bound, fits in rules:
        config = replace(fixed, adaptive=True, spread_bound=bound, stable_fits=fits)
        stop = explain_image(image, tape.replay(), config, label=reference.label)
        scores[f"{bound}/{fits}"] = {**compare_maps(reference, stop), "samples": stop.samples}
    return {
        "full_budget_vs_reference": compare_maps(reference, full),
        "seconds_per_row": seconds_per_row,
        "rules": scores,
    }


def summarise(images: list[dict[str, Any]], rules: list[tuple[float, int]]) -> list[dict[str, Any]]:
    """Per rule: mean top-5 overlap, mean samples and the model seconds those samples cost."""
    table = []
    for bound, fits in rules:
        key = f"{bound}/{fits}"
        rows = [image["rules"][key] for image in images]
        table.append(
            {
                "spread_bound": bound,
                "stable_fits": fits,
                "shipped": bound == SPREAD_BOUND and fits == STABLE_FITS,
                "mean_top5_overlap": float(np.mean([r["top5_overlap"] for r in rows])),
                "mean_spearman": float(np.mean([r["spearman"] for r in rows])),
                "mean_samples": float(np.mean([r["samples"] for r in rows])),
                "mean_model_seconds": float(
                    np.mean([r["samples"] * image["seconds_per_row"] for r, image in zip(rows, images)])
                ),
            }
        )
    return table


def run_sweep(
    bundle_dir: Path,
    paths: list[Path],
    precision: str,
    budget: int = 1000,
    seed: int = 0,
    backend: str = "auto",
    rules: list[tuple[float, int]] | None = None,
) -> dict[str, Any]:
    rules = rules or list(itertools.product(BOUNDS, FITS))
    bundle = Bundle.open(bundle_dir)
    images = load_images(bundle, paths, seed)
    per_image = []
    with reference_and_ours(bundle, backend, precision) as (reference, ours, where):
        for index, image in enumerate(images):
            per_image.append(
                {"image": str(paths[index]) if paths else "phantom"}
                | sweep_image(image, reference, ours, budget, seed, rules)
            )
            log.info(f"  {index + 1}/{len(images)} swept")
    return {
        **run_settings(bundle, budget, seed, precision, where),
        "images": len(per_image),
        "rules": summarise(per_image, rules),
        "per_image": per_image,
    }


def format_sweep(result: dict[str, Any]) -> str:
    lines = [
        f"stopping rules at {result['precision']} vs the fp32 {result['budget']}-sample map, "
        f"{result['images']} images",
        f"{'bound':>7}{'fits':>6}{'top-5':>8}{'Spearman':>10}{'samples':>9}{'model s':>9}",
    ]
    for rule in result["rules"]:
        lines.append(
            f"{rule['spread_bound']:>7}{rule['stable_fits']:>6}{rule['mean_top5_overlap']:>8.1%}"
            f"{rule['mean_spearman']:>10.3f}{rule['mean_samples']:>9.0f}{rule['mean_model_seconds']:>9.1f}"
            + ("  (shipped)" if rule["shipped"] else "")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("images", nargs="*", help="Images, folders or globs (default: a generated phantom).")
    parser.add_argument("--precision", default="fp32", help="Precision of the adaptive explainer.")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", type=Path, default=Path("settle_sweep.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = expand_inputs(args.images)[: args.count] if args.images else []
    result = run_sweep(args.bundle, paths, args.precision, args.budget, backend=args.backend)
    atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print(format_sweep(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
