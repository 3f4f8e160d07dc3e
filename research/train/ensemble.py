"""Do runs trained on the same split gain together what none gains alone? Averages their softmax outputs (and
optionally a horizontally flipped view), then scores each run and the average against the shortcut baseline
with the project's paired bootstrap. A probe for issue 15, not a feature: a deployed ensemble costs one
network per member.

Usage (repository root): python -m research.train.ensemble ../shared/data/cxr4-train RUN [RUN ...]
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from cxr.runtime.metrics import classification_report
from cxr.train.augment import evaluation_view
from cxr.train.data import load_images, scan_image_folder
from cxr.train.evaluate import _baseline_training_samples
from cxr.train.fit import predict_probs
from cxr.train.intervals import bootstrap
from cxr.train.run import load_run, read_split
from cxr.train.shortcut import shortcut_baseline

data, runs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
split = read_split(runs[0])
assert all(read_split(r) == split for r in runs), "the runs must share one validation split"
probs, flipped = {}, {}
for run in runs:
    card, model = load_run(run)
    classes, samples = scan_image_folder(data, card.classes)
    val_samples = [s for s in samples if s.rel in set(split["val"])]
    loaded = load_images(val_samples, card.input.size, "loading", pre=card.preprocessing)
    views = [evaluation_view(im, card.input.size, card.preprocessing) for im in loaded.images]
    mirrored = [np.ascontiguousarray(v[:, ::-1]) for v in views]
    probs[run.name] = predict_probs(model.net, model.adapter, views, torch.device("cpu"), 16)
    flipped[run.name] = predict_probs(model.net, model.adapter, mirrored, torch.device("cpu"), 16)
labels = loaded.labels
raw_test = load_images(loaded.samples, card.input.size, "baseline test")
raw_train = load_images(_baseline_training_samples(data, split, classes), card.input.size, "baseline train")
baseline_report, baseline = shortcut_baseline(raw_train, raw_test, classes, 0)

candidates = {name: p for name, p in probs.items()}
candidates.update({f"{name} + flip": (p + flipped[name]) / 2 for name, p in probs.items()})
candidates["average of all"] = sum(probs.values()) / len(probs)
candidates["average of all + flip"] = (sum(probs.values()) + sum(flipped.values())) / (2 * len(probs))
rows = {}
print(f"shortcut baseline accuracy {baseline_report['accuracy']:.3f} on {len(labels)} images")
print("| predictor | accuracy [95 %] | gain, points [95 %] | F1 bacterial | F1 viral |")
print("|---|---|---|---|---|")
for name, p in candidates.items():
    predicted = p.argmax(1)
    report = classification_report(labels, predicted, classes)
    intervals = bootstrap(labels, predicted, baseline, classes, seed=0)
    gain = intervals["gain_over_baseline"]
    low, high = intervals["accuracy"]
    g_low, g_high = gain["interval_points"]
    f1 = {c: report["per_class"][c]["f1"] for c in classes}
    rows[name] = {"accuracy": report["accuracy"], "interval": [low, high], "gain": gain, "f1": f1}
    print(
        f"| {name} | {report['accuracy']:.3f} [{low:.3f}, {high:.3f}] | {gain['points']:+.1f} "
        f"[{g_low:+.1f}, {g_high:+.1f}] | {f1['pneumonia_bacterial']:.3f} | {f1['pneumonia_viral']:.3f} |"
    )
Path("ensemble.json").write_text(json.dumps({"baseline": baseline_report, "rows": rows}, indent=2) + "\n")
