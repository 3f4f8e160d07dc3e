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
    print(f"wrote {sum(counts.values())} phantoms ({per_class} per class, {size} px) to {out}; "
          f"lesion masks in {out / MASKS_FILE}")


@app.command()
def fit(
    data: Path = typer.Argument(..., help="ImageFolder: one sub-folder per class (optional manifest.csv with patient_id)."),
    out: Path = typer.Option(..., "--out", help="Run folder to write."),
    arch: str = typer.Option("dpn92_se", help="dpn92_se, dpn68_se, dpn_se_tiny, or any timm architecture."),
    epochs: int = typer.Option(10, help="Training epochs."),
    image_size: int = typer.Option(224, help="Input size (short side scaled to it, then cropped)."),
    batch_size: int = typer.Option(16, help="Batch size."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 1e-3, or 3e-4 with --pretrained)."),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same result on CPU."),
    val_split: float = typer.Option(0.2, help="Validation fraction (patient-disjoint when manifest.csv has patient_id)."),
    no_augment: bool = typer.Option(False, "--no-augment", help="Turn off the paper's augmentation (ablation)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Start from timm's ImageNet weights (needs internet)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
) -> None:
    """Train a model; writes model.pt, card.json, metrics.json, confusion.png, curves.png."""
    from cxr.train.config import FitConfig

    config = FitConfig(data=data, out=out, arch=arch, epochs=epochs, image_size=image_size, batch_size=batch_size,
                       lr=lr, seed=seed, val_split=val_split, augment=not no_augment, pretrained=pretrained,
                       device=device)  # checked here, before torch is imported
    from cxr.train.fit import fit as run_fit

    run_fit(config)


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="Run folder from 'cxr-train fit'."),
    data: Path = typer.Argument(..., help="Labelled ImageFolder to evaluate on."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON report (default RUN/evaluation.json); a PNG beside it."),
) -> None:
    """Accuracy, per-class and COVID-19-vs-rest precision/recall/F1, next to the shortcut baseline."""
    from cxr.train.evaluate import evaluate as run_evaluate

    run_evaluate(run, data, out)


@app.command()
def shortcut(
    data: Path = typer.Argument(..., help="Labelled ImageFolder."),
    test: Optional[Path] = typer.Option(None, "--test", help="Train on all of DATA, test on this folder."),
    image_size: int = typer.Option(224, help="Short side the statistics are computed at."),
    val_split: float = typer.Option(0.2, help="Validation fraction when --test is not given (as fit)."),
    seed: int = typer.Option(0, help="Split seed (as fit)."),
) -> None:
    """How far a classifier on trivial image statistics (size, intensities, thumbnail) gets."""
    from cxr.runtime.metrics import format_report
    from cxr.train.data import load_images, scan_image_folder, split_samples
    from cxr.train.shortcut import shortcut_baseline

    classes, samples = scan_image_folder(data)
    if test is None:
        train_samples, test_samples = split_samples(samples, val_split, seed)
        where = f"validation split of {data} (same split as fit with --seed {seed})"
    else:
        _, test_samples = scan_image_folder(test, classes)
        train_samples, where = samples, str(test)
    report = shortcut_baseline(load_images(train_samples, image_size), load_images(test_samples, image_size), classes, seed)
    print(format_report(report, f"shortcut baseline on {where}"))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    run_app(app)


if __name__ == "__main__":
    main()
