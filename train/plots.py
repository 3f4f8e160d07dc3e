"""Pictures people would rather look at than read: confusion matrix and training curves (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from cxr.runtime.safe_io import atomic_output


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    image = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=35, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    ax.set_title(title or "confusion matrix")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_output(path) as tmp:  # never through a link planted in the run folder
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    left.plot(epochs, [h["val_loss"] for h in history], marker="o", label="val loss")
    left.set_xlabel("epoch")
    left.legend()
    right.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="val accuracy")
    right.plot(epochs, [h["val_macro_f1"] for h in history], marker="o", label="val macro-F1")
    right.set_ylim(0, 1.02)
    right.set_xlabel("epoch")
    right.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:  # never through a link planted in the run folder
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
