"""Atomic, resumable training checkpoints.

A checkpoint is one file ``checkpoints/step-00000050.pt`` holding everything a
run needs to continue exactly: trainable weights (compressor head + encoder
LoRA, reader LoRA), optimizer and scheduler state, RNG states, the data
position, the step, and the metrics so far. It is written to a temporary file
and renamed into place, so a run killed mid-write leaves the previous
checkpoint intact and loadable; :func:`latest_checkpoint` skips unreadable files.
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..fileio import atomic_write_bytes

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(run_dir: Union[str, Path], step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def save_checkpoint(run_dir: Union[str, Path], step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``; keep the newest ``keep`` checkpoints."""
    buffer = io.BytesIO()
    torch.save({"step": step, **state}, buffer)
    path = checkpoint_path(run_dir, step)
    atomic_write_bytes(path, buffer.getvalue())
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: Union[str, Path]) -> list[Path]:
    """Checkpoint files of a run, oldest first (temporary files of interrupted writes are ignored)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    # weights_only=True: never unpickle code, even from our own files (RNG tuples, dicts and tensors load as data).
    return torch.load(str(path), map_location="cpu", weights_only=True)


def latest_checkpoint(run_dir: Union[str, Path]) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest checkpoint that loads, with its contents (``None`` if there is none)."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except Exception:  # a damaged file (e.g. disk full): fall back to the previous one
            continue
    return None
