"""``cxr-train``: phantoms, fit, evaluate, shortcut baseline."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from cxr.runtime.cli_util import new_app, run_app

app = new_app("Train and evaluate chest X-ray classifiers (DPN-SE and any timm architecture).")


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write (one sub-folder per class)."),
    per_class: int = typer.Option(40, help="Phantoms per class."),
    size: int = typer.Option(128, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Write synthetic chest-like phantoms with planted lesions (data for tests and the quick start)."""
    from cxr.train.synth import MASKS_FILE, write_phantoms

    counts = write_phantoms(out, per_class, size, seed)
    print(
        f"wrote {sum(counts.values())} phantoms ({per_class} per class, {size} px) to {out}; "
        f"lesion masks in {out / MASKS_FILE}"
    )


@app.command()
def fit(
    data: Path = typer.Argument(
        ..., help="ImageFolder: one sub-folder per class (optional manifest.csv with patient_id)."
    ),
    out: Path = typer.Option(..., "--out", help="Run folder to write."),
    arch: str = typer.Option("dpn92_se", help="dpn92_se, dpn68_se, dpn_se_tiny, or any timm architecture."),
    epochs: int = typer.Option(10, help="Training epochs."),
    image_size: int = typer.Option(224, help="Input size (short side scaled to it, then cropped)."),
    batch_size: int = typer.Option(16, help="Batch size."),
    lr: Optional[float] = typer.Option(
        None, help="Peak learning rate (default 1e-3, or 3e-4 with --pretrained or --init)."
    ),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same result on CPU."),
    split_seed: Optional[int] = typer.Option(
        None,
        help="Seed of the validation split alone (default: --seed): other --seed values on the same split "
        "show how much a result moves from one training run to the next.",
    ),
    val_split: float = typer.Option(
        0.2, help="Validation fraction (patient-disjoint when manifest.csv has patient_id)."
    ),
    no_augment: bool = typer.Option(
        False, "--no-augment", help="Turn off the paper's augmentation (ablation)."
    ),
    pretrained: bool = typer.Option(
        False, "--pretrained", help="Start from timm's ImageNet weights (needs internet)."
    ),
    init: Optional[Path] = typer.Option(
        None,
        metavar="<run>",
        help="Start from an earlier run's weights (same --arch and classes): fine-tune on new images.",
    ),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    balance: str = typer.Option(
        "weights", help="Class imbalance: weights (weighted loss), sampler (class-balanced draws) or none."
    ),
    warmup: float = typer.Option(0.15, help="Share of steps warming up before the cosine decay."),
    label_smoothing: float = typer.Option(0.1, help="Label smoothing of the loss (0: off)."),
    patience: int = typer.Option(
        0, help="Stop after this many epochs without a better validation macro-F1 (0: off)."
    ),
    max_minutes: float = typer.Option(
        0.0,
        help="Stop after the epoch that spends this many minutes of training (0: no budget); the run is "
        "written as usual, with the best epoch so far. When the budget ends first, the learning rate follows "
        "the clock and still anneals by its end (the result then depends on the machine's speed).",
    ),
    weight_decay: float = typer.Option(1e-4, help="AdamW's weight decay."),
    ema: float = typer.Option(
        0.0,
        help="Keep an exponential moving average of the weights over about this many epochs, and validate "
        "and save it instead of the raw weights (0: off); the raw weights' scores stay in metrics.json.",
    ),
    thorax_crop: bool = typer.Option(
        True,
        "--thorax-crop/--no-thorax-crop",
        help="Crop each film to the body (shortcut suppression; the runtime repeats it).",
    ),
    clahe: bool = typer.Option(
        True, "--clahe/--no-clahe", help="Contrast-limited histogram equalisation (same)."
    ),
    border_mask: float = typer.Option(
        0.0, help="Blank this fraction of the side at each edge of the view (same)."
    ),
    erase_corners: float = typer.Option(
        0.5, help="Training only: chance per corner of erasing a random square."
    ),
    ood_gate: bool = typer.Option(
        True,
        "--ood-gate/--no-ood-gate",
        help="Fit the out-of-distribution gate on the training films at the end (see 'cxr-train gate').",
    ),
) -> None:
    """Train a model; writes model.pt, card.json, metrics.json, confusion.png, curves.png."""
    from cxr.train.config import FitConfig

    config = FitConfig(
        data=data,
        out=out,
        arch=arch,
        epochs=epochs,
        image_size=image_size,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        split_seed=split_seed,
        val_split=val_split,
        augment=not no_augment,
        pretrained=pretrained,
        init=init,
        device=device,
        balance=balance,
        warmup=warmup,
        label_smoothing=label_smoothing,
        patience=patience,
        max_minutes=max_minutes,
        weight_decay=weight_decay,
        ema=ema,
        thorax_crop=thorax_crop,
        clahe=clahe,
        border_mask=border_mask,
        erase_corners=erase_corners,
        ood_gate=ood_gate,
    )  # checked here, before torch is imported
    from cxr.train.fit import fit as run_fit
    from cxr.train.fit import format_fit

    metrics = run_fit(config)
    if metrics is not None:  # rank 0 (the other ranks of a torchrun return None)
        print(format_fit(metrics))


