"""``cxr-train fit``: train a classifier on an ImageFolder with the paper's augmentation.

Best epoch by validation macro-F1; class imbalance via a weighted loss; mixed precision on CUDA;
the same seed gives the same result on CPU (fixed batch order and augmentation streams per rank).
Under ``torchrun --nproc-per-node N`` it trains with DistributedDataParallel: ``--batch-size`` is per
process, a DistributedSampler shards each epoch, and rank 0 evaluates, logs and writes the run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cxr.runtime.card import Card, InputSpec, write_card
from cxr.runtime.errors import CxrError
from cxr.runtime.metrics import classification_report, format_report
from cxr.runtime.safe_io import atomic_output, atomic_write
from cxr.runtime.suppress import view_steps
from cxr.train.augment import CornerErase, PaperAugment, evaluation_view
from cxr.train.config import FitConfig
from cxr.train.data import LoadedImages, Sample, load_images, scan_image_folder, split_samples
from cxr.train.distributed import DistContext, barrier, init_distributed, shutdown
from cxr.train.models.adapter import GrayToNet
from cxr.train.plots import plot_confusion, plot_curves
from cxr.train.run import (
    MODEL_FILE,
    SPLIT_FILE,
    build_net,
    check_image_size,
    init_overlap,
    load_init_weights,
    net_mean_std,
)
from cxr.train.schedule import BudgetPacer, one_cycle
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

log = logging.getLogger(__name__)


def to_batch(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)[:, None]).to(device)


def predict_probs(
    net: nn.Module, adapter: GrayToNet, images: list[np.ndarray], device: torch.device, batch_size: int
) -> np.ndarray:
    """Softmax probabilities of uint8 views, batch by batch: the one PyTorch reference (validation, evaluate,
    parity)."""
    net.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = net(adapter(to_batch(images[start : start + batch_size], device)))
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1.0))
    return torch.tensor(weights, dtype=torch.float32)


def fit(config: FitConfig) -> dict[str, Any] | None:
    """Train, keep the best epoch, write the run folder; returns the metrics summary (None on ranks > 0)."""
    ctx = init_distributed(config.device)
    try:
        return _fit(config, ctx)
    finally:
        shutdown(ctx)


@dataclass(frozen=True, kw_only=True)
class _Data:
    classes: tuple[str, ...]
    train: LoadedImages
    val: LoadedImages
    val_views: list[np.ndarray]  # rank 0's validation views (empty on the other ranks)


@dataclass(frozen=True, kw_only=True)
class _Training:
    """Everything one training step touches, built once before the first epoch."""

    net: nn.Module  # the module itself (validated on rank 0; DDP would wait for the other ranks)
    model: nn.Module  # what the step calls: ``net``, or DDP around it
    kept: nn.Module  # the weights that are validated and saved: the moving average, else ``net``
    ema: Any
    adapter: GrayToNet
    mean: tuple[float, ...]
    std: tuple[float, ...]
    sampler: DistributedSampler
    optimizer: torch.optim.Optimizer
    schedule: Any
    pacer: BudgetPacer | None
    loss_fn: nn.Module
    scaler: Any
    augment: PaperAugment | None
    erase: CornerErase


def _fit(config: FitConfig, ctx: DistContext) -> dict[str, Any] | None:
    torch.manual_seed(config.seed)
    classes, samples = scan_image_folder(config.data)
    train_samples, val_samples = split_samples(samples, config.val_split, config.split_seed_used)
    net = _build(config, ctx, classes, [s.rel for s in val_samples])
    data = _load(config, ctx, classes, train_samples, val_samples)
    parts = _training_parts(config, ctx, net, data)
    if ctx.is_main:
        config.out.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"val_macro_f1": -1.0}
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        losses, seen, train_seconds = _train_epoch(config, ctx, parts, data.train, epoch)
        if ctx.is_main:
            row, report = _epoch_row(config, ctx, parts, data, epoch, losses, seen / train_seconds)
            history.append(row)
            best = _keep_if_best(config, parts, row, report, best)
        if _stop_after(config, ctx, parts.pacer, epoch, best):
            break
        barrier(ctx)
    if not ctx.is_main:
        return None
    seconds = time.perf_counter() - started
    return _write_run(config, data, history, best, parts, seconds, ctx)


def _build(config: FitConfig, ctx: DistContext, classes: tuple[str, ...], val_rels: list[str]) -> nn.Module:
    """The network, from ``--init`` when given (warning when its training images are in our validation)."""
    net = build_net(config.arch, len(classes), config.pretrained)
    if config.init is not None:
        load_init_weights(net, config.init, config.arch, classes, config.suppression())
        seen = init_overlap(config.init, config.data, val_rels)
        if seen and ctx.is_main:
            log.warning(
                f"{seen} of {len(val_rels)} validation images were training images of --init "
                f"{config.init}: validation scores are optimistic (keep its split: --split-seed or --seed, "
                "and --val-split)"
            )
    check_image_size(net, config.image_size, config.arch)
    return net


def _load(
    config: FitConfig,
    ctx: DistContext,
    classes: tuple[str, ...],
    train_samples: list[Sample],
    val_samples: list[Sample],
) -> _Data:
    """Both splits read and preprocessed as the card will say (suppression steps included)."""
    quiet, steps_pre = not ctx.is_main, config.suppression()
    train = load_images(train_samples, config.image_size, "loading train", disable=quiet, pre=steps_pre)
    val = load_images(val_samples, config.image_size, "loading val", disable=quiet, pre=steps_pre)
    if len(train.images) == 0 or len(val.images) == 0:
        raise CxrError(
            f"{config.data}: no readable images left after skipping {len(train.skipped) + len(val.skipped)}"
        )
    views = [evaluation_view(im, config.image_size, steps_pre) for im in val.images] if ctx.is_main else []
    return _Data(classes=classes, train=train, val=val, val_views=views)


def _training_parts(config: FitConfig, ctx: DistContext, net: nn.Module, data: _Data) -> _Training:
    """Model on its device (DDP across ranks), optimiser, schedule, weight average, loss and augmentation."""
    device = ctx.device
    mean, std = net_mean_std(net)
    adapter = GrayToNet(mean, std).to(device)
    net.to(device)
    if device.type == "cuda":
        net.to(memory_format=torch.channels_last)
    model = (
        DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        if ctx.distributed
        else net
    )
    sampler = DistributedSampler(
        range(len(data.train.images)),
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        shuffle=True,
        seed=config.seed,
    )
    lr = config.lr or (3e-4 if config.pretrained or config.init else 1e-3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, int(np.ceil(len(sampler) / config.batch_size)))
    # only rank 0 validates and saves, so only it keeps the average (the other ranks would copy and update it
    # for nothing)
    ema = weight_average(net, config.ema if ctx.is_main else 0.0, steps_per_epoch)
    weights = class_weights(data.train.labels, len(data.classes)).to(device)
    return _Training(
        net=net,
        model=model,
        kept=ema.module if ema is not None else net,
        ema=ema,
        adapter=adapter,
        mean=mean,
        std=std,
        sampler=sampler,
        optimizer=optimizer,
        schedule=one_cycle(optimizer, lr, config.epochs * steps_per_epoch, config.warmup),
        pacer=BudgetPacer(ctx, config.max_minutes) if config.max_minutes > 0 else None,
        loss_fn=nn.CrossEntropyLoss(
            weight=weights if config.balance == "weights" else None, label_smoothing=config.label_smoothing
        ),
        scaler=torch.amp.GradScaler("cuda", enabled=device.type == "cuda"),
        augment=PaperAugment(config.image_size) if config.augment else None,
        erase=CornerErase(config.erase_corners),
    )


def _epoch_order(
    config: FitConfig, ctx: DistContext, parts: _Training, labels: np.ndarray, epoch: int
) -> np.ndarray:
    """This rank's image order for the epoch: its shard of the sampler, or class-balanced draws."""
    parts.sampler.set_epoch(epoch)
    order = np.fromiter(parts.sampler, dtype=np.int64)
    if config.balance == "sampler":
        draws = balanced_order(labels, np.random.default_rng([config.seed, epoch]))
        order = draws[ctx.rank :: ctx.world_size]
    return order


