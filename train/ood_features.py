"""The features the out-of-distribution gate reads, emitted by the exported classifier beside its
probabilities: the spatial mean of each stage's output (timm's ``feature_info`` stages after the stem), of the
final feature map, and the logits. Any timm model works: stages are found from ``feature_info``, and a stage
that returns several tensors (DPN's residual and dense paths) is concatenated, as timm's feature extractor
does."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from cxr.train.models.adapter import GrayToNet
from torch import nn

FINAL, LOGITS = "final", "logits"


def stage_modules(net: nn.Module) -> list[tuple[str, int]]:
    """(module name, channels) of each stage after the stem whose output the gate may read."""
    info = getattr(net, "feature_info", None)
    stages = [(f["module"], int(f["num_chs"])) for f in info] if info else []
    return stages[1:-1]  # the stem sees texture, not anatomy; the last stage is the final map (FINAL)


def feature_layout(net: nn.Module, classes: int) -> tuple[tuple[str, int, int], ...]:
    """(name, start, stop) of each block of the features vector, in order."""
    blocks = [(name, channels) for name, channels in stage_modules(net)]
    blocks += [(FINAL, int(net.num_features)), (LOGITS, classes)]
    layout, start = [], 0
    for name, width in blocks:
        layout.append((name, start, start + width))
        start += width
    return tuple(layout)


class FeatureClassifier(nn.Module):
    """uint8 pixels N x 1 x H x W -> (probabilities N x classes, features N x D): what ``model.onnx``
    computes. Stage outputs are caught by forward hooks and pooled in the same pass."""

    def __init__(self, adapter: GrayToNet, net: nn.Module) -> None:
        super().__init__()
        self.adapter, self.net = adapter, net
        self._caught: dict[str, torch.Tensor] = {}
        modules = dict(net.named_modules())
        self._names = [name for name, _ in stage_modules(net)]
        for name in self._names:
            modules[name].register_forward_hook(self._catch(name))

    def _catch(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._caught[name] = torch.cat(output, dim=1) if isinstance(output, (tuple, list)) else output

        return hook

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._caught.clear()
        maps = self.net.forward_features(self.adapter(pixels))
        logits = self.net.forward_head(maps)
        pooled = [_pool(self._caught[name]) for name in self._names] + [_pool(maps), logits.float()]
        return torch.softmax(logits.float(), dim=1), torch.cat(pooled, dim=1)


def _pool(maps: torch.Tensor) -> torch.Tensor:
    """The spatial mean of each channel, as a GlobalAveragePool (what the fp16 export keeps in fp16)."""
    return nn.functional.adaptive_avg_pool2d(maps.float(), 1).flatten(1)


def extract(
    model: FeatureClassifier, views: list[np.ndarray], device: torch.device, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and features of uint8 views, batch by batch, in eval mode."""
    model.eval()
    probs, features = [], []
    with torch.no_grad():
        for start in range(0, len(views), batch_size):
            pixels = torch.from_numpy(np.stack(views[start : start + batch_size])[:, None]).to(device)
            p, f = model(pixels)
            probs.append(p.cpu().numpy())
            features.append(f.cpu().numpy())
    return np.concatenate(probs), np.concatenate(features)
