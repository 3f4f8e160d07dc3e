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
from dataclasses import asdict, replace
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
from cxr.train.data import LoadedImages, load_images, scan_image_folder, split_samples
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


def _fit(config: FitConfig, ctx: DistContext) -> dict[str, Any] | None:
    device, quiet = ctx.device, not ctx.is_main
    torch.manual_seed(config.seed)
    classes, samples = scan_image_folder(config.data)
    train_samples, val_samples = split_samples(samples, config.val_split, config.split_seed_used)
    net = build_net(config.arch, len(classes), config.pretrained)
    if config.init is not None:
        load_init_weights(net, config.init, config.arch, classes, config.suppression())
        seen = init_overlap(config.init, config.data, [s.rel for s in val_samples])
        if seen and ctx.is_main:
            log.warning(
                f"{seen} of {len(val_samples)} validation images were training images of --init "
                f"{config.init}: validation scores are optimistic (keep its split: --split-seed or --seed, "
                "and --val-split)"
            )
    check_image_size(net, config.image_size, config.arch)
    steps_pre = config.suppression()
    train = load_images(train_samples, config.image_size, "loading train", disable=quiet, pre=steps_pre)
    val = load_images(val_samples, config.image_size, "loading val", disable=quiet, pre=steps_pre)
    if len(train.images) == 0 or len(val.images) == 0:
        raise CxrError(
            f"{config.data}: no readable images left after skipping {len(train.skipped) + len(val.skipped)}"
        )
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
        range(len(train.images)), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed
    )
    lr = config.lr or (3e-4 if config.pretrained or config.init else 1e-3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, int(np.ceil(len(sampler) / config.batch_size)))
    steps = config.epochs * steps_per_epoch
    # only rank 0 validates and saves, so only it keeps the average (the other ranks would copy and update it
    # for nothing)
    ema = weight_average(net, config.ema if ctx.is_main else 0.0, steps_per_epoch)
    kept = ema.module if ema is not None else net  # the weights that are validated and saved
    schedule = one_cycle(optimizer, lr, steps, config.warmup)
    weights = class_weights(train.labels, len(classes)).to(device) if config.balance == "weights" else None
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    augment = PaperAugment(config.image_size) if config.augment else None
    erase = CornerErase(config.erase_corners)
    val_views = (
        [evaluation_view(im, config.image_size, steps_pre) for im in val.images] if ctx.is_main else []
    )
    if ctx.is_main:
        config.out.mkdir(parents=True, exist_ok=True)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"val_macro_f1": -1.0}
    started = time.perf_counter()
    pacer = BudgetPacer(ctx, config.max_minutes) if config.max_minutes > 0 else None
    for epoch in range(1, config.epochs + 1):
        sampler.set_epoch(epoch)
        order = np.fromiter(sampler, dtype=np.int64)
        if config.balance == "sampler":
            order = balanced_order(train.labels, np.random.default_rng([config.seed, epoch]))[
                ctx.rank :: ctx.world_size
            ]
        rng = np.random.default_rng([config.seed, epoch, ctx.rank])
        model.train()
        losses, seen, epoch_start = [], 0, time.perf_counter()
        bar = tqdm(
            range(0, len(order), config.batch_size),
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            disable=quiet,
        )
        for start in bar:
            idx = order[start : start + config.batch_size]
            views = [
                view_steps(erase(augment(train.images[i], rng), rng), steps_pre)
                if augment
                else evaluation_view(train.images[i], config.image_size, steps_pre)
                for i in idx
            ]
            pixels = to_batch(views, device)
            target = torch.from_numpy(train.labels[idx]).to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = loss_fn(model(adapter(pixels)), target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if pacer is None:
                schedule.step()
            elif pacer.step(schedule) and ctx.is_main:
                log.info(
                    f"the --max-minutes budget ({config.max_minutes:g} min) ends before epoch "
                    f"{config.epochs}: the learning rate now follows the clock, to anneal by its end"
                )
            if ema is not None:
                ema.update(net, step=schedule.last_epoch)  # the scheduler counts steps taken
            losses.append(float(loss.detach()))
            seen += len(idx)
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        train_seconds = time.perf_counter() - epoch_start
        if ctx.is_main:
            row, report = _validate(kept, adapter, val_views, val, classes, config, device)
            if ema is not None:  # the raw weights' scores, to see what the average adds
                raw, _ = _validate(net, adapter, val_views, val, classes, config, device)
                row.update({f"{key}_raw": value for key, value in raw.items()})
            row.update(
                epoch=epoch,
                train_loss=float(np.mean(losses)),
                train_images_per_s=seen * ctx.world_size / train_seconds,
                lr=float(schedule.get_last_lr()[0]),
                paced_by_budget=pacer is not None and pacer.paced,
            )
            history.append(row)
            log.info(
                f"epoch {epoch}: loss {row['train_loss']:.3f}  val acc {row['val_accuracy']:.3f}  "
                f"val macro-F1 {row['val_macro_f1']:.3f}  ({row['train_images_per_s']:.1f} img/s)"
                + (f"  raw weights: macro-F1 {row['val_macro_f1_raw']:.3f}" if ema is not None else "")
            )
            if report["macro_f1"] > best["val_macro_f1"]:
                best = {**row, "report": report}
                with atomic_output(config.out / MODEL_FILE) as tmp:
                    torch.save({k: v.detach().cpu() for k, v in kept.state_dict().items()}, tmp)
        out_of_time = pacer is not None and pacer.spent() >= 1.0
        if should_stop(ctx, config.patience, epoch, best, out_of_time):
            if ctx.is_main:
                why = (
                    f"the --max-minutes budget ({config.max_minutes:g} min) is spent"
                    if out_of_time
                    else f"no better validation macro-F1 for {config.patience} epochs"
                )
                log.info(f"stopped after epoch {epoch}: {why}; the best epoch is kept")
                best["stopped_early_after"] = epoch
                best["stop_reason"] = "time budget" if out_of_time else "patience"
            break
        barrier(ctx)
    if not ctx.is_main:
        return None
    return _write_run(
        config, classes, train, val, history, best, mean, std, time.perf_counter() - started, ctx
    )


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
    net: nn.Module,
    adapter: GrayToNet,
    views: list[np.ndarray],
    val: LoadedImages,
    classes: tuple[str, ...],
    config: FitConfig,
    device: torch.device,
) -> tuple[dict[str, Any], dict]:
    """Rank 0 only, on the unwrapped module (DDP's forward would wait for the other ranks)."""
    probs = predict_probs(net, adapter, views, device, config.batch_size)
    val_loss = float(
        nn.functional.nll_loss(torch.log(torch.from_numpy(probs) + 1e-12), torch.from_numpy(val.labels))
    )
    report = classification_report(val.labels, probs.argmax(1), classes)
    row = {"val_loss": val_loss, "val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"]}
    return row, report