def _train_epoch(
    config: FitConfig, ctx: DistContext, parts: _Training, train: LoadedImages, epoch: int
) -> tuple[list[float], int, float]:
    """One epoch of steps on this rank: (losses, images seen, seconds)."""
    order = _epoch_order(config, ctx, parts, train.labels, epoch)
    rng = np.random.default_rng([config.seed, epoch, ctx.rank])
    parts.model.train()
    losses, seen, epoch_start = [], 0, time.perf_counter()
    bar = tqdm(
        range(0, len(order), config.batch_size),
        desc=f"epoch {epoch}/{config.epochs}",
        unit="batch",
        disable=not ctx.is_main,
    )
    for start in bar:
        idx = order[start : start + config.batch_size]
        losses.append(_step(config, ctx, parts, _views(config, parts, train, idx, rng), train.labels[idx]))
        seen += len(idx)
        bar.set_postfix(loss=f"{np.mean(losses):.3f}")
    return losses, seen, time.perf_counter() - epoch_start


def _views(
    config: FitConfig, parts: _Training, train: LoadedImages, idx: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """The batch's training views: the paper's augmentation and corner erasing, or the evaluation view."""
    steps_pre = config.suppression()
    if parts.augment is None:
        return [evaluation_view(train.images[i], config.image_size, steps_pre) for i in idx]
    return [view_steps(parts.erase(parts.augment(train.images[i], rng), rng), steps_pre) for i in idx]


def _step(
    config: FitConfig, ctx: DistContext, parts: _Training, views: list[np.ndarray], labels: np.ndarray
) -> float:
    """One optimiser step (mixed precision on CUDA), the schedule or the budget pacer, the weight average."""
    device = ctx.device
    pixels = to_batch(views, device)
    target = torch.from_numpy(labels).to(device)
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        loss = parts.loss_fn(parts.model(parts.adapter(pixels)), target)
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    if parts.pacer is None:
        parts.schedule.step()
    elif parts.pacer.step(parts.schedule) and ctx.is_main:
        log.info(
            f"the --max-minutes budget ({config.max_minutes:g} min) ends before epoch "
            f"{config.epochs}: the learning rate now follows the clock, to anneal by its end"
        )
    if parts.ema is not None:
        parts.ema.update(parts.net, step=parts.schedule.last_epoch)  # the scheduler counts steps taken
    return float(loss.detach())


def _epoch_row(
    config: FitConfig,
    ctx: DistContext,
    parts: _Training,
    data: _Data,
    epoch: int,
    losses: list[float],
    rank_images_per_s: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rank 0: the epoch's line in metrics.json, logged, and the report of the weights it validated."""
    row, report = _validate(parts.kept, parts.adapter, data, config, ctx.device)
    if parts.ema is not None:  # the raw weights' scores, to see what the average adds
        raw, _ = _validate(parts.net, parts.adapter, data, config, ctx.device)
        row.update({f"{key}_raw": value for key, value in raw.items()})
    row.update(
        epoch=epoch,
        train_loss=float(np.mean(losses)),
        train_images_per_s=rank_images_per_s * ctx.world_size,
        lr=float(parts.schedule.get_last_lr()[0]),
        paced_by_budget=parts.pacer is not None and parts.pacer.paced,
    )
    log.info(
        f"epoch {epoch}: loss {row['train_loss']:.3f}  val acc {row['val_accuracy']:.3f}  "
        f"val macro-F1 {row['val_macro_f1']:.3f}  ({row['train_images_per_s']:.1f} img/s)"
        + (f"  raw weights: macro-F1 {row['val_macro_f1_raw']:.3f}" if parts.ema is not None else "")
    )
    return row, report


def _keep_if_best(
    config: FitConfig, parts: _Training, row: dict[str, Any], report: dict[str, Any], best: dict[str, Any]
) -> dict[str, Any]:
    """The better of this epoch and the best so far; a better epoch's weights are saved at once."""
    if report["macro_f1"] <= best["val_macro_f1"]:
        return best
    with atomic_output(config.out / MODEL_FILE) as tmp:
        torch.save({k: v.detach().cpu() for k, v in parts.kept.state_dict().items()}, tmp)
    return {**row, "report": report}


def _stop_after(
    config: FitConfig, ctx: DistContext, pacer: BudgetPacer | None, epoch: int, best: dict[str, Any]
) -> bool:
    """Early stopping or a spent budget (decided together across ranks); rank 0 says why in ``best``."""
    out_of_time = pacer is not None and pacer.spent() >= 1.0
    if not should_stop(ctx, config.patience, epoch, best, out_of_time):
        return False
    if ctx.is_main:
        why = (
            f"the --max-minutes budget ({config.max_minutes:g} min) is spent"
            if out_of_time
            else f"no better validation macro-F1 for {config.patience} epochs"
        )
        log.info(f"stopped after epoch {epoch}: {why}; the best epoch is kept")
        best["stopped_early_after"] = epoch
        best["stop_reason"] = "time budget" if out_of_time else "patience"
    return True


def weight_average(net: nn.Module, epochs: float, steps_per_epoch: int) -> Any:
    """timm's exponential moving average of the weights (and BatchNorm statistics) over about ``epochs``
    epochs, or None when 0. Its warm-up keeps the average close to the live weights in the first steps, so the
    random start does not linger in it."""
    if epochs <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(net, decay=1.0 - 1.0 / max(1.0, epochs * steps_per_epoch), use_warmup=True)


def balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An epoch of draws (with replacement) in which every class is equally likely: the sampler form of
    balancing."""
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    return rng.choice(len(labels), size=len(labels), replace=True, p=weights / weights.sum())


def should_stop(
    ctx: DistContext, patience: int, epoch: int, best: dict[str, Any], out_of_time: bool = False
) -> bool:
    """Early stopping on validation macro-F1 or a spent time budget, decided on rank 0 and shared so every
    rank leaves together (ranks' clocks differ, so the broadcast also runs when only a budget is set)."""
    if patience <= 0 and not out_of_time and not ctx.distributed:
        return False
    stop = ctx.is_main and (out_of_time or (patience > 0 and epoch - best.get("epoch", epoch) >= patience))
    if ctx.distributed:
        flag = torch.tensor([int(stop)], device=ctx.device)
        torch.distributed.broadcast(flag, src=0)
        stop = bool(flag.item())
    return stop


def _validate(
    net: nn.Module, adapter: GrayToNet, data: _Data, config: FitConfig, device: torch.device
) -> tuple[dict[str, Any], dict]:
    """Rank 0 only, on the unwrapped module (DDP's forward would wait for the other ranks)."""
    probs = predict_probs(net, adapter, data.val_views, device, config.batch_size)
    labels = torch.from_numpy(data.val.labels)
    val_loss = float(nn.functional.nll_loss(torch.log(torch.from_numpy(probs) + 1e-12), labels))
    report = classification_report(data.val.labels, probs.argmax(1), data.classes)
    row = {"val_loss": val_loss, "val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"]}
    return row, report


def _write_run(
    config: FitConfig,
    data: _Data,
    history: list[dict[str, Any]],
    best: dict[str, Any],
    parts: _Training,
    seconds: float,
    ctx: DistContext,
) -> dict[str, Any]:
    """The run folder beside the best epoch's model.pt: split, metrics, plots, card, and the OOD gate."""
    out, report, train, val = config.out, best["report"], data.train, data.val
    split = {"train": [s.rel for s in train.samples], "val": [s.rel for s in val.samples]}
    atomic_write(out / SPLIT_FILE, json.dumps(split, indent=1) + "\n")
    skipped = train.skipped + val.skipped
    metrics = {
        "best_epoch": best["epoch"],
        "stopped_early_after": best.get("stopped_early_after"),
        "stop_reason": best.get("stop_reason"),
        "val": report,
        "history": history,
        "skipped": [{"file": f, "error": e} for f, e in skipped],
    }
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    plot_confusion(
        report["confusion"], data.classes, out / "confusion.png", f"validation, epoch {best['epoch']}"
    )
    plot_curves(history, out / "curves.png")
    write_card(out, _run_card(config, data, parts, best, seconds, ctx))
    if config.ood_gate:
        from cxr.train.gate import fit_run_gate
        from cxr.train.run import load_run

        best_card, best_model = load_run(out)  # the best epoch's weights, as saved
        fit_run_gate(out, best_card, best_model.to(ctx.device), train, val, ctx.device, config.batch_size)
    if skipped:
        log.info(f"skipped {len(skipped)} unreadable image(s); see metrics.json")
    log.info(f"run written to {out}: {MODEL_FILE}, card.json, metrics.json, confusion.png, curves.png")
    return metrics


def format_fit(metrics: dict[str, Any]) -> str:
    """What ``cxr-train fit`` shows at the end: the best epoch's validation report."""
    return format_report(
        metrics["val"], f"best epoch {metrics['best_epoch']} (validation, {metrics['val']['n']} images)"
    )


def _run_card(
    config: FitConfig, data: _Data, parts: _Training, best: dict[str, Any], seconds: float, ctx: DistContext
) -> Card:
    """The run's card: what it was trained on and how, its preprocessing, the best epoch's scores."""
    report = best["report"]
    training = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    training.update(
        data=str(Path(config.data).resolve()),
        best_epoch=best["epoch"],
        n_train=len(data.train.images),
        n_val=len(data.val.images),
        skipped=len(data.train.skipped + data.val.skipped),
        seconds=round(seconds, 1),
        device=str(ctx.device),
        world_size=ctx.world_size,
        torch=torch.__version__,
    )
    return Card(
        classes=data.classes,
        arch=config.arch,
        input=InputSpec(size=config.image_size),
        preprocessing=replace(config.suppression(), mean=parts.mean, std=parts.std),
        training=training,
        metrics={
            "val_accuracy": report["accuracy"],
            "val_macro_f1": report["macro_f1"],
            "val_covid_vs_rest": report.get("covid_vs_rest"),
        },
        provenance={"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stage": "cxr-train fit"},
    )
