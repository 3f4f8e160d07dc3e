"""Classification metrics shared by evaluate (train) and parity (export): numpy + scikit-learn only."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from cxr.runtime.labels import COVID_CLASS
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def classification_report(
    y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, per-class P/R/F1, macro F1, confusion matrix, and COVID-19-vs-rest (the paper's Table 1)."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    report: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(np.mean(f1)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    if COVID_CLASS in classes:
        covid = list(classes).index(COVID_CLASS)
        p, r, f, _ = precision_recall_fscore_support(
            y_true == covid, y_pred == covid, average="binary", zero_division=0
        )
        report["covid_vs_rest"] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    return report


def format_report(report: dict[str, Any], title: str = "") -> str:
    """A plain-text table a person reads in a terminal."""
    lines = [title] if title else []
    lines.append(f"accuracy {report['accuracy']:.3f}   macro-F1 {report['macro_f1']:.3f}   n={report['n']}")
    lines.append(f"{'class':<22}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    for name, m in report["per_class"].items():
        lines.append(
            f"{name:<22}{m['precision']:>10.3f}{m['recall']:>10.3f}{m['f1']:>10.3f}{m['support']:>9d}"
        )
    if "covid_vs_rest" in report:
        c = report["covid_vs_rest"]
        lines.append(f"{'covid19 vs rest':<22}{c['precision']:>10.3f}{c['recall']:>10.3f}{c['f1']:>10.3f}")
    return "\n".join(lines)
