"""``cxr-train evaluate``: a run's metrics on labelled images, next to the shortcut baseline.

When DATA is the folder the run was trained on, only its validation split is used (the training
images would flatter the model). The baseline is trained on the run's training split.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from cxr.runtime.errors import CxrError
from cxr.runtime.metrics import classification_report, format_report
from cxr.runtime.safe_io import atomic_write
from cxr.train.augment import evaluation_view
from cxr.train.data import Sample, load_images, scan_image_folder
from cxr.train.distributed import pick_device
from cxr.train.fit import predict_probs
from cxr.train.intervals import bootstrap
from cxr.train.lime_audit import lime_audit
from cxr.train.plots import plot_evaluation_page
from cxr.train.run import load_run, read_split
from cxr.train.shortcut import describe_feature_parts, shortcut_baseline

log = logging.getLogger(__name__)


def evaluate(
    run: Path,
    data: Path,
    out: Path | None = None,
    batch_size: int = 16,
    lime_audit_images: int = 0,
    lime_samples: int = 300,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Metrics with bootstrap intervals, the shortcut baseline on the same images (raw films: the shortcut
    lives there), the paired gain, and optionally the LIME audit; writes JSON and one PNG page. ``device``
    (cpu, cuda, auto) runs the network; the numbers are the same up to float rounding."""
    on = pick_device(device)
    card, model = load_run(run)
    model.to(on)
    classes, samples = scan_image_folder(data, card.classes)
    split = read_split(run)
    trained_on = Path(card.training.get("data", "")) if card.training.get("data") else None
    same_data = trained_on is not None and trained_on.resolve() == Path(data).resolve()
    scope = "all images"
    if same_data and split:
        val = set(split["val"])
        samples = [s for s in samples if s.rel in val]
        scope = "validation split of the training data"
    size = card.input.size
    loaded = load_images(samples, size, "loading", pre=card.preprocessing)
    if not loaded.images:
        raise CxrError(f"{data}: no readable images")
    views = [evaluation_view(im, size, card.preprocessing) for im in loaded.images]
    predicted = predict_probs(model.net, model.adapter, views, on, batch_size).argmax(1)
    report = classification_report(loaded.labels, predicted, classes)
    result: dict[str, Any] = {
        "run": str(run),
        "arch": card.arch,
        "data": str(data),
        "device": str(on),
        "scope": scope,
        "model": report,
        "preprocessing": asdict(card.preprocessing),
        "skipped": [{"file": f, "error": e} for f, e in loaded.skipped],
    }
    baseline = None
    baseline_train = _baseline_training_samples(trained_on, split, classes)
    if baseline_train:
        raw_test = load_images(loaded.samples, size, "loading baseline test")
        raw_train = load_images(baseline_train, size, "loading baseline")
        result["shortcut_baseline"], baseline = shortcut_baseline(raw_train, raw_test, classes, seed)
    result["intervals"] = bootstrap(loaded.labels, predicted, baseline, classes, seed=seed)
    if lime_audit_images > 0:
        picks = np.random.default_rng(seed).permutation(len(loaded.samples))[:lime_audit_images]
        result["lime_audit"] = lime_audit(
            model, card, [loaded.samples[i].path for i in picks], lime_samples, seed
        )
    out = Path(out) if out else Path(run) / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(result, indent=2) + "\n")
    plot_evaluation_page(
        result, classes, out.with_suffix(".png"), f"{card.arch} on {Path(data).name}: {scope}"
    )
    log.info(f"wrote {out} and {out.with_suffix('.png')}")
    return result


def format_evaluation(result: dict[str, Any]) -> str:
    """What ``cxr-train evaluate`` shows: the model's report, the shortcut baseline and the gain over it, the
    LIME audit."""
    lines = [format_report(result["model"], f"{result['arch']} on {result['data']} ({result['scope']})")]
    if "shortcut_baseline" in result:
        baseline = result["shortcut_baseline"]
        lines += [
            "",
            format_report(baseline, "shortcut baseline (image statistics only, same images)"),
            describe_feature_parts(baseline["accuracy_by_features"]),
        ]
        gain = result["intervals"]["gain_over_baseline"]
        low, high = gain["interval_points"]
        lines.append(
            f"\nthe network adds {gain['points']:+.1f} accuracy points over image statistics alone "
            f"(95 % interval {low:+.1f} to {high:+.1f})"
        )
    if "lime_audit" in result:
        audit = result["lime_audit"]
        lines.append(
            f"LIME audit: {100 * audit['positive_weight_outside_body']:.1f} % of positive weight lies "
            f"outside the body ({audit['images']} images, {audit['samples']} samples each)"
        )
    return "\n".join(lines)


def _baseline_training_samples(
    trained_on: Path | None, split: dict[str, list[str]] | None, classes: tuple[str, ...]
) -> list[Sample]:
    if trained_on is None or not trained_on.is_dir():
        return []
    _, samples = scan_image_folder(trained_on, classes)
    if split:
        train = set(split["train"])
        samples = [s for s in samples if s.rel in train]
    return samples
