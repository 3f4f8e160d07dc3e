"""``cxr-bench lime --fidelity``: does ``--samples auto`` keep the 1000-sample map, and what does it save?

Per real image, on the backend ``auto`` picks (OpenVINO on a CPU box), the fixed-budget fp32 map is the
reference, and ``--samples auto`` runs at ``precision`` (an int8 map is judged against the fp32 model the
clinician validated, never against another int8 map):
- top-5 overlap: shared segments among the five strongest |weights|, out of 5;
- rank correlation (Spearman) of all segment weights;
- deletion curve, on the fp32 graph: the class probability as the map's most supporting segments are removed
  one by one (the fill image shows through); a faithful map drops it fast, so a lower area under the curve
  is better;
- samples and seconds used, and the same against the fixed budget on ONNX Runtime CPU (the issue's baseline);
- with ``repeatability`` N: for the first N images, the same comparison between the reference and a second
  fixed-budget map drawn with seed + 1. Two 1000-sample maps need not share all five top segments either;
  that overlap is the ceiling an adaptive map can be held to.

Each image costs minutes on a CPU, so the rows so far are saved after every image
(``lime_fidelity.partial.json``); a rerun with the same bundle, budget, seed, precision, backends and
stopping rule reuses the rows of images already measured there or in an earlier ``lime_fidelity.json``, and
says how many. Each row keeps its reference map, so a rerun with another stopping rule or precision (same
bundle, budget, seed and reference backend) measures only ``--samples auto`` again: the fp32 map, most of an
image's cost, is reused (``references_reused``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from cxr.bench.environment import environment
from cxr.bench.lime_bench import load_images
from cxr.runtime.backends.base import ExplainerBackend
from cxr.runtime.backends.select import open_explainer
from cxr.runtime.bundle import Bundle
from cxr.runtime.explain import ExplainConfig, Explanation, explain_image, top_segments
from cxr.runtime.safe_io import atomic_write
from cxr.runtime.segment import segment_means

log = logging.getLogger(__name__)

DELETION_STEPS = 10
PARTIAL = "lime_fidelity.partial.json"


def deletion_curve(explanation: Explanation, image: np.ndarray, backend: ExplainerBackend) -> list[float]:
    """Probability of the explained class with the 0, 1, ..., DELETION_STEPS strongest supporting segments
    off."""
    segments = explanation.segments
    count = int(segments.max()) + 1
    order = [s for s in sorted(explanation.weights, key=lambda k: -explanation.weights[k])][:DELETION_STEPS]
    rows = np.ones((len(order) + 1, count), dtype=np.uint8)
    for step, segment in enumerate(order, start=1):
        rows[step:, segment] = 0
    backend.set_image(image, segment_means(image, segments), segments)
    return [float(p) for p in backend.run(rows)[:, explanation.label]]


def compare_maps(reference: Explanation, adaptive: Explanation) -> dict[str, float]:
    return compare_weights(reference.weights, adaptive.weights)


def compare_weights(reference: dict[int, float], adaptive: dict[int, float]) -> dict[str, float]:
    """Top-5 overlap and Spearman correlation of two maps' segment weights."""
    from scipy.stats import spearmanr

    top_ref, top_auto = set(top_segments(reference, 5)), set(top_segments(adaptive, 5))
    keys = sorted(reference)
    rho = spearmanr([reference[k] for k in keys], [adaptive.get(k, 0.0) for k in keys]).statistic
    return {"top5_overlap": len(top_ref & top_auto) / 5, "spearman": float(rho)}


