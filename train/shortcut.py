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


def shortcut_predictions(train: LoadedImages, test: LoadedImages, seed: int = 0) -> np.ndarray:
    """The baseline's class for each test image (a random forest on image statistics of the raw films)."""
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=300, random_state=seed, n_jobs=-1, class_weight="balanced")
    model.fit(shortcut_features(train), train.labels)
    return model.predict(shortcut_features(test))


def shortcut_baseline(
    train: LoadedImages, test: LoadedImages, classes: tuple[str, ...], seed: int = 0
) -> dict[str, Any]:
    return classification_report(test.labels, shortcut_predictions(train, test, seed), classes)
