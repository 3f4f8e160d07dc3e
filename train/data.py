"""ImageFolder data: scanning, patient-disjoint splits, and an in-memory dataset of decoded images.

Images are decoded once with the runtime's reader and kept at short side = input size, so epochs cost
only augmentation. Unreadable files are skipped and counted, never a crash.
"""

from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cxr.runtime.card import Preprocessing
from cxr.runtime.errors import CxrError, CxrUsageError
from cxr.runtime.labels import CLASSES
from cxr.runtime.ood import image_stats
from cxr.runtime.preprocess import IMAGE_SUFFIXES, load_image, resize_short_side
from cxr.runtime.suppress import whole_film_steps
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    rel: str  # path relative to the data root, as in manifest.csv
    group: str  # patient id (or the file itself when unknown)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def scan_image_folder(
    root: Path, classes: tuple[str, ...] | None = None
) -> tuple[tuple[str, ...], list[Sample]]:
    """One sub-folder per class. Class order: the card's (if given), the paper's 4 classes, else sorted."""
    root = Path(root)
    if not root.exists():
        raise CxrError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise CxrError(f"{root}: not a folder (expected one sub-folder per class)")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not folders:
        raise CxrError(f"{root}: no class sub-folders (expected e.g. {', '.join(CLASSES)})")
    if classes is None:
        classes = CLASSES if set(folders) == set(CLASSES) else tuple(folders)
    missing = [c for c in classes if c not in folders]
    if missing:
        raise CxrError(f"{root}: missing class folder(s): {', '.join(missing)}")
    groups = read_patient_ids(root)
    samples: list[Sample] = []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if is_image_file(p))
        if not files:
            raise CxrError(f"{root / name}: class folder has no images (.png, .jpg, .jpeg, .dcm)")
        for path in files:
            rel = path.relative_to(root).as_posix()
            samples.append(Sample(path, index, rel, groups.get(rel, rel)))
    return tuple(classes), samples


def read_patient_ids(root: Path) -> dict[str, str]:
    """``manifest.csv`` (columns ``file``, ``patient_id``) -> {relative path: patient id}; empty when
    absent."""
    manifest = Path(root) / "manifest.csv"
    if not manifest.is_file():
        return {}
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "file" not in rows[0] or "patient_id" not in rows[0]:
        return {}
    return {row["file"]: row["patient_id"] for row in rows if row.get("patient_id")}


def split_samples(samples: list[Sample], val_split: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified split that keeps every patient on one side (StratifiedGroupKFold, first fold =
    validation)."""
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0.0 < val_split < 1.0:
        raise CxrUsageError(f"--val-split must be between 0 and 1, got {val_split}")
    labels = np.array([s.label for s in samples])
    groups = np.array([s.group for s in samples])
    n_splits = max(2, round(1.0 / val_split))
    if len(set(groups)) < n_splits:
        raise CxrError(f"too few patients ({len(set(groups))}) for a {val_split:.0%} validation split")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(folds.split(np.zeros(len(samples)), labels, groups))
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


@dataclass(kw_only=True)
class LoadedImages:
    """Decoded images at short side = size, with labels, original sizes, and what was skipped."""

    images: list[np.ndarray]
    labels: np.ndarray
    original_shapes: list[tuple[int, int]]
    samples: list[Sample]
    skipped: list[tuple[str, str]]
    stats: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # image statistics, one row a film


def _decode(
    sample: Sample, size: int, pre: Preprocessing | None
) -> tuple[np.ndarray | None, tuple[int, int] | str, np.ndarray | None]:
    """One file after the whole-film suppression steps, at short side ``size``, with its original shape and
    its image statistics (``cxr.runtime.ood.image_stats``, of the decoded film as the runtime sees it), or
    None and the reason it is unreadable. The view steps (border band) follow the crop: see ``view_steps``."""
    try:
        decoded = load_image(sample.path, dicom_window=pre.dicom_window if pre is not None else "window")
    except CxrError as exc:
        return None, str(exc), None
    gray = decoded.gray
    stats = image_stats(gray, decoded.colour)
    return resize_short_side(whole_film_steps(gray, pre), size), gray.shape[:2], stats


def load_images(
    samples: list[Sample],
    size: int,
    desc: str = "loading",
    disable: bool = False,
    pre: Preprocessing | None = None,
) -> LoadedImages:
    """Decode in threads (OpenCV and pydicom's decoders release the GIL); order follows ``samples``."""
    images, labels, shapes, kept, skipped, stats = [], [], [], [], [], []
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = pool.map(lambda sample: _decode(sample, size, pre), samples)
        for sample, (image, info, film_stats) in tqdm(
            zip(samples, decoded),
            total=len(samples),
            desc=desc,
            unit="img",
            leave=False,
            disable=disable or len(samples) < 50,
        ):
            if image is None:
                skipped.append((sample.rel, info))
                continue
            images.append(image)
            labels.append(sample.label)
            shapes.append(info)
            kept.append(sample)
            stats.append(film_stats)
    if skipped:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(skipped), skipped[0][1])
    return LoadedImages(
        images=images,
        labels=np.array(labels, dtype=np.int64),
        original_shapes=shapes,
        samples=kept,
        skipped=skipped,
        stats=np.array(stats).reshape(len(stats), -1),
    )
