"""DPN-SE: Dual Path Networks with a squeeze-and-excitation block in every dual-path block.

Cheng et al. 2021 add SE to DPN-92. Here the SE block sits on the output of each block's last 1x1 conv,
before that output is split into the residual and the dense path (reduction 16). The network is timm's
``DPN`` (so ``--pretrained`` loads timm's ImageNet DPN weights unchanged); SE is inserted after the weights
are loaded. Registered with timm: ``timm.create_model("dpn92_se", num_classes=4)`` after ``import
cxr.train.models``."""

from __future__ import annotations

import torch
from timm.layers import SEModule
from timm.models import build_model_with_cfg, register_model
from timm.models.dpn import DPN, DualPathBlock
from torch import nn

SE_REDUCTION = 16


class ConvThenSE(nn.Module):
    """A dual-path block's last 1x1 conv followed by SE, so the split sees re-weighted channels."""

    def __init__(self, conv: nn.Module, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        self.conv = conv
        self.se = SEModule(channels, rd_ratio=1.0 / reduction, rd_divisor=1)  # exactly C/16, as in SENet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.conv(x))


def add_se(model: DPN, reduction: int = SE_REDUCTION, near_identity: bool = False) -> DPN:
    """Insert SE after the last 1x1 conv of every dual-path block (in place).

    ``near_identity`` starts every gate at sigmoid(4) ~ 0.98 with zero fc2 weights, so pretrained DPN
    features pass through almost unchanged at the start of fine-tuning.
    """
    for block in model.modules():
        if not isinstance(block, DualPathBlock) or isinstance(block.c1x1_c, ConvThenSE):
            continue
        if block.c1x1_c1 is not None:
            raise ValueError("DPN-SE is defined for non-'b' DPN variants only")
        channels = block.num_1x1_c + block.inc
        block.c1x1_c = ConvThenSE(block.c1x1_c, channels, reduction)
        if near_identity:
            nn.init.zeros_(block.c1x1_c.se.fc2.weight)
            nn.init.constant_(block.c1x1_c.se.fc2.bias, 4.0)
    return model


def se_blocks(model: nn.Module) -> list[ConvThenSE]:
    return [m for m in model.modules() if isinstance(m, ConvThenSE)]


def _create_dpn_se(base: str, pretrained: bool = False, **kwargs) -> DPN:
    import timm

    model = timm.create_model(base, pretrained=pretrained, **kwargs)
    return add_se(model, near_identity=pretrained)


@register_model
def dpn68_se(pretrained: bool = False, **kwargs) -> DPN:
    return _create_dpn_se("dpn68", pretrained, **kwargs)


@register_model
def dpn92_se(pretrained: bool = False, **kwargs) -> DPN:
    return _create_dpn_se("dpn92", pretrained, **kwargs)


@register_model
def dpn98_se(pretrained: bool = False, **kwargs) -> DPN:
    return _create_dpn_se("dpn98", pretrained, **kwargs)


@register_model
def dpn131_se(pretrained: bool = False, **kwargs) -> DPN:
    return _create_dpn_se("dpn131", pretrained, **kwargs)


@register_model
def dpn_se_tiny(pretrained: bool = False, **kwargs) -> DPN:
    """A ~0.45 M-parameter DPN-SE for CPU tests: the same block structure (4 stages, SE everywhere), tiny
    widths."""
    if pretrained:
        raise ValueError("dpn_se_tiny has no pretrained weights")
    args = dict(small=True, num_init_features=16, k_r=16, groups=4, k_sec=(1, 1, 1, 1), inc_sec=(8, 8, 8, 16))
    args.update(kwargs)
    if not args.get("pretrained_cfg"):
        args["pretrained_cfg"] = {"architecture": "dpn_se_tiny", "num_classes": args.get("num_classes", 1000)}
    return add_se(build_model_with_cfg(DPN, "dpn_se_tiny", pretrained=False, **args))
