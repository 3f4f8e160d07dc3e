import os
import subprocess
import sys

import cxr.train.models  # noqa: F401  (registers the DPN-SE family)
import pytest
import timm
import torch
from cxr.runtime.errors import CxrError
from cxr.train.models.dpn_se import ConvThenSE, se_blocks
from cxr.train.run import build_net, check_arch, check_image_size


def test_tiny_forward_shapes_and_gradients():
    torch.manual_seed(0)
    model = timm.create_model("dpn_se_tiny", num_classes=4)
    x = torch.randn(3, 3, 64, 64)
    out = model(x)
    assert out.shape == (3, 4)
    assert torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("name,blocks,millions", [("dpn92_se", 30, 39.7), ("dpn68_se", 22, 12.05)])
def test_se_in_every_dual_path_block_and_parameter_count(name, blocks, millions):
    model = timm.create_model(name, num_classes=4)
    dual_path = [m for m in model.modules() if type(m).__name__ == "DualPathBlock"]
    assert len(dual_path) == blocks
    assert all(isinstance(b.c1x1_c, ConvThenSE) for b in dual_path)
    assert len(se_blocks(model)) == blocks
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(millions, abs=0.06)
    plain = (
        sum(p.numel() for p in timm.create_model(name.replace("_se", ""), num_classes=4).parameters()) / 1e6
    )
    assert params > plain


def test_se_reduction_is_sixteen():
    model = timm.create_model("dpn92_se", num_classes=4)
    for block in se_blocks(model):
        channels = block.se.fc1.in_channels
        assert abs(block.se.fc1.out_channels - channels / 16) <= 1


def test_unknown_arch_gets_close_match_hint():
    with pytest.raises(CxrError, match="did you mean.*dpn92_se"):
        check_arch("dpn92se")
    assert check_arch("resnet18") == "resnet18"


def test_image_size_too_small_is_a_user_error():
    net = build_net("dpn_se_tiny", 4)
    with pytest.raises(CxrError, match="too small"):
        check_image_size(net, 16, "dpn_se_tiny")
    check_image_size(net, 64, "dpn_se_tiny")


def test_pretrained_unreachable_is_a_clear_error():
    """In a fresh interpreter, so the hub library reads HF_HUB_OFFLINE when it is imported (not before it is
    set)."""
    code = (
        "import cxr.train.models\nfrom cxr.train.run import build_net\nfrom cxr.runtime.errors import "
        "CxrError\n"
        "try:\n    build_net('dpn68_se', 4, pretrained=True)\nexcept CxrError as exc:\n    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0 and "could not load ImageNet weights" in result.stdout, result.stderr[
        -2000:
    ]
