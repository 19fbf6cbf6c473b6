"""The learning-rate schedule shared by compressor pretraining and adapter finetuning.

A multiplier on each parameter group's base learning rate, a pure function of the optimizer step, so a
resumed run needs no scheduler state: linear warmup over ``warmup_steps``, then a cosine or linear decay
from 1 to ``min_lr_ratio`` at ``total_steps`` (or no decay: ``"constant"``).

>>> lr = base_lr * lr_multiplier(step, total_steps=1000, warmup_steps=20, schedule="cosine", min_lr_ratio=0.1)
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def check_schedule(name: str) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"lr_schedule must be 'cosine', 'linear' or 'constant', got {name!r}")


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str = "cosine",
                  min_lr_ratio: float = 0.0) -> float:
    """Multiplier for optimizer step ``step`` (0-based) on the base learning rate."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * decay
