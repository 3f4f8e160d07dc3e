"""The learning-rate schedule: warm-up then cosine decay (PyTorch's one-cycle). Under a time budget it follows
the clock as well as the step count, so a fit that ``--max-minutes`` ends early still anneals.

Without it a budget cuts the schedule off at its peak: the H100 ablation's dpn92_se runs stopped after 15 of
30 epochs with the learning rate still high (benchmarks/results/h100/clinical.md)."""

from __future__ import annotations

import math
import time

import torch
from cxr.train.distributed import DistContext


def one_cycle(
    optimizer: torch.optim.Optimizer, lr: float, steps: int, warmup: float
) -> torch.optim.lr_scheduler.OneCycleLR:
    """Warm-up over ``warmup`` of the steps, then cosine decay to almost 0."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=warmup, anneal_strategy="cos"
    )


class BudgetPacer:
    """Steps a schedule under a time budget: the spent share of the budget is the same on every rank (rank 0's
    clock decides: ranks that took different learning rates would drift apart under DistributedDataParallel),
    and the pacer remembers whether the clock has set the pace."""

    def __init__(self, ctx: DistContext, minutes: float) -> None:
        self.ctx, self.seconds, self.started = ctx, 60.0 * minutes, time.perf_counter()
        self.steps_taken, self.paced = 0, False

    def spent(self) -> float:
        """The spent share of the budget (may pass 1)."""
        fraction = (time.perf_counter() - self.started) / self.seconds
        if self.ctx.distributed:
            shared = torch.tensor([fraction], dtype=torch.float64, device=self.ctx.device)
            torch.distributed.broadcast(shared, src=0)
            fraction = float(shared.item())
        return fraction

    def step(self, schedule: torch.optim.lr_scheduler.OneCycleLR) -> bool:
        """One step on the clock; True the first time the budget, not the epoch count, sets the pace."""
        self.steps_taken += 1
        step_within_budget(schedule, self.spent())
        newly = not self.paced and paced_by_budget(schedule, self.steps_taken)
        self.paced = self.paced or newly
        return newly


def step_within_budget(schedule: torch.optim.lr_scheduler.OneCycleLR, spent: float) -> None:
    """One scheduler step that lands at least at the budget's spent share of the schedule: it jumps ahead when
    the clock is ahead of the step count."""
    total = schedule.total_steps
    on_clock = math.floor(spent * total)
    # one-cycle raises past its last step: a run that outlives its budget stays at the end
    schedule.last_epoch = min(total, max(schedule.last_epoch + 1, on_clock)) - 1
    schedule.step()


def paced_by_budget(schedule: torch.optim.lr_scheduler.OneCycleLR, steps_taken: int) -> bool:
    """Whether the clock has moved the schedule more than 1 % of it past the steps taken (a slow first batch
    alone does not count)."""
    return schedule.last_epoch - steps_taken > 0.01 * schedule.total_steps
