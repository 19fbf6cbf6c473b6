"""SoftPromptStore: soft-prompt id -> tensor[positions, hidden], in safetensors shards.

Layout, beside a LlamaIndex StorageContext in the same ``persist_dir``::

    persist_dir/lloco_store/store.json     compressor fingerprint, shapes, dtype
    persist_dir/lloco_store/index.json     id -> shard file and positions
    persist_dir/lloco_store/shards/*.safetensors

Ids are content hashes of (compressor fingerprint, chunk text): the same chunk
compressed by the same compressor is never recomputed. Every file is written
to a temporary name and renamed, shards before the index, so a crash leaves
the previous state readable; a shard the index does not know yet (a crash
between the two renames) is adopted when the store is next opened. Shards are
memory-mapped and read lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch

from . import defaults
from .compressors.base import atomic_save_safetensors, atomic_write_bytes
from .errors import CorruptStoreError, StoreMismatchError, UnknownPlaceholderError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def content_id(fingerprint: str, text: str) -> str:
    """Stable id of a chunk under a compressor: 24 hex digits of sha256."""
    return hashlib.sha256(f"{fingerprint}\x00{text}".encode("utf-8")).hexdigest()[:24]


class SoftPromptStore:
    """Persisted soft prompts of one compressor.

    >>> store = SoftPromptStore.open("./storage", compressor)   # creates or reopens
    >>> ids = store.add(["chunk one ...", "chunk two ..."], compressor)
    >>> store.get(ids[0]).shape
    torch.Size([32, 576])
    """

    def __init__(self, fingerprint: str, *, compressor_info: Optional[dict] = None, path: Optional[Union[str, Path]] = None):
        self.fingerprint = fingerprint
        self.compressor_info = dict(compressor_info or {})
        self.path: Optional[Path] = Path(path) if path is not None else None
        self._index: dict[str, dict] = {}  # id -> {"shard": name, "positions": n}
        self._pending: dict[str, torch.Tensor] = {}  # in memory, not yet persisted
        self._handles: dict[str, object] = {}

    # ---------------------------------------------------------------- open
    @staticmethod
    def store_dir(persist_dir: Union[str, Path]) -> Path:
        return Path(persist_dir) / defaults.STORE_SUBDIR

    @classmethod
    def open(cls, persist_dir: Union[str, Path], compressor=None) -> "SoftPromptStore":
        """Open the store in ``persist_dir`` (creating it for ``compressor`` if absent).

        Raises :class:`StoreMismatchError` when it was written by another compressor.
        """
        directory = cls.store_dir(persist_dir)
        if not (directory / "store.json").is_file():
            if compressor is None:
                raise CorruptStoreError(
                    f"No soft-prompt store in '{persist_dir}' ({defaults.STORE_SUBDIR}/store.json missing). "
                    f"Compress documents into it first (`lloco-index compress DIR --persist-dir {persist_dir}`)."
                )
            store = cls.for_compressor(compressor, path=directory)
            store._write_meta()
            store._write_index()
            return store
        store = cls._read(directory)
        if compressor is not None:
            store.check_compressor(compressor)
        return store

    @classmethod
    def for_compressor(cls, compressor, path: Optional[Union[str, Path]] = None) -> "SoftPromptStore":
        info = {
            "mode": compressor.config.mode,
            "base_model": compressor.backbone.identity,
            "n_slots": compressor.n_slots,
            "segment_length": compressor.segment_length,
            "hidden_size": compressor.backbone.hidden_size,
            "dtype": compressor.config.storage_dtype,
        }
        return cls(compressor.fingerprint, compressor_info=info, path=path)

    @classmethod
    def _read(cls, directory: Path) -> "SoftPromptStore":
        try:
            meta = json.loads((directory / "store.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptStoreError(
                f"{directory / 'store.json'} is corrupt ({exc}). It records which compressor wrote the store: restore "
                f"it from a backup, or recompress into a new persist_dir."
            ) from exc
        if meta.get("format") != FORMAT_VERSION:
            raise CorruptStoreError(f"{directory}: store format {meta.get('format')} is not supported (expected {FORMAT_VERSION}).")
        store = cls(meta["fingerprint"], compressor_info=meta.get("compressor", {}), path=directory)
        store._load_index()
        return store

    def check_compressor(self, compressor) -> None:
        if compressor.fingerprint != self.fingerprint:
            info = self.compressor_info
            raise StoreMismatchError(
                f"The soft-prompt store at '{self.path}' was written by compressor {self.fingerprint} "
                f"(mode {info.get('mode')}, base model {info.get('base_model')}, {info.get('n_slots')} slots per "
                f"{info.get('segment_length')} tokens), but the compressor in use is {compressor.fingerprint} "
                f"(mode {compressor.config.mode}, base model {compressor.backbone.identity}). Load the compressor that "
                f"wrote it, or compress the documents again into a new persist_dir."
            )

    # --------------------------------------------------------------- index
    def _shard_dir(self) -> Path:
        assert self.path is not None
        return self.path / "shards"

    def _load_index(self) -> None:
        index_path = self.path / "index.json"
        try:
            self._index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("%s is corrupt; rebuilding it from the shards", index_path)
            self._index = {}
        known = {entry["shard"] for entry in self._index.values()}
        shard_dir = self._shard_dir()
        adopted = False
        for shard in sorted(shard_dir.glob("*.safetensors")) if shard_dir.is_dir() else []:
            if shard.name in known:
                continue
            # Written, but the index update did not land (a crash between the two renames): adopt it.
            try:
                for key, positions in self._shard_entries(shard):
                    self._index.setdefault(key, {"shard": shard.name, "positions": positions})
                adopted = True
            except CorruptStoreError as exc:
                logger.warning("ignoring unreadable shard: %s", exc)
        if adopted:
            self._write_index()

    def _shard_entries(self, shard: Path) -> list[tuple[str, int]]:
        from safetensors import safe_open

        try:
            with safe_open(str(shard), framework="pt") as f:
                return [(k, int(f.get_slice(k).get_shape()[0])) for k in f.keys()]
        except Exception as exc:
            raise CorruptStoreError(self._corrupt_message(shard.name, exc)) from exc

    def _write_meta(self) -> None:
        meta = {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "compressor": self.compressor_info}
        atomic_write_bytes(self.path / "store.json", json.dumps(meta, indent=2, sort_keys=True).encode())

    def _write_index(self) -> None:
        atomic_write_bytes(self.path / "index.json", json.dumps(self._index, sort_keys=True).encode())

    def _corrupt_message(self, shard: str, exc: Exception) -> str:
        return (
            f"Soft-prompt shard '{self._shard_dir() / shard}' is truncated or corrupt ({exc}). Other shards are intact: "
            f"delete this file and run the compression again (`lloco-index compress ... --persist-dir "
            f"{self.path.parent if self.path else '...'}`); only the chunks it held are recomputed."
        )

    # -------------------------------------------------------------- access
    def make_id(self, text: str) -> str:
        return content_id(self.fingerprint, text)

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self._pending or prompt_id in self._index

    def __len__(self) -> int:
        return len(set(self._index) | set(self._pending))

    def ids(self) -> list[str]:
        return sorted(set(self._index) | set(self._pending))

    def num_positions(self, prompt_id: str) -> int:
        """Decoder positions the soft prompt takes, without loading it."""
        if prompt_id in self._pending:
            return int(self._pending[prompt_id].shape[0])
        if prompt_id in self._index:
            return int(self._index[prompt_id]["positions"])
        raise self._unknown(prompt_id)

    def _unknown(self, prompt_id: str) -> UnknownPlaceholderError:
        where = f"'{self.path}'" if self.path else "this in-memory store"
        return UnknownPlaceholderError(
            f"Unknown soft-prompt id '{prompt_id}': it is not in {where} ({len(self)} ids, compressor "
            f"{self.fingerprint}). The prompt names a chunk that was never compressed into this store: open the store "
            f"persisted with the index that produced it, or compress that document again."
        )

    def get(self, prompt_id: str) -> torch.Tensor:
        if prompt_id in self._pending:
            return self._pending[prompt_id]
        entry = self._index.get(prompt_id)
        if entry is None:
            raise self._unknown(prompt_id)
        handle = self._handle(entry["shard"])
        try:
            return handle.get_tensor(prompt_id)
        except Exception as exc:
            raise CorruptStoreError(self._corrupt_message(entry["shard"], exc)) from exc

    def _handle(self, shard: str):
        from safetensors import safe_open

        if shard not in self._handles:
            path = self._shard_dir() / shard
            if not path.is_file():
                raise CorruptStoreError(self._corrupt_message(shard, FileNotFoundError("file missing")))
            try:
                self._handles[shard] = safe_open(str(path), framework="pt")  # memory-mapped, lazy
            except Exception as exc:
                raise CorruptStoreError(self._corrupt_message(shard, exc)) from exc
        return self._handles[shard]

    # --------------------------------------------------------------- write
    def put(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add soft prompts; written to disk at once (one new shard) when the store has a path."""
        fresh = {k: v.detach().cpu().contiguous() for k, v in tensors.items() if k not in self}
        if not fresh:
            return
        if self.path is None:
            self._pending.update(fresh)
            return
        self._write_shard(fresh)

    def _write_shard(self, tensors: dict[str, torch.Tensor]) -> None:
        shard_dir = self._shard_dir()
        shard_dir.mkdir(parents=True, exist_ok=True)
        name = f"shard-{time.strftime('%Y%m%d%H%M%S')}-{hashlib.sha256(''.join(sorted(tensors)).encode()).hexdigest()[:10]}.safetensors"
        atomic_save_safetensors(tensors, shard_dir / name, metadata={"fingerprint": self.fingerprint})
        for key, value in tensors.items():
            self._index[key] = {"shard": name, "positions": int(value.shape[0])}
        self._write_index()

    def add(self, texts: Sequence[str], compressor, *, batch_size: Optional[int] = None, progress: bool = False,
            flush_every: int = 256) -> list[str]:
        """Compress the texts not stored yet and return the ids of all of them, in order.

        Work is flushed to a shard every ``flush_every`` new chunks, so an
        interrupted run resumes where it stopped.
        """
        self.check_compressor(compressor)
        ids = [self.make_id(t) for t in texts]
        todo: dict[str, str] = {}
        for prompt_id, text in zip(ids, texts):
            if prompt_id not in self and prompt_id not in todo:
                todo[prompt_id] = text
        items = list(todo.items())
        for start in range(0, len(items), flush_every):
            part = items[start : start + flush_every]
            prompts = compressor.compress([t for _, t in part], batch_size=batch_size, progress=progress)
            self.put({k: p for (k, _), p in zip(part, prompts)})
        return ids

    def persist(self, persist_dir: Union[str, Path]) -> None:
        """Write the store beside an index's StorageContext (``index.storage_context.persist(persist_dir)``)."""
        target = self.store_dir(persist_dir)
        if self.path is not None and target.resolve() == self.path.resolve():
            return
        if (target / "store.json").is_file():
            SoftPromptStore._read(target)._check_same(self)
        previous_path, self.path = self.path, target
        target.mkdir(parents=True, exist_ok=True)
        self._write_meta()
        everything = dict(self._pending)
        if previous_path is not None:
            old = SoftPromptStore._read(previous_path)
            everything.update({k: old.get(k) for k in old.ids()})
        self._index = json.loads((target / "index.json").read_text()) if (target / "index.json").is_file() else {}
        self._handles = {}
        self._pending = {}
        self.put(everything)
        self._write_index()

    def _check_same(self, other: "SoftPromptStore") -> None:
        if other.fingerprint != self.fingerprint:
            raise StoreMismatchError(
                f"'{self.path}' already holds soft prompts of compressor {self.fingerprint}; refusing to mix in "
                f"{other.fingerprint}. Persist into a new directory."
            )

    def iter_items(self, ids: Optional[Iterable[str]] = None):
        for prompt_id in ids if ids is not None else self.ids():
            yield prompt_id, self.get(prompt_id)
