"""A training run folder: ``model.pt`` (state dict only), ``card.json``, metrics, split. Build and load
models."""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path

import torch
from cxr.runtime.card import Card, Preprocessing, read_card
from cxr.runtime.errors import CxrError, CxrUsageError
from cxr.train.models.adapter import Classifier, GrayToNet
from torch import nn

MODEL_FILE = "model.pt"
SPLIT_FILE = "split.json"
MIN_IMAGE_SIZE = 32
log = logging.getLogger(__name__)


def check_arch(arch: str) -> str:
    """Any timm architecture (ours included); unknown names get a close-match hint."""
    import timm

    known = timm.list_models()
    if arch in known:
        return arch
    hint = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
    suggestion = f"; did you mean {', '.join(hint)}?" if hint else " (see timm.list_models())"
    raise CxrError(f"unknown --arch {arch!r}{suggestion}")


def build_net(arch: str, num_classes: int, pretrained: bool = False) -> nn.Module:
    import timm

    check_arch(arch)
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes)
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise CxrError(
                f"could not load ImageNet weights for {arch} (no internet or no pretrained weights?): "
                f"{str(exc).splitlines()[0][:200]}"
            ) from None
        raise


def net_mean_std(net: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
    return mean, std


def check_image_size(net: nn.Module, size: int, arch: str) -> None:
    """One forward pass at the requested size, so a too-small image fails now, in one line."""
    if size < MIN_IMAGE_SIZE:
        raise CxrUsageError(f"--image-size {size} is too small (at least {MIN_IMAGE_SIZE} px)")
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, size, size))
    except RuntimeError as exc:
        raise CxrUsageError(
            f"--image-size {size} is too small for {arch}: {str(exc).splitlines()[0][:160]}"
        ) from None
    finally:
        net.train(was_training)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint as tensors only (``weights_only=True``); anything else is refused."""
    if not path.is_file():
        raise CxrError(f"{path}: no checkpoint (expected {MODEL_FILE} from 'cxr-train fit')")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CxrError(
            f"{path}: not a plain state dict (refusing to unpickle arbitrary objects): "
            f"{str(exc).splitlines()[0][:160]}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CxrError(f"{path}: not a state dict of tensors")
    return state


def load_init_weights(net: nn.Module, run: Path, arch: str, classes: list[str], pre: Preprocessing) -> None:
    """Fine-tuning: copy an earlier run's weights into ``net``; its arch and classes must be this run's.

    A run trained with other preprocessing steps still loads (a hospital may switch suppression on), but the
    log says so: the weights first saw other pixels.
    """
    card = read_card(Path(run))
    if card.arch != arch or list(card.classes) != list(classes):
        raise CxrError(
            f"{run}: --init run is {card.arch} with classes {', '.join(card.classes)}; this run is {arch} "
            f"with {', '.join(classes)} (they must match)"
        )
    try:
        net.load_state_dict(load_state_dict(Path(run) / MODEL_FILE))
    except RuntimeError as exc:
        raise CxrError(
            f"{run / MODEL_FILE}: weights do not fit {arch}: {str(exc).splitlines()[0][:160]}"
        ) from None
    earlier, now = suppression_of(card.preprocessing), suppression_of(pre)
    if earlier != now:
        log.warning(f"--init {run} was trained with {earlier}; this run uses {now}")


def init_overlap(run: Path, data: Path, val_rels: list[str]) -> int:
    """How many of this run's validation images the ``--init`` run trained on (same data folder): a nonzero
    count makes this run's validation scores optimistic."""
    split, card = read_split(run), read_card(Path(run))
    same_data = Path(str(card.training.get("data", ""))).resolve() == Path(data).resolve()
    return len(set(split["train"]) & set(val_rels)) if split and same_data else 0


def suppression_of(pre: Preprocessing) -> dict[str, object]:
    return {"thorax_crop": pre.thorax_crop, "clahe": pre.clahe, "border_mask": pre.border_mask}


def load_run(run: Path) -> tuple[Card, Classifier]:
    """The run's card and its classifier (adapter + net + softmax) in eval mode on CPU."""
    run = Path(run)
    card = read_card(run)
    net = build_net(card.arch, len(card.classes))
    state = load_state_dict(run / MODEL_FILE)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise CxrError(
            f"{run / MODEL_FILE}: weights do not fit {card.arch}: {str(exc).splitlines()[0][:160]}"
        ) from None
    model = Classifier(GrayToNet(card.preprocessing.mean, card.preprocessing.std), net)
    return card, model.eval()


def read_split(run: Path) -> dict[str, list[str]] | None:
    path = Path(run) / SPLIT_FILE
    return json.loads(path.read_text()) if path.is_file() else None
