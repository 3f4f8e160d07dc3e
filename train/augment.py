"""The paper's augmentation (Cheng et al. 2021, Fig. 1) on uint8 grayscale, with opencv + numpy.

Input is an image whose short side already equals the input size (the runtime's first step); then
random crop of input size, random horizontal flip, random rotation and random scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from cxr.runtime.preprocess import center_crop


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
            np.ascontiguousarray(out), matrix, (self.size, self.size),
            flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101,
        )
        return np.ascontiguousarray(out)


def evaluation_view(image: np.ndarray, size: int) -> np.ndarray:
    """The runtime's deterministic view (centre crop) of an image already at short side = size."""
    return np.ascontiguousarray(center_crop(image, size))
