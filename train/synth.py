"""Synthetic chest-like phantoms with a class-specific planted lesion, and the lesion masks.

Body, two dark lung fields, rib bands and noise; a lesion pattern per class (none for ``normal``):
covid19 = hazy peripheral blobs in both lower zones, pneumonia_bacterial = one dense lobar consolidation,
pneumonia_viral = many small perihilar nodules. The masks are stored in ``lesion_masks.npz`` at the
data root (a file, not a folder or an image), so an ImageFolder loader never mistakes them for data.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
from cxr.runtime.errors import CxrError, CxrUsageError
from cxr.runtime.labels import CLASSES
from tqdm import tqdm

MASKS_FILE = "lesion_masks.npz"


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def make_phantom(rng: np.random.Generator, size: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: uint8 image (size x size) and its boolean lesion mask."""
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    jitter = lambda scale: float(rng.uniform(-scale, scale)) * s  # noqa: E731
    img = np.full((size, size), 20.0, dtype=np.float32)
    body = _ellipse(yy, xx, 0.55 * s + jitter(0.02), 0.5 * s + jitter(0.02), 0.5 * s, 0.44 * s + jitter(0.02))
    img[body] = 150 + rng.uniform(-15, 15)
    lungs = np.zeros((size, size), dtype=bool)
    centres = []
    for side in (-1, 1):
        cy, cx = 0.5 * s + jitter(0.03), (0.5 + side * 0.18) * s + jitter(0.02)
        ry, rx = 0.28 * s + jitter(0.02), 0.13 * s + jitter(0.01)
        lungs |= _ellipse(yy, xx, cy, cx, ry, rx)
        centres.append((cy, cx, ry, rx, side))
    img[lungs] = 55 + rng.uniform(-10, 10)
    bend = 0.15 * (xx - 0.5 * s) ** 2 / s
    ribs = (np.sin((yy + bend) * (2 * np.pi / (0.11 * s)) + rng.uniform(0, 2 * np.pi)) > 0.55) & lungs
    img[ribs] += 28
    lesion = np.zeros((size, size), dtype=np.float32)
    if label == "pneumonia_bacterial":
        cy, cx, ry, rx, _ = centres[int(rng.integers(0, 2))]
        blob = _ellipse(yy, xx, cy + ry * rng.uniform(0.0, 0.45), cx + jitter(0.02), 0.12 * s, 0.08 * s)
        lesion[blob] = 75
    elif label == "covid19":
        for cy, cx, ry, rx, side in centres:
            for _ in range(int(rng.integers(2, 4))):
                py = cy + ry * rng.uniform(0.1, 0.65)
                px = cx + side * rx * rng.uniform(0.35, 0.7)
                sigma = 0.045 * s
                lesion += 50 * np.exp(-(((yy - py) ** 2 + (xx - px) ** 2) / (2 * sigma**2)))
    elif label == "pneumonia_viral":
        for cy, cx, ry, rx, side in centres:
            for _ in range(int(rng.integers(6, 10))):
                py = cy + ry * rng.uniform(-0.4, 0.4)
                px = cx - side * rx * rng.uniform(0.3, 0.8)
                lesion[_ellipse(yy, xx, py, px, 0.022 * s, 0.022 * s)] = 70
    elif label != "normal":
        raise CxrError(f"synth: unknown class {label!r}; phantoms exist for {', '.join(CLASSES)}")
    lesion *= lungs
    mask = lesion > 20
    img += lesion
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=max(0.6, s / 256))
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def write_phantoms(out: Path, per_class: int, size: int, seed: int = 0) -> dict[str, int]:
    """Write an ImageFolder of phantoms, ``manifest.csv`` (two images per synthetic patient) and the masks."""
    if per_class < 1:
        raise CxrUsageError(f"--per-class must be at least 1, got {per_class}")
    if size < 32:
        raise CxrUsageError(f"--size must be at least 32 px, got {size}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    masks: dict[str, np.ndarray] = {}
    rows = []
    jobs = [(label, i) for label in CLASSES for i in range(per_class)]
    for label, i in tqdm(jobs, desc="phantoms", unit="img", disable=len(jobs) < 100):
        image, mask = make_phantom(rng, size, label)
        rel = f"{label}/phantom_{i:05d}.png"
        (out / label).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / rel), image)
        masks[rel] = mask
        rows.append({"file": rel, "label": label, "patient_id": f"synth-{label}-{i // 2}"})
    np.savez_compressed(out / MASKS_FILE, **{k.replace("/", "__"): v for k, v in masks.items()})
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return {label: per_class for label in CLASSES}


def read_lesion_masks(root: Path) -> dict[str, np.ndarray]:
    """{relative image path: boolean mask} as written by :func:`write_phantoms`."""
    path = Path(root) / MASKS_FILE
    if not path.is_file():
        raise CxrError(f"{root}: no {MASKS_FILE} (not a phantom folder from 'cxr-train synth')")
    with np.load(path) as data:
        return {key.replace("__", "/"): data[key] for key in data.files}
