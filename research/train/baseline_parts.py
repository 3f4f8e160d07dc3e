"""Which image statistics carry the shortcut baseline, per feature group (seed-0 patient-disjoint split).

Usage (repository root): python -m research.train.baseline_parts ../shared/data/cxr4-train
"""

import sys
from pathlib import Path

import numpy as np
from cxr.train.data import load_images, scan_image_folder, split_samples
from cxr.train.shortcut import shortcut_features
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import f1_score

data = Path(sys.argv[1])
classes, samples = scan_image_folder(data)
train, val = split_samples(samples, 0.2, 0)
tr, va = load_images(train, 224), load_images(val, 224)
ftr, fva = shortcut_features(tr), shortcut_features(va)
groups = {
    "all": slice(0, None),
    "size+aspect": slice(0, 3),
    "mean/std+percentiles": slice(3, 12),
    "8x8 thumbnail": slice(12, None),
    "no size": slice(3, None),
}
for name, cols in groups.items():
    m = RandomForestClassifier(n_estimators=300, random_state=0, n_jobs=-1, class_weight="balanced").fit(
        ftr[:, cols], tr.labels
    )
    p = m.predict(fva[:, cols])
    f1 = f1_score(va.labels, p, average=None)
    print(
        f"{name:22s} acc {np.mean(p == va.labels):.3f}  F1 "
        + " ".join(f"{c[:8]} {v:.2f}" for c, v in zip(classes, f1))
    )
# original sizes per class
for i, c in enumerate(classes):
    shapes = np.array([s for s, label in zip(tr.original_shapes, tr.labels) if label == i])
    print(c, "median HxW", np.median(shapes, 0), "IQR h", np.percentile(shapes[:, 0], [25, 75]))
