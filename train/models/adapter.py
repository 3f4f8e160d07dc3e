"""The one bridge from runtime pixels to the network: uint8 grayscale N x 1 x H x W -> normalised N x 3 x H x
W.

Training runs every batch through it and export puts it inside the ONNX graph, so the bedside runtime
hands the engine raw uint8 pixels and train/serve skew cannot creep in.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class GrayToNet(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).float().view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float().expand(-1, 3, -1, -1)
        return x * self.scale - self.shift


class Classifier(nn.Module):
    """Adapter + network + softmax: what the exported graph computes (uint8 pixels -> class probabilities)."""

    def __init__(self, adapter: GrayToNet, net: nn.Module) -> None:
        super().__init__()
        self.adapter = adapter
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(self.adapter(pixels)), dim=1)
