"""Shortcut suppression: the preprocessing steps that hide what a chest film says about the hospital, not the
chest.

COVID-19 films in the public sets are adults from other hospitals than the paediatric pneumonia films; corner
labels, burned-in markers and the space around the body tell them apart without looking at the lungs. Three
steps, each recorded in the card and switched off for ablation, run here for training and the runtime alike:

- ``thorax_crop``: crop to the body (Otsu threshold, largest bright component, its convex hull's box plus a
  margin), so markers in the free space around the patient leave the picture;
- ``clahe``: contrast-limited histogram equalisation, so exposure and processing differences between sites
  carry less signal;
- ``border_mask``: blank a band of this fraction of the side at every edge of the final view (labels that sit
  inside the body's box).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from cxr.runtime.card import Preprocessing

WORK_SIDE = 256  # the body is found on a copy this size: shape, not detail
MIN_BODY_SHARE = 0.15  # a largest component smaller than this is not a body (a blank or odd film): no crop
MAX_BODY_SHARE = 0.97
CROP_MARGIN = 0.04


def body_mask(gray: np.ndarray) -> np.ndarray | None:
    """Boolean mask of the body (convex hull of the largest bright component), or None where none is found."""
    height, width = gray.shape[:2]
    scale = WORK_SIDE / max(height, width)
    small = cv2.resize(
        gray, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
    )
    blurred = cv2.GaussianBlur(small, (5, 5), 0)
    _, bright = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    bright = cv2.morphologyEx(
        bright, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)
    )  # text strokes and small markers go
    count, labels, stats, _ = cv2.connectedComponentsWithStats(bright, connectivity=8)
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if not MIN_BODY_SHARE * small.size <= stats[largest, cv2.CC_STAT_AREA] <= MAX_BODY_SHARE * small.size:
        return None  # too small to be a body, or the whole frame (a flat or blown-out film): nothing to find
    # the hull of the component's outer contour is the hull of all its pixels (the same mask on all
    # 1,499 cxr4-train films), found 27x faster: 0.07 ms against 1.9 ms from every pixel, which was
    # most of predict's host time per film
    contours, _ = cv2.findContours(
        (labels == largest).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    hull = np.zeros_like(small)
    cv2.fillPoly(hull, [cv2.convexHull(np.concatenate(contours))], 255)
    return cv2.resize(hull, (width, height), interpolation=cv2.INTER_NEAREST) > 0


def thorax_box(gray: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the body plus a margin, or None to keep the whole film."""
    mask = body_mask(gray)
    if mask is None:
        return None
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    height, width = mask.shape
    pad_y, pad_x = round(CROP_MARGIN * height), round(CROP_MARGIN * width)
    top, bottom = max(0, rows[0] - pad_y), min(height, rows[-1] + 1 + pad_y)
    left, right = max(0, cols[0] - pad_x), min(width, cols[-1] + 1 + pad_x)
    if min(bottom - top, right - left) < 0.3 * min(height, width):
        return None  # a sliver is a misfire, not a thorax
    return int(top), int(bottom), int(left), int(right)


def equalise(gray: np.ndarray) -> np.ndarray:
    """CLAHE with OpenCV's usual settings (clip 2, 8 x 8 tiles), uint8 in and out."""
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray)


def whole_film_steps(gray: np.ndarray, pre: Preprocessing | None) -> np.ndarray:
    """The steps that see the whole decoded film, before it is scaled: thorax crop, then CLAHE."""
    return whole_film_steps_with_mask(gray, None, pre)[0]


def whole_film_steps_with_mask(
    gray: np.ndarray, mask: np.ndarray | None, pre: Preprocessing | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The same, carrying a same-size mask (a lesion or the body) through the crop, so it stays aligned."""
    if pre is None:
        return gray, mask
    box = thorax_box(gray) if pre.thorax_crop else None
    if box is not None:
        top, bottom, left, right = box
        gray = np.ascontiguousarray(gray[top:bottom, left:right])
        mask = None if mask is None else np.ascontiguousarray(mask[top:bottom, left:right])
    if pre.clahe:
        gray = equalise(gray)
    return gray, mask


def view_steps(view: np.ndarray, pre: Preprocessing | None) -> np.ndarray:
    """The steps on the final square view the network sees: the border band."""
    if pre is None or pre.border_mask <= 0:
        return view
    band = round(pre.border_mask * min(view.shape[:2]))
    if band == 0:
        return view
    masked = view.copy()
    masked[:band], masked[-band:], masked[:, :band], masked[:, -band:] = 0, 0, 0, 0
    return masked
