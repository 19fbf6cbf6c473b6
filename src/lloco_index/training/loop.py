"""The optimisation loop shared by compressor pretraining and adapter finetuning.

A trainer supplies what one optimizer step computes (``step_fn``: its micro-batches, their losses and
backward passes, weighted as that trainer's loss is defined) and what follows a step (``after_step``:
metrics, evaluation, early stopping). The loop does the rest the same way for both: every parameter
group's learning rate from :func:`.schedule.lr_multiplier` (a function of the step, so a resume restores
no scheduler), gradient clipping, the optimizer step, the checkpoint cadence, the progress bar, and
stopping after a given step (time-sliced runs always leave a checkpoint where they stop).

>>> loop = TrainLoop(optimizer, total_steps=100, warmup_steps=5, lr_schedule="cosine", max_grad_norm=1.0,
...                  checkpoint_every=10, desc="train")      # before loading a checkpoint's optimizer state
>>> step = loop.run(start, end, step_fn, after_step, save)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from .schedule import check_schedule, lr_multiplier


@dataclass
class StepStats:
    """What the loop measured of one optimizer step."""

    grad_norm: float  # before clipping
    seconds: float  # wall time of the step: forward, backward and optimizer update
    lrs: list[float]  # the learning rate of each parameter group at this step


@dataclass
class AfterStep:
    """What a trainer decided after a step."""

    postfix: dict[str, Any] = field(default_factory=dict)  # shown on the progress bar
    checkpoint: bool = False  # checkpoint now, whatever the cadence (e.g. after a validation)
    finished: bool = False  # training is over (last step, early stop): checkpoint and leave the loop


@dataclass
class TrainLoop:
    """Scheduled, clipped optimizer steps with checkpoints and a progress bar.

    The base learning rate of each group is read from ``optimizer`` when the loop is built: build it
    before loading a checkpoint's optimizer state (which holds the last scheduled rates, not the base ones).
    ``max_grad_norm`` 0 measures the gradient norm without clipping; ``checkpoint_every`` 0 never checkpoints.
    """

    optimizer: torch.optim.Optimizer
    total_steps: int
    warmup_steps: int
    lr_schedule: str
    max_grad_norm: float
    checkpoint_every: int
    min_lr_ratio: float = 0.0
    desc: str = "train"
    progress: bool = True
    base_lrs: list[float] = field(init=False)
    params: list[torch.nn.Parameter] = field(init=False)

    def __post_init__(self) -> None:
        check_schedule(self.lr_schedule)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def lrs_at(self, step: int) -> list[float]:
        """Each group's learning rate for optimizer step ``step`` (0-based)."""
        m = lr_multiplier(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                          schedule=self.lr_schedule, min_lr_ratio=self.min_lr_ratio)
        return [base * m for base in self.base_lrs]

    def run(self, start: int, end: int, step_fn: Callable[[int], Any],
            after_step: Callable[[int, Any, StepStats], AfterStep],
            save: Optional[Callable[[int], None]] = None) -> int:
        """Steps ``start`` .. ``end - 1``; returns the number of steps done in all (the next step).

        ``step_fn(step)`` accumulates the gradients of step ``step`` and returns anything; ``after_step(done,
        out, stats)`` gets the count of steps done (``step + 1``), that value and :class:`StepStats`.
        ``save(done)`` is called every ``checkpoint_every`` steps, when ``after_step`` asks for it, and at
        the last step of this call.
        """
        bar = tqdm(total=self.total_steps, initial=start, desc=self.desc, unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        step = start
        self.optimizer.zero_grad(set_to_none=True)
        try:
            while step < end:
                began = time.perf_counter()
                lrs = self.lrs_at(step)
                for group, lr in zip(self.optimizer.param_groups, lrs):
                    group["lr"] = lr
                out = step_fn(step)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or float("inf")))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                decision = after_step(step, out, StepStats(grad_norm, time.perf_counter() - began, lrs))
                bar.update(1)
                if decision.postfix:
                    bar.set_postfix(decision.postfix)
                last = decision.finished or step >= end
                due = self.checkpoint_every and (step % self.checkpoint_every == 0 or decision.checkpoint or last)
                if save is not None and due:
                    save(step)
                if decision.finished:
                    break
        finally:
            bar.close()
        return step
