"""Superpixels for LIME, computed once per image on the host (scikit-image).

SLIC by default, tuned for chest X-rays (grayscale, ~50 compact segments that follow lung borders);
quickshift with lime's own defaults (kernel_size=4, max_dist=200, ratio=0.2) as in the paper.
"""

from __future__ import annotations

import numpy as np
from cxr.runtime.errors import CxrUsageError

SEGMENTERS = ("slic", "quickshift")


def segment(image: np.ndarray, method: str = "slic", n_segments: int = 50, seed: int = 0) -> np.ndarray:
    """uint8 H x W -> int32 H x W segment ids 0..S-1 (consecutive)."""
    from skimage.segmentation import quickshift, slic

    if method == "slic":
        labels = slic(
            image.astype(np.float64) / 255.0,
            n_segments=n_segments,
            compactness=0.08,
            sigma=1.0,
            channel_axis=None,
            start_label=0,
            enforce_connectivity=True,
        )
    elif method == "quickshift":
        rgb = np.repeat(image[:, :, None], 3, axis=2).astype(np.float64) / 255.0
        labels = quickshift(rgb, kernel_size=4, max_dist=200, ratio=0.2, rng=seed)
    else:
        raise CxrUsageError(f"--segmenter must be one of {', '.join(SEGMENTERS)}, got {method!r}")
    _, consecutive = np.unique(labels, return_inverse=True)
    return consecutive.reshape(image.shape).astype(np.int32)


def segment_means(image: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """lime's ``hide_color=None`` fill: every pixel replaced by its segment's mean, as uint8."""
    counts = np.bincount(segments.ravel())
    sums = np.bincount(segments.ravel(), weights=image.ravel().astype(np.float64))
    means = sums / np.maximum(counts, 1)
    return np.round(means[segments]).astype(np.uint8)
