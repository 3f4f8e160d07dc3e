"""What ``cxr-train fit`` is asked to do, checked before torch is imported (a bad option answers at once)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cxr.runtime.errors import CxrError, CxrUsageError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class FitConfig:
    data: Path
    out: Path
    arch: str = "dpn92_se"
    epochs: int = 10
    image_size: int = 224
    batch_size: int = 16
    lr: float | None = None
    seed: int = 0
    val_split: float = 0.2
    augment: bool = True
    pretrained: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise CxrUsageError("--epochs and --batch-size must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise CxrUsageError(f"--lr must be more than 0, got {self.lr}")
        if not 0.0 < self.val_split < 1.0:
            raise CxrUsageError(f"--val-split must be between 0 and 1, got {self.val_split}")
        if self.device not in DEVICES:
            raise CxrUsageError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not Path(self.data).is_dir():
            raise CxrError(f"{self.data}: data folder does not exist (expected one sub-folder per class)")
