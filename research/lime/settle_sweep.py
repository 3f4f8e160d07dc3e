"""Tune ``--samples auto``'s stopping rule with one model pass per image.

``--samples auto`` with lime's plain rows (``--sampler plain``) draws the same rows as the fixed budget (same
seed), only fewer of them. So one full
fixed-budget pass of ``ours`` (e.g. the int8 explainer) per image, taped, answers every stopping rule: each
rule replays the tape and stops where it would have stopped. Each stop is scored against the fp32
fixed-budget map, as ``cxr-bench lime --fidelity`` scores it (top-5 overlap, samples). Cost per image: one
fp32 map and one pass of ``ours``, whatever the number of rules.

A rule is (spread bound, equal fits, bootstrap top-k agreement; see runtime/settle.py). With ``--tapes DIR``
each image's tape and reference map are kept there, so a rerun (another grid, or after an interruption)
replays them without running a model; the table is written after every image.

Tune on images other than those the fidelity benchmark reports on. The sweep replays plain rows: the fixed
budget's, which the fp32 reference map is drawn from. Paired rows (``--samples auto``'s default) settle
sooner under the same rule; ``cxr-bench lime --fidelity --sampler`` measures both.

    python -m research.lime.settle_sweep BUNDLE IMAGES... --precision int8 --tapes tapes/ --out sweep.json
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from cxr.bench.lime_bench import load_images
from cxr.bench.lime_fidelity import compare_weights, reference_and_ours, run_settings
from cxr.runtime.backends.base import ExplainerBackend
from cxr.runtime.bundle import Bundle
from cxr.runtime.errors import CxrError
from cxr.runtime.explain import ExplainConfig, explain_image
from cxr.runtime.inputs import expand_inputs
from cxr.runtime.safe_io import atomic_output, atomic_write
from cxr.runtime.settle import MIN_AGREEMENT, SPREAD_BOUND, STABLE_FITS

log = logging.getLogger(__name__)

BOUNDS = (0.1, 0.15, 0.25)
FITS = (2, 3, 4)
AGREEMENTS = (0.0, 0.8, 0.85, 0.9)


@dataclass(frozen=True)
class Rule:
    """One stopping rule: ExplainConfig's spread_bound, stable_fits and min_agreement."""

    spread_bound: float
    stable_fits: int
    min_agreement: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.spread_bound}/{self.stable_fits}/{self.min_agreement}"

    @property
    def shipped(self) -> bool:
        return (self.spread_bound, self.stable_fits, self.min_agreement) == (
            SPREAD_BOUND,
            STABLE_FITS,
            MIN_AGREEMENT,
        )


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

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "rows": np.concatenate(self.rows),
            "probs": np.concatenate(self.probs),
            "batches": np.array([len(r) for r in self.rows]),
        }

    def load(self, saved: dict[str, np.ndarray]) -> Tape:
        """The batches of a saved tape (``arrays``), ready to replay."""
        ends = np.cumsum(saved["batches"])[:-1]
        self.rows, self.probs = np.split(saved["rows"], ends), np.split(saved["probs"], ends)
        return self.replay()

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
    rules: list[Rule],
    saved: Path | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The fp32 fixed-budget map, one taped fixed-budget pass of ``ours``, and each rule's stop scored
    against that map. ``saved``: an .npz that holds (or will hold) the tape and the reference map of this
    image under these ``settings``."""
    fixed = ExplainConfig(samples=budget, seed=seed)
    tape = Tape(ours)
    taped = read_tape(saved, settings or {}) if saved else None
    if taped is not None:
        reference_weights, label = tape_reference(taped), int(taped["label"])
        seconds_per_row = float(taped["seconds_per_row"])
        tape.load(taped)
        full = explain_image(image, tape, fixed, label=label)
    else:
        if ours is reference_backend:  # an fp32 sweep: the reference pass is the full pass, taped once
            reference = full = explain_image(image, tape, fixed)
        else:
            reference = explain_image(image, reference_backend, fixed)
            full = explain_image(image, tape, fixed, label=reference.label)
        reference_weights, label = reference.weights, reference.label
        seconds_per_row = full.timing["model_s"] / max(1, full.samples)
        if saved:
            save_tape(saved, settings or {}, tape, reference_weights, label, seconds_per_row)
    scores = {rule.key: replay_stop(image, tape, fixed, rule, reference_weights, label) for rule in rules}
    return {
        "full_budget_vs_reference": compare_weights(reference_weights, full.weights),
        "seconds_per_row": seconds_per_row,
        "rules": scores,
    }


def replay_stop(
    image: np.ndarray,
    tape: Tape,
    fixed: ExplainConfig,
    rule: Rule,
    reference: dict[int, float],
    label: int,
) -> dict[str, Any]:
    """Where ``rule`` stops on the rows ``tape`` holds for ``fixed`` (``explain_image`` itself, replayed), and
    that map against ``reference``."""
    config = replace(
        fixed,
        adaptive=True,
        spread_bound=rule.spread_bound,
        stable_fits=rule.stable_fits,
        min_agreement=rule.min_agreement,
    )
    stop = explain_image(image, tape.replay(), config, label=label)
    return {**compare_weights(reference, stop.weights), "samples": stop.samples}


def save_tape(
    path: Path,
    settings: dict[str, Any],
    tape: Tape,
    reference: dict[int, float],
    label: int,
    seconds_per_row: float,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted(reference)
    with atomic_output(path) as tmp, open(tmp, "wb") as file:
        np.savez_compressed(
            file,
            **tape.arrays(),
            reference_segments=np.array(keys),
            reference_weights=np.array([reference[k] for k in keys]),
            label=np.array(label),
            seconds_per_row=np.array(seconds_per_row),
            settings=np.array(json.dumps(settings, sort_keys=True)),
        )


def read_tape(path: Path, settings: dict[str, Any] | None = None) -> dict[str, np.ndarray] | None:
    """A saved tape's arrays; None when there is none, or (with ``settings``) it was saved under others."""
    try:
        with np.load(path) as saved:
            arrays = dict(saved)
    except (OSError, ValueError):
        return None
    if settings is not None and str(arrays["settings"]) != json.dumps(settings, sort_keys=True):
        return None
    return arrays


