"""The training core shared by pretraining and finetuning: schedule, RNG capture, the optimisation loop."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lloco_index.training import checkpoint as ckpt
from lloco_index.training.loop import AfterStep, TrainLoop
from lloco_index.training.schedule import lr_multiplier


def test_schedule_warms_up_then_decays_to_the_floor():
    kw = dict(total_steps=10, warmup_steps=2)
    assert [lr_multiplier(s, **kw, schedule="constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cosine = [lr_multiplier(s, **kw, schedule="cosine", min_lr_ratio=0.1) for s in range(2, 11)]
    assert cosine[0] == 1.0 and all(a > b for a, b in zip(cosine, cosine[1:])) and cosine[-1] == pytest.approx(0.1)
    assert lr_multiplier(6, **kw, schedule="linear") == pytest.approx(0.5)
    assert lr_multiplier(6, **kw, schedule="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    with pytest.raises(ValueError, match="lr_schedule must be"):
        TrainLoop(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), total_steps=1, warmup_steps=0,
                  lr_schedule="step", max_grad_norm=0, checkpoint_every=0)


def test_rng_state_restores_python_and_torch_and_reads_the_older_finetune_shape():
    state = ckpt.rng_state()
    first = (random.random(), torch.rand(3))
    ckpt.set_rng_state(state)
    again = (random.random(), torch.rand(3))
    assert first[0] == again[0] and torch.equal(first[1], again[1])
    ckpt.set_rng_state({"cpu": state["torch"]})  # finetuning checkpoints recorded torch's generator only
    assert torch.equal(torch.rand(3), first[1])


def _loop(checkpoint_every: int, max_grad_norm: float = 0.0):
    weight = torch.nn.Parameter(torch.tensor([3.0]))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    loop = TrainLoop(optimizer, total_steps=6, warmup_steps=0, lr_schedule="linear", max_grad_norm=max_grad_norm,
                     checkpoint_every=checkpoint_every, progress=False)
    return weight, optimizer, loop


def test_loop_schedules_clips_steps_and_checkpoints():
    weight, optimizer, loop = _loop(checkpoint_every=4, max_grad_norm=0.0)
    optimizer.param_groups[0]["lr"] = 123.0  # e.g. restored from a checkpoint: the loop's base rate wins
    seen, saved = [], []

    def step_fn(step):
        (weight ** 2).sum().backward()  # gradient 2w
        return float(weight.grad.detach())

    def after(done, grad, stats):
        seen.append((done, grad, stats.grad_norm, stats.lrs[0]))
        return AfterStep()

    assert loop.run(0, 5, step_fn, after, saved.append) == 5
    # lr 0.5 * (1 - step/6); w <- w - lr * 2w; max_grad_norm 0 measures without clipping
    w, expected = 3.0, []
    for step in range(5):
        lr = 0.5 * (1 - step / 6)
        expected.append((step + 1, 2 * w, 2 * w, lr))
        w -= lr * 2 * w
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5]
    for got, want in zip(seen, expected):
        assert got == pytest.approx(want)
    assert saved == [4, 5]  # the cadence, then where this call stopped (a time-sliced run resumes there)
    assert weight.grad is None  # no gradient is left behind for the next call

    weight, _, loop = _loop(checkpoint_every=0, max_grad_norm=1.0)
    norms, saved = [], []

    def clipped(step):
        (weight * 10).sum().backward()
        return None

    def stop_at_2(done, _, stats):
        norms.append(stats.grad_norm)
        return AfterStep(finished=done == 2, checkpoint=True)

    assert loop.run(0, 6, clipped, stop_at_2, saved.append) == 2  # finished early
    assert norms == [10.0, 10.0] and saved == []  # checkpoint_every 0: never
    assert float(weight.detach()) == pytest.approx(3.0 - 0.5 * 1.0 - 0.5 * (5 / 6) * 1.0)  # gradient clipped to norm 1
