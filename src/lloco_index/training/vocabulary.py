"""One vocabulary for the optimisation settings of compressor pretraining and adapter finetuning.

:class:`~lloco_index.training.pretrain.PretrainConfig` and :class:`~lloco_index.finetune.config.FinetuneConfig`
name what they share the same way: ``learning_rate`` (the peak rate, before the schedule),
``lr_schedule`` (:mod:`.schedule`), ``grad_accum_steps`` (micro-batches per optimizer step),
``weight_decay``, ``max_grad_norm``, ``checkpoint_every`` and ``seed``. Configs saved under the names
pretraining used before (``lr``, ``schedule``, ``grad_accum``: every older ``config.json`` and checkpoint of a
pretraining run) load through :func:`upgrade_names`, so those runs still resume and export.
"""

from __future__ import annotations

from typing import Any

RENAMED = {"lr": "learning_rate", "schedule": "lr_schedule", "grad_accum": "grad_accum_steps"}


def upgrade_names(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with every old name replaced by its current one (a current name given as well wins)."""
    out = dict(data)
    for old, new in RENAMED.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out