def open_tape(tapes: Path, image: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The sweep's tape of ``image`` in ``tapes`` and its settings; a clear error when there is none."""
    taped = read_tape(tapes / tape_name(str(image)))
    if taped is None:
        raise CxrError(f"{image}: no tape in {tapes}; run research.lime.settle_sweep --tapes {tapes} first")
    return taped, json.loads(str(taped["settings"]))


def tape_reference(arrays: dict[str, np.ndarray]) -> dict[int, float]:
    """The fp32 fixed-budget map saved beside a tape."""
    return dict(zip(arrays["reference_segments"].tolist(), arrays["reference_weights"].tolist()))


def tape_name(image: Path | str) -> str:
    """A tape's file name: the image's stem and a hash of its whole path (two folders may share a stem)."""
    digest = hashlib.sha256(str(image).encode()).hexdigest()[:10]
    return f"{Path(str(image)).stem[:60]}-{digest}.npz"


def summarise(images: list[dict[str, Any]], rules: list[Rule]) -> list[dict[str, Any]]:
    """Per rule: mean top-5 overlap, the share of images under 0.8, mean samples and the model seconds those
    samples cost."""
    table = []
    for rule in rules:
        rows = [image["rules"][rule.key] for image in images]
        table.append(
            {
                "spread_bound": rule.spread_bound,
                "stable_fits": rule.stable_fits,
                "min_agreement": rule.min_agreement,
                "shipped": rule.shipped,
                "mean_top5_overlap": float(np.mean([r["top5_overlap"] for r in rows])),
                "images_below_0.8": float(np.mean([r["top5_overlap"] < 0.8 for r in rows])),
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
    rules: list[Rule] | None = None,
    tapes: Path | None = None,
    out: Path | None = None,
) -> dict[str, Any]:
    """Every rule on every image; with ``out``, the table so far is written after each image."""
    rules = rules or [Rule(*r) for r in itertools.product(BOUNDS, FITS, AGREEMENTS)]
    bundle = Bundle.open(bundle_dir)
    images = load_images(bundle, paths, seed)
    per_image: list[dict[str, Any]] = []
    with reference_and_ours(bundle, backend, precision) as (reference, ours, where):
        settings = run_settings(bundle, budget, seed, precision, where)
        for index, image in enumerate(images):
            name = str(paths[index]) if paths else "phantom"
            saved = tapes / tape_name(name) if tapes else None
            per_image.append(
                {"image": name}
                | sweep_image(image, reference, ours, budget, seed, rules, saved, {**settings, "image": name})
            )
            log.info(f"  {index + 1}/{len(images)} swept")
            result = {
                **settings,
                "images": len(per_image),
                "rules": summarise(per_image, rules),
                "per_image": per_image,
            }
            if out:
                atomic_write(out, json.dumps(result, indent=2) + "\n")
    return result


def format_sweep(result: dict[str, Any]) -> str:
    lines = [
        f"stopping rules at {result['precision']} vs the fp32 {result['budget']}-sample map, "
        f"{result['images']} images",
        f"{'bound':>7}{'fits':>6}{'agree':>7}{'top-5':>8}{'<0.8':>7}{'Spearman':>10}{'samples':>9}"
        f"{'model s':>9}",
    ]
    for rule in result["rules"]:
        lines.append(
            f"{rule['spread_bound']:>7}{rule['stable_fits']:>6}{rule['min_agreement']:>7}"
            f"{rule['mean_top5_overlap']:>8.1%}{rule['images_below_0.8']:>7.0%}{rule['mean_spearman']:>10.3f}"
            f"{rule['mean_samples']:>9.0f}{rule['mean_model_seconds']:>9.1f}"
            + ("  (shipped)" if rule["shipped"] else "")
        )
    return "\n".join(lines)


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """Each rule's mean samples against its mean top-5 overlap, and the full budget at this precision: the
    most any rule can reach."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5))
    for agreement in sorted({r["min_agreement"] for r in result["rules"]}):
        rules = [r for r in result["rules"] if r["min_agreement"] == agreement]
        axis.scatter(
            [r["mean_samples"] for r in rules],
            [r["mean_top5_overlap"] for r in rules],
            label=f"agreement {agreement}" if agreement else "no agreement condition",
            alpha=0.75,
        )
    shipped = [r for r in result["rules"] if r["shipped"]]
    for rule in shipped:
        axis.annotate(
            "shipped",
            (rule["mean_samples"], rule["mean_top5_overlap"]),
            textcoords="offset points",
            xytext=(6, -12),
        )
    ceiling = float(
        np.mean([image["full_budget_vs_reference"]["top5_overlap"] for image in result["per_image"]])
    )
    axis.axhline(
        ceiling, color="grey", linestyle="--", label=f"{result['budget']} samples at {result['precision']}"
    )
    axis.axhline(0.9, color="tab:red", linestyle=":", label="target 90 %")
    axis.set_xlabel("mean samples used")
    axis.set_ylabel("mean top-5 overlap with the fp32 map")
    axis.set_title(f"stopping rules at {result['precision']}, {result['images']} images")
    axis.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    parser.add_argument("--tapes", type=Path, help="Keep each image's tape and reference map here.")
    parser.add_argument("--out", type=Path, default=Path("settle_sweep.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = expand_inputs(args.images)[: args.count] if args.images else []
    result = run_sweep(
        args.bundle, paths, args.precision, args.budget, backend=args.backend, tapes=args.tapes, out=args.out
    )
    plot_sweep(result, args.out.with_suffix(".png"))
    print(format_sweep(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
