"""What ``cxr-train fit`` is asked to do, checked before torch is imported (a bad option answers at once)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cxr.runtime.card import Preprocessing
from cxr.runtime.errors import CxrError, CxrUsageError

DEVICES = ("auto", "cpu", "cuda")
BALANCING = ("weights", "sampler", "none")


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    data: Path
    out: Path
    arch: str = "dpn92_se"
    epochs: int = 10
    image_size: int = 224
    batch_size: int = 16
    lr: float | None = None
    seed: int = 0
    split_seed: int | None = None  # the validation split's own seed (None: --seed)
    val_split: float = 0.2
    augment: bool = True
    pretrained: bool = False
    init: Path | None = None  # an earlier run folder whose weights this run starts from (fine-tuning)
    device: str = "auto"
    # the recipe
    balance: str = "weights"  # class-weighted loss, a class-balanced sampler, or neither
    warmup: float = 0.15  # share of steps warming up before the cosine decay
    label_smoothing: float = 0.1
    patience: int = 0  # stop after this many epochs without a better validation macro-F1 (0: never)
    max_minutes: float = 0.0  # stop after the epoch that spends this budget, paced to anneal (0: none)
    weight_decay: float = 1e-4  # AdamW's decoupled weight decay
    ema: float = 0.0  # validate and keep an exponential moving average of the weights over ~this many epochs
    # shortcut suppression (cxr.runtime.suppress), recorded in the card so the runtime repeats it
    thorax_crop: bool = True
    clahe: bool = True
    border_mask: float = 0.0
    erase_corners: float = 0.5  # training-only augmentation
    ood_gate: bool = True  # fit the out-of-distribution gate (cxr.train.gate) on the training split

    def __post_init__(self) -> None:
        self._check_recipe()
        self._check_limits()
        self._check_sources()

    def _check_recipe(self) -> None:
        """The training recipe's numbers and choices in range, as one-line usage errors."""
        if self.epochs < 1 or self.batch_size < 1:
            raise CxrUsageError("--epochs and --batch-size must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise CxrUsageError(f"--lr must be more than 0, got {self.lr}")
        if not 0.0 < self.val_split < 1.0:
            raise CxrUsageError(f"--val-split must be between 0 and 1, got {self.val_split}")
        if self.balance not in BALANCING:
            raise CxrUsageError(f"--balance must be one of {', '.join(BALANCING)}, got {self.balance!r}")
        if not 0.0 < self.warmup < 1.0:
            raise CxrUsageError(f"--warmup must be between 0 and 1, got {self.warmup}")
        if not 0.0 <= self.label_smoothing < 1.0 or not 0.0 <= self.erase_corners <= 1.0:
            raise CxrUsageError("--label-smoothing must be in [0, 1) and --erase-corners in [0, 1]")

    def _check_limits(self) -> None:
        """The view's border, the budget, regularisation, patience and device."""
        if not 0.0 <= self.border_mask < 0.25:
            raise CxrUsageError(f"--border-mask must be in [0, 0.25), got {self.border_mask}")
        if not self.max_minutes >= 0:
            raise CxrUsageError(f"--max-minutes must be 0 (no budget) or more, got {self.max_minutes}")
        if not self.weight_decay >= 0 or not self.ema >= 0:
            raise CxrUsageError("--weight-decay and --ema must be 0 (off) or more")
        if self.patience < 0:
            raise CxrUsageError(f"--patience must be 0 (off) or more, got {self.patience}")
        if self.device not in DEVICES:
            raise CxrUsageError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")

    def _check_sources(self) -> None:
        """Where the images and starting weights come from: one start, and folders that exist."""
        if self.init is not None and self.pretrained:
            raise CxrUsageError("--init and --pretrained both choose the starting weights: give one")
        if self.init is not None and not (Path(self.init) / "model.pt").is_file():
            raise CxrError(f"{self.init}: not a run folder (no model.pt from 'cxr-train fit' to start from)")
        if not Path(self.data).is_dir():
            raise CxrError(f"{self.data}: data folder does not exist (expected one sub-folder per class)")

    @property
    def split_seed_used(self) -> int:
        return self.seed if self.split_seed is None else self.split_seed

    def suppression(self) -> Preprocessing:
        """The card's preprocessing steps this run trains with (mean/std are the network's, filled in
        later)."""
        return Preprocessing(thorax_crop=self.thorax_crop, clahe=self.clahe, border_mask=self.border_mask)
