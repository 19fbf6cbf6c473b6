"""Atomic training checkpoints for exact resume (no pickle: safetensors, JSON, ``weights_only`` loads).

Layout under a run directory::

    run/checkpoints/step-000040/   adapter.safetensors, best_adapter.safetensors, optimizer.pt, rng.pt, state.json
    run/checkpoints/LATEST         "step-000040"

A checkpoint directory is written completely (files fsynced) under a temporary name, renamed into place,
and only then named by ``LATEST`` (itself replaced atomically). A crash at any point leaves the previous
checkpoint as the one that loads; stray temporaries are removed on the next save.

>>> ckpt = CheckpointDir(run_dir / "checkpoints")
>>> ckpt.save(step, tensors={"adapter": sd}, objects={"optimizer": opt.state_dict()}, state={...})
>>> loaded = ckpt.load_latest()         # None when there is none
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..fileio import atomic_write_bytes

POINTER = "LATEST"


@dataclass
class Checkpoint:
    step: int
    path: Path
    state: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]
    objects: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointDir:
    """Numbered, atomically published checkpoints; keeps the newest ``keep``."""

    def __init__(self, root: Path, keep: int = 1):
        self.root = Path(root)
        self.keep = max(1, keep)

    def latest_name(self) -> Optional[str]:
        pointer = self.root / POINTER
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        return name if (self.root / name / "state.json").is_file() else None

    def save(self, step: int, *, tensors: dict[str, dict[str, torch.Tensor]], objects: dict[str, Any],
             state: dict[str, Any]) -> Path:
        """Write a checkpoint for ``step`` and publish it. ``objects`` must be tensor/plain-type containers."""
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:06d}"
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{name}-"))
        try:
            for key, sd in tensors.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / f"{key}.safetensors"))
            for key, obj in objects.items():
                torch.save(obj, str(tmp / f"{key}.pt"))
            (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            target = self.root / name
            if target.exists():  # a re-save of the same step (e.g. after a validation): replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_bytes(self.root / POINTER, name.encode())
        self._prune(keep_name=name)
        return self.root / name

    def _prune(self, keep_name: str) -> None:
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        survivors = set(p.name for p in steps[-self.keep:]) | {keep_name}
        for p in steps:
            if p.name not in survivors:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".step-*"):  # temporaries of an interrupted save
            shutil.rmtree(p, ignore_errors=True)

    def load_latest(self) -> Optional[Checkpoint]:
        from safetensors.torch import load_file

        name = self.latest_name()
        if name is None:
            return None
        path = self.root / name
        state = json.loads((path / "state.json").read_text())
        tensors = {f.stem: load_file(str(f)) for f in path.glob("*.safetensors")}
        objects = {f.stem: torch.load(str(f), weights_only=True) for f in path.glob("*.pt")}
        return Checkpoint(step=int(state["step"]), path=path, state=state, tensors=tensors, objects=objects)

    def clear(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)
