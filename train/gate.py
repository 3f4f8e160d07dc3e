"""Fit a run's out-of-distribution gate (``cxr.runtime.ood``) on its own training films, thresholded on its
validation films: at the end of ``cxr-train fit``, or later with ``cxr-train gate RUN DATA`` for a run
trained before gates existed. Writes ``ood.npz`` into the run; the card's ``ood`` section says what it is."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cxr.runtime.card import Card, write_card
from cxr.runtime.errors import CxrError
from cxr.runtime.ood import DEFAULT_KEEP, DEFAULT_PARTS, GATE_FILE, Gate, fit_gate
from cxr.runtime.safe_io import atomic_write
from cxr.train.augment import evaluation_view
from cxr.train.data import LoadedImages
from cxr.train.ood_features import FeatureClassifier, extract, feature_layout

log = logging.getLogger(__name__)


def views_of(loaded: LoadedImages, card: Card) -> list[np.ndarray]:
    """The runtime's view of each loaded film (what the deployed graph is given)."""
    return [evaluation_view(im, card.input.size, card.preprocessing) for im in loaded.images]


def gate_section(gate: Gate, val_count: int, seconds: float) -> dict[str, Any]:
    """What the card says of a gate (the numbers the runtime uses are in ood.npz, hashed)."""
    flagged = float(np.mean(gate.validation_scores > gate.threshold)) if len(gate.validation_scores) else 0.0
    return {
        "file": GATE_FILE,
        "method": gate.method,
        "layers": [p.name.split(":", 1)[1] for p in gate.parts if p.name.startswith("mahalanobis:")],
        "threshold": round(gate.threshold, 6),
        "keep": gate.keep,
        "validation_images": val_count,
        "validation_flagged": round(flagged, 4),
        "fit_seconds": round(seconds, 1),
    }


def fit_run_gate(
    run: Path,
    card: Card,
    model: Any,
    train: LoadedImages,
    val: LoadedImages,
    device: torch.device,
    batch_size: int = 32,
    parts: tuple[str, ...] = DEFAULT_PARTS,
    keep: float = DEFAULT_KEEP,
) -> Card:
    """Fit on ``train``, threshold on ``val`` (the run's own split), write ``ood.npz`` and the card."""
    started = time.perf_counter()
    if len(train.images) < 8 or len(val.images) < 8:
        raise CxrError("the out-of-distribution gate needs at least 8 training and 8 validation films")
    features_of = FeatureClassifier(model.adapter, model.net).to(device)
    _, train_features = extract(features_of, views_of(train, card), device, batch_size)
    _, val_features = extract(features_of, views_of(val, card), device, batch_size)
    gate = fit_gate(
        train_features=train_features,
        train_stats=train.stats,
        train_labels=train.labels,
        val_features=val_features,
        val_stats=val.stats,
        feature_layout=feature_layout(model.net, len(card.classes)),
        parts=parts,
        keep=keep,
    )
    atomic_write(Path(run) / GATE_FILE, gate.to_bytes())
    section = gate_section(gate, len(val.images), time.perf_counter() - started)
    log.info(
        f"out-of-distribution gate: {section['method']}; threshold {section['threshold']:.3g} keeps "
        f"{1 - section['validation_flagged']:.1%} of {len(val.images)} validation films"
    )
    return write_card(run, card.replace(ood=section))


def refit_run_gate(run: Path, data: Path, parts: tuple[str, ...], keep: float, device: str = "auto") -> Card:
    """The gate of an existing run, fitted on its training split of ``data`` (split.json) with its card's
    preprocessing."""
    from cxr.train.data import load_images, scan_image_folder
    from cxr.train.run import load_run, read_split

    card, model = load_run(run)
    split = read_split(run)
    if split is None:
        raise CxrError(f"{run}: no split.json: the gate must be fitted on the run's own training split")
    _, samples = scan_image_folder(data, card.classes)
    by_name = {s.rel: s for s in samples}
    missing = [name for name in split["train"] + split["val"] if name not in by_name]
    if missing:
        raise CxrError(f"{data}: {len(missing)} films of the run's split are missing (e.g. {missing[0]})")
    train = load_images(
        [by_name[n] for n in split["train"]], card.input.size, "gate: train", pre=card.preprocessing
    )
    val = load_images(
        [by_name[n] for n in split["val"]], card.input.size, "gate: validation", pre=card.preprocessing
    )
    chosen = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    return fit_run_gate(run, card, model.to(chosen), train, val, chosen, parts=parts, keep=keep)
