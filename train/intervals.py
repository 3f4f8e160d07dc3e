"""Bootstrap 95 % intervals for an evaluation: per-class precision/recall/F1, accuracy, and the model's gain
over the shortcut baseline, resampling images with the two models paired (the same draw scores both). A
proportion observed at exactly 0 or 1 gets the exact (Clopper-Pearson) interval instead: a bootstrap cannot
move it, and [1, 1] would claim a certainty that n images cannot give."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

ROUNDS = 1000


def class_counts(
    y_true: np.ndarray, y_pred: np.ndarray, classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: right answers, images predicted as the class, images of the class."""
    confusion = np.bincount(y_true * classes + y_pred, minlength=classes * classes).reshape(classes, classes)
    return np.diag(confusion), confusion.sum(0), confusion.sum(1)


def per_class_prf(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    """classes x 3 array of precision, recall, F1 (0 where undefined, as scikit-learn's zero_division=0)."""
    hits, predicted, actual = class_counts(y_true, y_pred, classes)
    hits = hits.astype(np.float64)
    precision = np.divide(hits, predicted, out=np.zeros(classes), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros(classes), where=actual > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros(classes), where=total > 0)
    return np.stack([precision, recall, f1], axis=1)


def _interval(values: np.ndarray) -> list[float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return [round(float(low), 4), round(float(high), 4)]


def exact_edge(hits: int, n: int, confidence: float = 0.95) -> list[float] | None:
    """Clopper-Pearson interval of a proportion observed at exactly 0 or 1, where every bootstrap resample
    gives the same value and the percentile interval would claim certainty ([1, 1] for 24 of 24). None
    otherwise (the bootstrap is used) or when there is nothing to count."""
    if n == 0 or 0 < hits < n:
        return None
    bound = ((1 - confidence) / 2) ** (1 / n)
    return [round(bound, 4), 1.0] if hits == n else [0.0, round(1 - bound, 4)]


def _harmonic(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else round(2 * a * b / (a + b), 4)


def _mend_edges(
    result: dict[str, Any], y_true: np.ndarray, model: np.ndarray, classes: Sequence[str]
) -> None:
    """Exact intervals where the sample is all right or all wrong; F1 from its precision and recall bounds."""
    hits = int(np.sum(y_true == model))
    result["accuracy"] = exact_edge(hits, len(y_true)) or result["accuracy"]
    right, predicted, actual = (c.tolist() for c in class_counts(y_true, model, len(classes)))
    for i, name in enumerate(classes):
        row = result["per_class"][name]
        edges = {
            "precision": exact_edge(right[i], predicted[i]),
            "recall": exact_edge(right[i], actual[i]),
        }
        for metric, edge in edges.items():
            row[metric] = edge or row[metric]
        if any(edges.values()) and row["f1"][0] == row["f1"][1]:
            row["f1"] = [_harmonic(row["precision"][k], row["recall"][k]) for k in (0, 1)]


def bootstrap(
    y_true: Sequence[int],
    model: Sequence[int],
    baseline: Sequence[int] | None,
    classes: Sequence[str],
    rounds: int = ROUNDS,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile intervals over ``rounds`` resamples of the images (seeded: the same inputs give the same
    report)."""
    y_true, model = np.asarray(y_true, dtype=np.int64), np.asarray(model, dtype=np.int64)
    base = None if baseline is None else np.asarray(baseline, dtype=np.int64)
    count, n = len(classes), len(y_true)
    rng = np.random.default_rng(seed)
    prf, accuracy, base_accuracy, macro_f1 = [], [], [], []
    for _ in range(rounds):
        draw = rng.integers(0, n, n)
        scores = per_class_prf(y_true[draw], model[draw], count)
        prf.append(scores)
        macro_f1.append(scores[:, 2].mean())
        accuracy.append(np.mean(y_true[draw] == model[draw]))
        if base is not None:
            base_accuracy.append(np.mean(y_true[draw] == base[draw]))
    prf_array = np.asarray(prf)
    result: dict[str, Any] = {
        "rounds": rounds,
        "seed": seed,
        "accuracy": _interval(np.asarray(accuracy)),
        "macro_f1": _interval(np.asarray(macro_f1)),
        "per_class": {
            name: {
                metric: _interval(prf_array[:, i, j])
                for j, metric in enumerate(("precision", "recall", "f1"))
            }
            for i, name in enumerate(classes)
        },
    }
    _mend_edges(result, y_true, model, classes)
    if base is not None:
        gain = np.asarray(accuracy) - np.asarray(base_accuracy)
        result["baseline_accuracy"] = exact_edge(int(np.sum(y_true == base)), n) or _interval(
            np.asarray(base_accuracy)
        )
        result["gain_over_baseline"] = {
            "points": round(100 * float(np.mean(y_true == model) - np.mean(y_true == base)), 2),
            "interval_points": [round(100 * v, 2) for v in _interval(gain)],
        }
    return result
