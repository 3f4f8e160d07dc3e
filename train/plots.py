"""Pictures people would rather look at than read: confusion matrix and training curves (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from cxr.runtime.safe_io import atomic_output


def plot_confusion(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = ""
) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    image = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=35, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion):
        for j, value in enumerate(row):
            ax.text(
                j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black"
            )
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
    handles = left.get_lines()
    if all("lr" in h for h in history):  # the schedule at each epoch's end (older runs lack it)
        rate = left.twinx()
        handles += rate.plot(epochs, [h["lr"] for h in history], color="grey", ls=":", label="learning rate")
        rate.set_ylim(bottom=0)
        rate.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    left.legend(handles=handles, loc="best")
    right.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="val accuracy")
    right.plot(epochs, [h["val_macro_f1"] for h in history], marker="o", label="val macro-F1")
    if all("val_macro_f1_raw" in h for h in history):  # --ema: the averaged weights above, the live ones here
        right.plot(
            epochs, [h["val_macro_f1_raw"] for h in history], ls="--", label="val macro-F1, raw weights"
        )
    right.set_ylim(0, 1.02)
    right.set_xlabel("epoch")
    right.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:  # never through a link planted in the run folder
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _baseline_parts(base: dict[str, Any]) -> list[str]:
    """One line per kind of statistic: what alone already predicts the class (older reports lack it)."""
    parts = base.get("accuracy_by_features", {})
    return [f"   from {name} alone: {value:.3f}" for name, value in parts.items()]


def plot_evaluation_page(result: dict[str, Any], classes: Sequence[str], path: Path, title: str) -> None:
    """One page a clinician can read: per-class recall/precision with 95 % intervals next to the shortcut
    baseline, accuracy and the gain with its interval, the confusion matrix, and the LIME audit when it
    ran."""
    model, base, intervals = result["model"], result.get("shortcut_baseline"), result["intervals"]
    fig = plt.figure(figsize=(11, 8.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.1, 1])
    for column, metric in enumerate(("recall", "precision")):
        ax = fig.add_subplot(grid[0, column])
        values = [model["per_class"][c][metric] for c in classes]
        low = [values[i] - intervals["per_class"][c][metric][0] for i, c in enumerate(classes)]
        high = [intervals["per_class"][c][metric][1] - values[i] for i, c in enumerate(classes)]
        ax.bar(
            [i - 0.2 for i in range(len(classes))],
            values,
            0.4,
            yerr=[low, high],
            capsize=3,
            label="model",
            color="#2b6cb0",
        )
        if base:
            ax.bar(
                [i + 0.2 for i in range(len(classes))],
                [base["per_class"][c][metric] for c in classes],
                0.4,
                label="shortcut baseline",
                color="#bbbbbb",
            )
        ax.set_xticks(range(len(classes)), [c.replace("pneumonia_", "pneum. ") for c in classes], rotation=20)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{metric} per class (95 % bootstrap interval)")
        ax.legend(loc="lower right", fontsize=8)
    ax = fig.add_subplot(grid[1, 0])
    ax.imshow(model["confusion"], cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    peak = max(max(row) for row in model["confusion"]) or 1
    for i, row in enumerate(model["confusion"]):
        for j, value in enumerate(row):
            ax.text(
                j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black"
            )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (model)")
    ax = fig.add_subplot(grid[1, 1])
    ax.axis("off")
    acc = intervals["accuracy"]
    lines = [
        f"images: {model['n']}   ({result['scope']})",
        f"model accuracy {model['accuracy']:.3f}  [{acc[0]:.3f}, {acc[1]:.3f}]",
        f"model macro-F1 {model['macro_f1']:.3f}",
    ]
    if base:
        gain = intervals["gain_over_baseline"]
        lines += [
            f"shortcut baseline accuracy {base['accuracy']:.3f}",
            *_baseline_parts(base),
            f"gain over the baseline: {gain['points']:+.1f} points",
            f"   95 % interval [{gain['interval_points'][0]:+.1f}, {gain['interval_points'][1]:+.1f}]",
            "   "
            + (
                "the network beats image statistics"
                if gain["interval_points"][0] > 0
                else "NOT shown to beat image statistics alone"
            ),
        ]
    if "covid_vs_rest" in model:
        covid = model["covid_vs_rest"]
        lines.append(f"COVID-19 vs rest: recall {covid['recall']:.3f}, precision {covid['precision']:.3f}")
    if "lime_audit" in result:
        audit = result["lime_audit"]
        lines.append(
            f"LIME: {100 * audit['positive_weight_outside_body']:.1f} % of positive weight outside the body "
            f"({audit['images']} images)"
        )
    ax.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
