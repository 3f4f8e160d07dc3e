"""The paper's augmentation (Cheng et al. 2021, Fig. 1) on uint8 grayscale, with opencv + numpy.

Input is an image whose short side already equals the input size (the runtime's first step); then
random crop of input size, random horizontal flip, random rotation and random scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from cxr.runtime.card import Preprocessing
from cxr.runtime.preprocess import center_crop
from cxr.runtime.suppress import view_steps


@dataclass(frozen=True)
class PaperAugment:
    size: int
    flip_p: float = 0.5
    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = image.shape[:2]
        top = int(rng.integers(0, height - self.size + 1))
        left = int(rng.integers(0, width - self.size + 1))
        out = image[top : top + self.size, left : left + self.size]
        if rng.random() < self.flip_p:
            out = out[:, ::-1]
        angle = float(rng.uniform(-self.max_rotation_deg, self.max_rotation_deg))
        scale = float(rng.uniform(*self.scale_range))
        centre = (self.size / 2.0, self.size / 2.0)
        matrix = cv2.getRotationMatrix2D(centre, angle, scale)
        out = cv2.warpAffine(
            np.ascontiguousarray(out),
            matrix,
            (self.size, self.size),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REFLECT_101,
        )
        return np.ascontiguousarray(out)


def evaluation_view(image: np.ndarray, size: int, pre: Preprocessing | None = None) -> np.ndarray:
    """The runtime's deterministic view (centre crop, then the card's border band) of an image already at
    short side = size after ``whole_film_steps``: what ``cxr.runtime.preprocess.preprocess`` gives."""
    return np.ascontiguousarray(view_steps(center_crop(image, size), pre))


@dataclass
class CornerErase:
    """Training-only: with probability ``p`` per corner, a random-size square (5-20 % of the side) filled with
    a random grey, so burned-in corner labels and markers stop being a reliable cue."""

    p: float = 0.5

    def __call__(self, view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.p <= 0:
            return view
        out = view.copy()
        side = min(view.shape[:2])
        for bottom, right in ((False, False), (False, True), (True, False), (True, True)):
            if rng.random() >= self.p:
                continue
            edge = max(1, int(rng.uniform(0.05, 0.2) * side))
            rows = slice(-edge, None) if bottom else slice(0, edge)
            cols = slice(-edge, None) if right else slice(0, edge)
            out[rows, cols] = int(rng.integers(0, 256))
        return out