@app.command()
def gate(
    run: Path = typer.Argument(..., help="Run folder from 'cxr-train fit'."),
    data: Path = typer.Argument(..., help="The data folder the run was trained on (its split.json is used)."),
    keep: float = typer.Option(0.95, help="Share of the run's validation films the gate lets pass."),
    parts: str = typer.Option(
        "mahalanobis:all,image",
        help="Comma-separated parts: mahalanobis:all (every stage), mahalanobis:<stage>, energy, image.",
    ),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
) -> None:
    """(Re)fit a run's out-of-distribution gate on its training split, thresholded on its validation split:
    for runs trained before gates existed, or another --keep / --parts. Writes RUN/ood.npz and the card."""
    from cxr.runtime.errors import CxrUsageError

    if not 0.5 <= keep < 1:
        raise CxrUsageError(f"--keep must be in [0.5, 1), got {keep}")
    from cxr.train.gate import refit_run_gate

    refit_run_gate(run, data, tuple(p.strip() for p in parts.split(",") if p.strip()), keep, device)


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="Run folder from 'cxr-train fit'."),
    data: Path = typer.Argument(..., help="Labelled ImageFolder to evaluate on."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="JSON report (default RUN/evaluation.json); a PNG beside it."
    ),
    lime_audit: int = typer.Option(
        0,
        "--lime-audit",
        help="Explain this many images and report the share of "
        "positive LIME weight outside the body (0: off).",
    ),
    lime_samples: int = typer.Option(300, help="LIME samples per audited image."),
    seed: int = typer.Option(0, help="Seed of the bootstrap, the baseline and the audit's picks."),
    device: str = typer.Option(
        "auto", help="cpu, cuda or auto (the GPU when PyTorch sees one): where the network and the audit run."
    ),
) -> None:
    """Per-class P/R/F1 with bootstrap 95 % intervals, the shortcut baseline on the same images and the gain
    over it with its interval, optionally a LIME audit; JSON plus one PNG page."""
    if lime_audit < 0 or lime_samples < 10:
        from cxr.runtime.errors import CxrUsageError

        raise CxrUsageError("--lime-audit must be 0 or more and --lime-samples at least 10")
    from cxr.train.evaluate import evaluate as run_evaluate
    from cxr.train.evaluate import format_evaluation

    result = run_evaluate(
        run, data, out, lime_audit_images=lime_audit, lime_samples=lime_samples, seed=seed, device=device
    )
    print(format_evaluation(result))


@app.command()
def shortcut(
    data: Path = typer.Argument(..., help="Labelled ImageFolder."),
    test: Optional[Path] = typer.Option(None, "--test", help="Train on all of DATA, test on this folder."),
    image_size: int = typer.Option(224, help="Short side the statistics are computed at."),
    val_split: float = typer.Option(0.2, help="Validation fraction when --test is not given (as fit)."),
    seed: int = typer.Option(0, help="Split seed (as fit's --split-seed, which defaults to its --seed)."),
) -> None:
    """How far a classifier on trivial image statistics (size, intensities, thumbnail) gets."""
    from cxr.runtime.metrics import format_report
    from cxr.train.data import load_images, scan_image_folder, split_samples
    from cxr.train.shortcut import describe_feature_parts, shortcut_baseline

    classes, samples = scan_image_folder(data)
    if test is None:
        train_samples, test_samples = split_samples(samples, val_split, seed)
        where = f"validation split of {data} (same split as fit with --split-seed {seed})"
    else:
        _, test_samples = scan_image_folder(test, classes)
        train_samples, where = samples, str(test)
    report, _ = shortcut_baseline(
        load_images(train_samples, image_size), load_images(test_samples, image_size), classes, seed
    )
    print(format_report(report, f"shortcut baseline on {where}"))
    print(describe_feature_parts(report["accuracy_by_features"]))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    run_app(app)


if __name__ == "__main__":
    main()
