"""``cxr-train evaluate``: a run's metrics on labelled images, next to the shortcut baseline.

When DATA is the folder the run was trained on, only its validation split is used (the training
images would flatter the model). The baseline is trained on the run's training split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from cxr.runtime.errors import CxrError
from cxr.runtime.metrics import classification_report, format_report
from cxr.train.augment import evaluation_view
from cxr.train.data import Sample, load_images, scan_image_folder
from cxr.train.fit import predict_probs
from cxr.train.plots import plot_confusion
from cxr.train.run import load_run, read_split
from cxr.train.shortcut import shortcut_baseline


def evaluate(run: Path, data: Path, out: Path | None = None, batch_size: int = 16) -> dict[str, Any]:
    card, model = load_run(run)
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
    loaded = load_images(samples, size, "loading")
    if not loaded.images:
        raise CxrError(f"{data}: no readable images")
    views = [evaluation_view(im, size) for im in loaded.images]
    probs = predict_probs(model.net, model.adapter, views, torch.device("cpu"), batch_size)
    report = classification_report(loaded.labels, probs.argmax(1), classes)
    result: dict[str, Any] = {"run": str(run), "data": str(data), "scope": scope, "model": report,
                              "skipped": [{"file": f, "error": e} for f, e in loaded.skipped]}
    baseline_train = _baseline_training_samples(trained_on, split, classes)
    if baseline_train:
        train_loaded = load_images(baseline_train, size, "loading baseline")
        result["shortcut_baseline"] = shortcut_baseline(train_loaded, loaded, classes)
    out = Path(out) if out else Path(run) / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot_confusion(report["confusion"], classes, out.with_suffix(".png"), f"{card.arch}: {scope}")
    print(format_report(report, f"{card.arch} on {data} ({scope})"))
    if "shortcut_baseline" in result:
        print()
        print(format_report(result["shortcut_baseline"], "shortcut baseline (image statistics only, same images)"))
        gain = report["accuracy"] - result["shortcut_baseline"]["accuracy"]
        print(f"\nthe network adds {gain * 100:+.1f} accuracy points over image statistics alone")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


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