def run_fidelity(
    bundle_dir: Path,
    out: Path,
    image_paths: list[Path],
    budget: int,
    seed: int,
    backend: str = "auto",
    baseline_images: int = 5,
    precision: str = "fp32",
    repeatability: int = 0,
    rule: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``rule``: fields of ExplainConfig for --samples auto (spread_bound, stable_fits, min_agreement, paired)
    to measure instead of the shipped values."""
    bundle = Bundle.open(bundle_dir)
    images = load_images(bundle, image_paths, seed)
    fixed_config = ExplainConfig(samples=budget, seed=seed)
    auto_config = replace(ExplainConfig(samples=budget, seed=seed, adaptive=True), **(rule or {}))
    rows = []
    with reference_and_ours(bundle, backend, precision) as (explainer, ours, where):
        settings = {**run_settings(bundle, budget, seed, precision, where), "rule": rule_of(auto_config)}
        done, references = earlier_rows(out, settings)
        for index, image in enumerate(images):
            name = str(image_paths[index]) if image_paths else "phantom"
            repeat = index < repeatability
            if name in done and (not repeat or "reference_repeat" in done[name]):
                rows.append({**done[name], "resumed": True})
                log.info(f"  {index + 1}/{len(images)}: measured by an earlier run, reused")
                continue
            known = references.get(name)
            if known is not None and repeat and "reference_repeat" not in known:
                known = None
            rows.append(measure_image(image, name, explainer, ours, fixed_config, auto_config, repeat, known))
            log.info(
                f"  {index + 1}/{len(images)}: top-5 overlap {rows[-1]['top5_overlap']:.1f}, "
                f"{rows[-1]['samples_auto']} samples, {rows[-1]['seconds_auto']:.2f} s vs "
                f"{rows[-1]['seconds_fixed']:.2f} s" + (" (reference map reused)" if known else "")
            )
            save_partial(out, settings, rows)
    baseline = ort_cpu_baseline(bundle, images[:baseline_images], fixed_config)
    resumed = sum(bool(r.get("resumed")) for r in rows)
    reused = sum(bool(r.get("reference_reused")) and not r.get("resumed") for r in rows)
    if resumed or reused:
        log.info(
            f"reused {resumed} of {len(rows)} images measured by an earlier run with the same settings, and "
            f"the reference maps of {reused} more"
        )
    summary = {
        **settings,
        "environment": environment(),
        "arch": bundle.card.arch,
        "input_size": bundle.card.input.size,
        "images": len(rows),
        "images_resumed": resumed,
        "references_reused": reused,
        "mean_top5_overlap": float(np.mean([r["top5_overlap"] for r in rows])),
        "same_label": float(np.mean([r["same_label"] for r in rows])),
        "mean_spearman": float(np.mean([r["spearman"] for r in rows])),
        "mean_deletion_auc_fixed": float(np.mean([r["deletion_auc_fixed"] for r in rows])),
        "mean_deletion_auc_auto": float(np.mean([r["deletion_auc_auto"] for r in rows])),
        "mean_samples_auto": float(np.mean([r["samples_auto"] for r in rows])),
        "mean_seconds_fixed": float(np.mean([r["seconds_fixed"] for r in rows])),
        "mean_seconds_auto": float(np.mean([r["seconds_auto"] for r in rows])),
        "ort_cpu_fixed_seconds": baseline,
        "per_image": rows,
    }
    repeats = [r for r in rows if "reference_repeat" in r]
    if repeats:  # the reference against itself at another seed, and auto on the same images
        summary["reference_repeat"] = {
            "images": len(repeats),
            "mean_top5_overlap": float(np.mean([r["reference_repeat"]["top5_overlap"] for r in repeats])),
            "mean_spearman": float(np.mean([r["reference_repeat"]["spearman"] for r in repeats])),
            "auto_mean_top5_overlap_same_images": float(np.mean([r["top5_overlap"] for r in repeats])),
        }
    summary["auto_vs_fixed_time"] = summary["mean_seconds_auto"] / summary["mean_seconds_fixed"]
    summary["auto_vs_ort_cpu_fixed_time"] = summary["mean_seconds_auto"] / baseline if baseline else None
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "lime_fidelity.json", json.dumps(summary, indent=2) + "\n")
    (out / PARTIAL).unlink(missing_ok=True)
    plot_fidelity(summary, out / "lime_fidelity.png")
    log.info(f"wrote {out / 'lime_fidelity.json'} and {out / 'lime_fidelity.png'}")
    return summary


@contextmanager
def reference_and_ours(
    bundle: Bundle, backend: str, precision: str
) -> Iterator[tuple[ExplainerBackend, ExplainerBackend, dict[str, str]]]:
    """The fp32 reference explainer and ours at ``precision`` on the same backend kind (so only the precision
    differs), and where each runs."""
    explainer, reason = open_explainer(bundle, backend, "fp32")
    with ExitStack() as stack:
        stack.enter_context(explainer)
        ours, ours_reason = explainer, reason
        if precision != "fp32":
            ours, ours_reason = open_explainer(bundle, explainer.name, precision)
            stack.enter_context(ours)
        yield (
            explainer,
            ours,
            {"runs_on": ours_reason.split(";")[0], "reference_runs_on": reason.split(";")[0]},
        )


def run_settings(
    bundle: Bundle, budget: int, seed: int, precision: str, where: dict[str, str]
) -> dict[str, Any]:
    """What makes two runs' maps comparable (a rerun reuses rows only when all of it matches)."""
    return {
        "maps_explain": "the reference's class",
        "model": bundle.digest,
        "budget": budget,
        "seed": seed,
        "precision": precision,
        **where,
    }


def rule_of(config: ExplainConfig) -> dict[str, Any]:
    """The stopping rule ``--samples auto`` ran under."""
    return {
        "spread_bound": config.spread_bound,
        "stable_fits": config.stable_fits,
        "min_agreement": config.min_agreement,
        "sampler": "paired" if config.paired else "plain",
        "min_samples": config.min_samples,
        "round_size": config.round_size,
    }


REFERENCE_SETTINGS = ("maps_explain", "model", "budget", "seed", "reference_runs_on")


def measure_reference(
    image: np.ndarray, explainer: ExplainerBackend, fixed_config: ExplainConfig, repeat: bool
) -> dict[str, Any]:
    """The fixed-budget fp32 map's part of a row (kept, so another stopping rule can reuse it); with
    ``repeat``, also that map against itself drawn at seed + 1."""
    started = time.perf_counter()
    reference = explain_image(image, explainer, fixed_config)
    known: dict[str, Any] = {
        "label": reference.label,
        "reference_weights": {str(k): v for k, v in sorted(reference.weights.items())},
        "seconds_fixed": time.perf_counter() - started,
        "curve_fixed": deletion_curve(reference, image, explainer),
    }
    if repeat:
        second = explain_image(image, explainer, replace(fixed_config, seed=fixed_config.seed + 1))
        known["reference_repeat"] = compare_maps(reference, second)
    return known


def measure_image(
    image: np.ndarray,
    name: str,
    explainer: ExplainerBackend,
    ours: ExplainerBackend,
    fixed_config: ExplainConfig,
    auto_config: ExplainConfig,
    repeat: bool = False,
    known: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One image's row: the fixed-budget fp32 map (``explainer``, or ``known`` from an earlier row) against
    ``--samples auto`` on ``ours``, with deletion curves, samples and seconds.

    Both maps explain the reference's class: where an int8 graph ranks a near tie the other way, comparing
    maps of two different classes would measure that flip (int8 parity counts it), not the sampling.
    ``same_label`` records whether ``ours`` ranks the same class first."""
    reference = known or measure_reference(image, explainer, fixed_config, repeat)
    weights = {int(k): v for k, v in reference["reference_weights"].items()}
    started = time.perf_counter()
    adaptive = explain_image(image, ours, auto_config, label=reference["label"])
    auto_s = time.perf_counter() - started
    curves = {"fixed": reference["curve_fixed"], "auto": deletion_curve(adaptive, image, explainer)}
    row: dict[str, Any] = {
        "image": name,
        "label": reference["label"],
        "same_label": adaptive.explainer_top == reference["label"],
        **compare_weights(weights, adaptive.weights),
        "deletion_auc_fixed": float(np.mean(curves["fixed"])),
        "deletion_auc_auto": float(np.mean(curves["auto"])),
        "curves": curves,
        "samples_auto": adaptive.samples,
        "stopped": adaptive.stopped,
        "seconds_fixed": reference["seconds_fixed"],
        "seconds_auto": auto_s,
        **{
            k: reference[k]
            for k in ("reference_weights", "curve_fixed", "reference_repeat")
            if k in reference
        },
    }
    if known:
        row["reference_reused"] = True
    return row


def earlier_rows(
    out: Path, settings: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """By image, from an interrupted (partial) or finished run in ``out``: the rows measured with these
    settings, and the reference maps of rows measured with the same reference (any rule or precision)."""
    rows: dict[str, dict[str, Any]] = {}
    references: dict[str, dict[str, Any]] = {}
    for name in ("lime_fidelity.json", PARTIAL):
        try:
            earlier = json.loads((out / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(earlier, dict):
            continue
        measured = [r for r in earlier.get("per_image", []) if r.get("image") != "phantom"]
        if all(earlier.get(k) == settings[k] for k in REFERENCE_SETTINGS):
            references.update({r["image"]: r for r in measured if "reference_weights" in r})
        if all(earlier.get(k) == v for k, v in settings.items()):
            rows.update({r["image"]: r for r in measured})
    return rows, references


def save_partial(out: Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The rows so far, so an interrupted run loses at most the image it was on."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / PARTIAL, json.dumps({**settings, "per_image": rows}, indent=2) + "\n")


def ort_cpu_baseline(bundle: Bundle, images: list[np.ndarray], config: ExplainConfig) -> float | None:
    """Mean seconds of the fixed-budget explanation on ONNX Runtime CPU (the issue's baseline)."""
    from cxr.runtime.backends.onnxruntime import CPU_EP, OrtExplainer

    path = bundle.onnx_path("explain", "fp32")
    with OrtExplainer(path, "fp32", [CPU_EP], data=bundle.verified_bytes(path.name)) as explainer:
        explainer.warm_up(bundle.card.input.size)
        times = []
        for image in images:
            started = time.perf_counter()
            explain_image(image, explainer, config)
            times.append(time.perf_counter() - started)
    return float(np.mean(times)) if times else None


def format_fidelity(s: dict[str, Any]) -> str:
    base, repeat = s["auto_vs_ort_cpu_fixed_time"], s.get("reference_repeat")
    return "\n".join(
        [
            f"--samples auto at {s['precision']} vs {s['budget']} samples at fp32, {s['arch']} @ "
            f"{s['input_size']}, {s['images']} images, {s['runs_on']}; same label {s['same_label']:.0%}",
            f"top-5 overlap {s['mean_top5_overlap']:.1%}, Spearman {s['mean_spearman']:.3f}, deletion AUC "
            f"{s['mean_deletion_auc_auto']:.3f} (auto) vs {s['mean_deletion_auc_fixed']:.3f} (fixed; lower "
            "is better)",
            f"samples {s['mean_samples_auto']:.0f} of {s['budget']}; seconds {s['mean_seconds_auto']:.3f} vs "
            f"{s['mean_seconds_fixed']:.3f} ({s['auto_vs_fixed_time']:.2f}x)"
            + (
                f"; vs {s['budget']} samples on ONNX Runtime CPU {s['ort_cpu_fixed_seconds']:.3f} s "
                f"({base:.2f}x)"
                if base
                else ""
            ),
        ]
        + (
            [
                f"the {s['budget']}-sample map against itself at seed + 1 ({repeat['images']} images): top-5 "
                f"overlap {repeat['mean_top5_overlap']:.1%}, Spearman {repeat['mean_spearman']:.3f} (auto on "
                f"those images: {repeat['auto_mean_top5_overlap_same_images']:.1%})"
            ]
            if repeat
            else []
        )
    )


def plot_fidelity(s: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.arange(DELETION_STEPS + 1)
    for key, colour in (("fixed", "tab:blue"), ("auto", "tab:orange")):
        curves = [r["curves"][key] for r in s["per_image"]]
        width = min(len(c) for c in curves)
        left.plot(
            steps[:width],
            np.mean([c[:width] for c in curves], axis=0),
            marker="o",
            color=colour,
            label=f"{key} (AUC {s[f'mean_deletion_auc_{key}']:.3f})",
        )
    left.set_xlabel("strongest supporting segments removed")
    left.set_ylabel("probability of the explained class")
    left.set_title("deletion curve (mean): lower = more faithful")
    left.legend()
    right.scatter(
        [r["samples_auto"] for r in s["per_image"]], [r["top5_overlap"] for r in s["per_image"]], alpha=0.6
    )
    right.set_xlabel("samples used by --samples auto")
    right.set_ylabel("top-5 overlap with the fixed map")
    right.set_ylim(-0.05, 1.05)
    right.set_title(
        f"{s['images']} images: mean overlap {s['mean_top5_overlap']:.0%}, "
        f"{s['mean_samples_auto']:.0f} samples"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
