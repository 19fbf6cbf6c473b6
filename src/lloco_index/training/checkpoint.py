"""Atomic training checkpoints for exact resume, one format for compressor pretraining and adapter finetuning.

Layout under a run's checkpoint folder (no pickle: safetensors, JSON, ``weights_only`` loads)::

    checkpoints/step-000040/   <name>.safetensors (weights), <name>.pt (optimizer, RNG), state.json
    checkpoints/LATEST         "step-000040"

``state.json`` holds the step, the data position and whatever else the trainer records (config, history).
A checkpoint directory is written completely (files fsynced) under a temporary name, renamed into place,
and only then named by ``LATEST`` (itself replaced atomically). A crash at any point leaves the previous
checkpoint as the one that loads; stray temporaries are removed on the next save.

>>> ckpt = CheckpointDir(run_dir / "checkpoints")
>>> ckpt.save(step, tensors={"adapter": sd}, objects={"optimizer": opt.state_dict(), "rng": rng_state()},
...           state={"step": step, ...})
>>> loaded = ckpt.load_latest()         # None when there is none

Pretraining runs written before this format hold one ``torch.save`` file per checkpoint
(``checkpoints/step-00000050.pt``); :func:`load_run_checkpoint` resumes from them as they are, and
:func:`convert_legacy_checkpoints` rewrites them in this layout.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..fileio import atomic_write_bytes

CHECKPOINT_DIR = "checkpoints"
POINTER = "LATEST"
_DIR_NAME = re.compile(r"^step-(\d+)$")
_LEGACY_NAME = re.compile(r"^step-(\d+)\.pt$")


@dataclass
class Checkpoint:
    step: int
    path: Path
    state: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]
    objects: dict[str, Any]


# ------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """Every generator a training step draws from: Python's ``random``, torch's CPU and CUDA generators."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`; finetuning checkpoints written before it recorded Python's RNG name torch's 'cpu'."""
    if "python" in state:
        random.setstate(state["python"])
    torch.set_rng_state(state["torch"] if "torch" in state else state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------ the format
def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointDir:
    """Numbered, atomically published checkpoints; keeps the newest ``keep`` (``keep <= 0``: all)."""

    def __init__(self, root: Union[str, Path], keep: int = 1):
        self.root = Path(root)
        self.keep = keep

    def latest_name(self) -> Optional[str]:
        pointer = self.root / POINTER
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        return name if (self.root / name / "state.json").is_file() else None

    def names(self) -> list[str]:
        """Published checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p.name) for p in self.root.iterdir() if (m := _DIR_NAME.match(p.name)) and p.is_dir()]
        return [name for _, name in sorted(found)]

    @staticmethod
    def name_of(step: int) -> str:
        return f"step-{step:06d}"

    def save(self, step: int, *, tensors: dict[str, dict[str, torch.Tensor]], objects: dict[str, Any],
             state: dict[str, Any]) -> Path:
        """Write a checkpoint for ``step`` and publish it. ``objects`` must be tensor/plain-type containers."""
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        name = self.name_of(step)
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
        names = self.names()
        survivors = set(names[-self.keep:] if self.keep > 0 else names) | {keep_name}
        for name in names:
            if name not in survivors:
                shutil.rmtree(self.root / name, ignore_errors=True)
        for p in self.root.glob(".step-*"):  # temporaries of an interrupted save
            shutil.rmtree(p, ignore_errors=True)

    def load(self, name: str) -> Checkpoint:
        from safetensors.torch import load_file

        path = self.root / name
        state = json.loads((path / "state.json").read_text())
        tensors = {f.stem: load_file(str(f)) for f in path.glob("*.safetensors")}
        objects = {f.stem: torch.load(str(f), map_location="cpu", weights_only=True) for f in path.glob("*.pt")}
        return Checkpoint(step=int(state["step"]), path=path, state=state, tensors=tensors, objects=objects)

    def load_latest(self) -> Optional[Checkpoint]:
        """The checkpoint ``LATEST`` names (``None`` when there is none)."""
        name = self.latest_name()
        return None if name is None else self.load(name)

    def clear(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)


# ------------------------------------------------------------- a run's
def legacy_checkpoints(run_dir: Union[str, Path]) -> list[Path]:
    """Single-file ``.pt`` pretraining checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _LEGACY_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_legacy(path: Union[str, Path]) -> Checkpoint:
    """A single-file pretraining checkpoint in the shape of the folder format (its scheduler state is not
    needed: the learning rate is a function of the step)."""
    # weights_only=True: never unpickle code (RNG tuples, dicts and tensors load as data).
    raw = torch.load(str(path), map_location="cpu", weights_only=True)
    state = {k: v for k, v in raw.items() if k not in ("model", "optimizer", "scheduler", "rng")}
    return Checkpoint(step=int(raw["step"]), path=Path(path), state=state, tensors={"model": raw["model"]},
                      objects={"optimizer": raw["optimizer"], "rng": raw["rng"]})


def has_checkpoints(run_dir: Union[str, Path]) -> bool:
    return bool(CheckpointDir(Path(run_dir) / CHECKPOINT_DIR).names() or legacy_checkpoints(run_dir))


def load_run_checkpoint(run_dir: Union[str, Path], step: Optional[int] = None) -> Optional[Checkpoint]:
    """The checkpoint of ``step``, or else the newest one that loads (``None`` if there is none).

    Without ``step``: the one ``LATEST`` names, then older folders, then single-file checkpoints, each
    skipped when it does not load (a damaged file, e.g. a full disk, falls back to the previous one).
    """
    folder = CheckpointDir(Path(run_dir) / CHECKPOINT_DIR)
    if step is not None:
        if (folder.root / folder.name_of(step) / "state.json").is_file():
            return folder.load(folder.name_of(step))
        legacy = [p for p in legacy_checkpoints(run_dir) if int(_LEGACY_NAME.match(p.name).group(1)) == step]
        if legacy:
            return load_legacy(legacy[0])
        raise FileNotFoundError(f"No checkpoint of step {step} in {folder.root}")
    latest = folder.latest_name()
    names = ([latest] if latest else []) + [n for n in reversed(folder.names()) if n != latest]
    for name in names:
        try:
            return folder.load(name)
        except Exception:
            continue
    for path in reversed(legacy_checkpoints(run_dir)):
        try:
            return load_legacy(path)
        except Exception:
            continue
    return None


def convert_legacy_checkpoints(run_dir: Union[str, Path], *, remove: bool = False) -> list[Path]:
    """Rewrite a run's single-file ``.pt`` checkpoints as checkpoint folders; returns the folders written.

    ``remove=True`` deletes each ``.pt`` file once its folder is published. A file that does not load is
    left as it is. ``LATEST`` ends up naming the newest converted step unless a newer folder exists.
    """
    folder = CheckpointDir(Path(run_dir) / CHECKPOINT_DIR, keep=0)
    existing = [int(_DIR_NAME.match(n).group(1)) for n in folder.names()]
    written = []
    for path in legacy_checkpoints(run_dir):
        try:
            old = load_legacy(path)
        except Exception:
            continue
        written.append(folder.save(old.step, tensors=old.tensors, objects=old.objects, state=old.state))
        if remove:
            path.unlink()
    newest = max(existing, default=-1)
    if written and newest > max(int(_DIR_NAME.match(p.name).group(1)) for p in written):
        atomic_write_bytes(folder.root / POINTER, folder.name_of(newest).encode())
    return written