def _write_run(
    config: FitConfig,
    classes: tuple[str, ...],
    train: LoadedImages,
    val: LoadedImages,
    history: list[dict[str, Any]],
    best: dict[str, Any],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    seconds: float,
    ctx: DistContext,
) -> dict[str, Any]:
    out = config.out
    report = best["report"]
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
    plot_confusion(report["confusion"], classes, out / "confusion.png", f"validation, epoch {best['epoch']}")
    plot_curves(history, out / "curves.png")
    training = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    training.update(
        data=str(Path(config.data).resolve()),
        best_epoch=best["epoch"],
        n_train=len(train.images),
        n_val=len(val.images),
        skipped=len(skipped),
        seconds=round(seconds, 1),
        device=str(ctx.device),
        world_size=ctx.world_size,
        torch=torch.__version__,
    )
    card = Card(
        classes=classes,
        arch=config.arch,
        input=InputSpec(size=config.image_size),
        preprocessing=replace(config.suppression(), mean=mean, std=std),
        training=training,
        metrics={
            "val_accuracy": report["accuracy"],
            "val_macro_f1": report["macro_f1"],
            "val_covid_vs_rest": report.get("covid_vs_rest"),
        },
        provenance={"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stage": "cxr-train fit"},
    )
    write_card(out, card)
    if config.ood_gate:
        from cxr.train.gate import fit_run_gate
        from cxr.train.run import load_run

        best_card, best_model = load_run(out)  # the best epoch's weights, as saved
        fit_run_gate(out, best_card, best_model.to(ctx.device), train, val, ctx.device, config.batch_size)
    log.info(format_report(report, f"best epoch {best['epoch']} (validation, {len(val.images)} images)"))
    if skipped:
        log.info(f"skipped {len(skipped)} unreadable image(s); see metrics.json")
    log.info(f"run written to {out}: {MODEL_FILE}, card.json, metrics.json, confusion.png, curves.png")
    return metrics
