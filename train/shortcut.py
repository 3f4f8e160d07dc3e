"""How far trivial image statistics get: the shortcut baseline (DeGrave et al. 2021).

Features: aspect ratio and size of the original file, intensity percentiles, mean/std, and an 8x8
thumbnail of the whole image. A random forest on those is the number a network must clearly beat
before anyone believes it looked at the lungs.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from cxr.runtime.metrics import classification_report
from cxr.train.data import LoadedImages


def shortcut_features(loaded: LoadedImages) -> np.ndarray:
    rows = []
    for image, (height, width) in zip(loaded.images, loaded.original_shapes):
        thumb = cv2.resize(image, (8, 8), interpolation=cv2.INTER_AREA).astype(np.float32).ravel() / 255.0
        stats = np.percentile(image, [1, 5, 25, 50, 75, 95, 99]) / 255.0
        rows.append(
            np.concatenate(
                [
                    [
                        width / height,
                        np.log(height),
                        np.log(width),
                        image.mean() / 255.0,
                        image.std() / 255.0,
                    ],
                    stats,
                    thumb,
                ]
            )
        )
    return np.asarray(rows, dtype=np.float32)


# which columns of ``shortcut_features`` each kind of statistic fills
FEATURE_GROUPS = {
    "file size and shape": slice(0, 3),
    "intensity statistics": slice(3, 12),
    "8x8 thumbnail": slice(12, None),
}


def _forest_predictions(train_x: np.ndarray, labels: np.ndarray, test_x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=300, random_state=seed, n_jobs=-1, class_weight="balanced")
    return model.fit(train_x, labels).predict(test_x)


def describe_feature_parts(parts: dict[str, float]) -> str:
    return "the baseline from one kind of statistic alone: " + ", ".join(
        f"{k} {v:.3f}" for k, v in parts.items()
    )


def shortcut_baseline(
    train: LoadedImages, test: LoadedImages, classes: tuple[str, ...], seed: int = 0
) -> tuple[dict[str, Any], np.ndarray]:
    """The baseline's report and its class for each test image (a random forest on image statistics of the
    raw films). The report adds the accuracy from each kind of statistic alone: where in these films the class
    shows without any anatomy (file size, overall brightness, or the layout a tiny thumbnail keeps)."""
    train_x, test_x = shortcut_features(train), shortcut_features(test)
    predicted = _forest_predictions(train_x, train.labels, test_x, seed)
    report = classification_report(test.labels, predicted, classes)
    report["accuracy_by_features"] = {
        name: float(
            np.mean(_forest_predictions(train_x[:, cols], train.labels, test_x[:, cols], seed) == test.labels)
        )
        for name, cols in FEATURE_GROUPS.items()
    }
    return report, predicted
