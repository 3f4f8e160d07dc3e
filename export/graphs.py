"""Torch modules that become the bundle's ONNX graphs: the classifier and the LIME explainer.

Explainer: inputs are the preprocessed image, the fill image (segment means), the segment map and a batch
of on/off rows ``z``; the perturbed images are composed inside the graph, so per batch the host sends
only ``z`` (batch x segments, uint8).
"""

from __future__ import annotations

import torch
from cxr.runtime.backends.base import (  # noqa: F401  (the runtime owns the tensor names; export writes them)
    CLASSIFIER_INPUTS,
    CLASSIFIER_OUTPUTS,
    EXPLAINER_INPUTS,
    EXPLAINER_OUTPUTS,
)
from cxr.train.models.adapter import Classifier
from torch import nn


class Explainer(nn.Module):
    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(
        self, image: torch.Tensor, fill: torch.Tensor, segments: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        """image, fill: 1 x 1 x H x W uint8; segments: H x W int32 (0..S-1); z: B x S uint8 -> B x classes."""
        height, width = segments.shape[-2], segments.shape[-1]
        keep = torch.index_select(z.float(), 1, segments.reshape(-1)).reshape(-1, 1, height, width)
        pixels = fill.float() + keep * (image.float() - fill.float())
        return self.classifier(pixels)


def example_inputs(size: int, segments: int = 16, batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 1, size, size), dtype=torch.uint8, generator=generator)
    seg = (torch.arange(size * size, dtype=torch.int32).reshape(size, size) * segments // (size * size)).int()
    return {
        "image": image,
        "fill": torch.full((1, 1, size, size), 128, dtype=torch.uint8),
        "segments": seg,
        "z": torch.randint(0, 2, (batch, segments), dtype=torch.uint8, generator=generator),
    }
