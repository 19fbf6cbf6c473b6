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

Integrity: each entry records the sha256 of its stored bytes (in
``index.json`` and in the shard's own metadata), checked on every read. Each
shard records the compressor fingerprint; a shard of another compressor is
refused. Entries whose shard is missing are dropped when the store is opened,
and :meth:`SoftPromptStore.add` verifies the entries it would reuse, so
deleting a damaged shard (or just rerunning the compression) recomputes
exactly the chunks it held.

The bytes live behind a :class:`~lloco_index.storage.StorageBackend`: a local
directory by default, or any fsspec URL (``s3://bucket/index``,
``memory://...``) for object storage, where shards are read tensor by tensor
with ranged reads. ``quantization="int8-absmax-row"`` (recorded in
``store.json``) stores int8 values with one float32 scale per row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from . import defaults
from .compressors.base import tensors_digest
from .errors import CorruptStoreError, StoreMismatchError, UnknownPlaceholderError
from .storage.backends import StorageBackend, backend_for, is_url, join_location
from .storage.quantization import SCALE_SUFFIX, check_scheme, dequantize_rows, quantize_rows

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FLUSH_SECONDS = 5.0  # most compression work an interruption can lose (a kill -9; Ctrl-C loses none)


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

    def __init__(self, fingerprint: str, *, compressor_info: Optional[dict] = None, path: Optional[Union[str, Path]] = None,
                 backend: Optional[StorageBackend] = None, quantization: Optional[str] = None):
        check_scheme(quantization)
        self.fingerprint = fingerprint
        self.compressor_info = dict(compressor_info or {})
        self.quantization = quantization  # None, or "int8-absmax-row" (recorded in store.json)
        if backend is None and path is not None:
            backend = backend_for(path if is_url(path) else Path(path))
        self.backend: Optional[StorageBackend] = backend  # None: in memory until persist()
        # The local directory when there is one (memory-mapped reads; callers reopen stores by it).
        local = backend.local_path("") if backend is not None else None
        self.path: Optional[Path] = Path(local) if local is not None else None
        self._index: dict[str, dict] = {}  # id -> {"shard": name, "positions": n}
        self._pending: dict[str, torch.Tensor] = {}  # in memory, not yet persisted
        self._handles: dict[str, object] = {}  # shard -> safe_open handle (local) or ShardHeader (remote)

    # ---------------------------------------------------------------- open
    @staticmethod
    def store_dir(persist_dir: Union[str, Path]) -> Union[str, Path]:
        """``persist_dir/lloco_store`` (a Path, or a URL string for an fsspec URL)."""
        return join_location(persist_dir, defaults.STORE_SUBDIR)

    @classmethod
    def open(cls, persist_dir: Union[str, Path], compressor=None, *, quantization: Optional[str] = None,
             storage_options: Optional[dict[str, Any]] = None) -> "SoftPromptStore":
        """Open the store in ``persist_dir`` (creating it for ``compressor`` if absent).

        ``persist_dir`` is a local directory or an fsspec URL (``s3://bucket/index``; ``storage_options``
        go to fsspec). ``quantization`` applies when the store is created; an existing store keeps the
        scheme recorded in its ``store.json``. Raises :class:`StoreMismatchError` when it was written by
        another compressor.
        """
        check_scheme(quantization)
        backend = backend_for(cls.store_dir(persist_dir), **(storage_options or {}))
        if not backend.exists("store.json"):
            leftovers = backend.exists("index.json") or bool(backend.list("shards/"))
            if compressor is None:
                raise CorruptStoreError(
                    f"No soft-prompt store in '{persist_dir}' ({defaults.STORE_SUBDIR}/store.json missing). "
                    f"Compress documents into it first (`lloco-index compress DIR --persist-dir {persist_dir}`)."
                    + (" Its index.json and shards were left untouched." if leftovers else "")
                )
            store = cls.for_compressor(compressor, backend=backend, quantization=quantization)
            if leftovers:  # store.json lost, soft prompts still there: never start over on top of them
                for shard in store._shard_names():  # refuse another compressor's shards before writing store.json
                    try:
                        store._shard_entries(shard)
                    except CorruptStoreError:
                        pass  # damage is handled entry by entry
                store._load_index()
            else:
                store._write_index()
            store._write_meta()
            return store
        store = cls._read(backend)
        if quantization is not None and quantization != store.quantization:
            raise StoreMismatchError(
                f"The soft-prompt store at '{backend.location}' stores {store.quantization or 'unquantized'} soft "
                f"prompts; it cannot switch to {quantization}. Persist into a new directory to change it."
            )
        if compressor is not None:
            store.check_compressor(compressor)
        return store

    @classmethod
    def for_compressor(cls, compressor, path: Optional[Union[str, Path]] = None, *, backend: Optional[StorageBackend] = None,
                       quantization: Optional[str] = None) -> "SoftPromptStore":
        info = {
            "mode": compressor.config.mode,
            "base_model": compressor.backbone.identity,
            "n_slots": compressor.n_slots,
            "segment_length": compressor.segment_length,
            "hidden_size": compressor.backbone.hidden_size,
            "dtype": compressor.config.storage_dtype,
        }
        return cls(compressor.fingerprint, compressor_info=info, path=path, backend=backend, quantization=quantization)

    @classmethod
    def _read(cls, directory: Union[str, Path, StorageBackend]) -> "SoftPromptStore":
        backend = backend_for(directory)
        where = f"{backend.location.rstrip('/')}/store.json"
        try:
            meta = json.loads(backend.read("store.json").decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptStoreError(
                f"{where} is corrupt ({exc}). It records which compressor wrote the store: restore "
                f"it from a backup, or recompress into a new persist_dir."
            ) from exc
        if meta.get("format") != FORMAT_VERSION:
            raise CorruptStoreError(f"{backend.location}: store format {meta.get('format')} is not supported (expected {FORMAT_VERSION}).")
        try:
            store = cls(meta["fingerprint"], compressor_info=meta.get("compressor", {}), backend=backend,
                        quantization=meta.get("quantization"))
        except ValueError as exc:  # a quantization scheme this version does not know
            raise CorruptStoreError(f"{where}: {exc}") from exc
        store._load_index()
        return store

    @property
    def location(self) -> Optional[str]:
        """Where the store lives (directory or URL); None while in memory."""
        return self.backend.location if self.backend is not None else None

    def check_compressor(self, compressor) -> None:
        if compressor.fingerprint != self.fingerprint:
            info = self.compressor_info
            raise StoreMismatchError(
                f"The soft-prompt store at '{self.location}' was written by compressor {self.fingerprint} "
                f"(mode {info.get('mode')}, base model {info.get('base_model')}, {info.get('n_slots')} slots per "
                f"{info.get('segment_length')} tokens), but the compressor in use is {compressor.fingerprint} "
                f"(mode {compressor.config.mode}, base model {compressor.backbone.identity}). Load the compressor that "
                f"wrote it, or compress the documents again into a new persist_dir."
            )

    # --------------------------------------------------------------- index
    def _load_index(self) -> None:
        try:
            self._index = json.loads(self.backend.read("index.json").decode("utf-8")) if self.backend.exists("index.json") else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("%s/index.json is corrupt; rebuilding it from the shards", self.backend.location)
            self._index = {}
        self._drop_missing_shards()
        self.adopt_shards()

    def _shard_names(self) -> list[str]:
        return [n.split("/", 1)[1] for n in self.backend.list("shards/") if n.endswith(".safetensors")]

    def _drop_missing_shards(self) -> None:
        """Forget entries whose shard file is gone, so the next compression recomputes them.

        Only in memory: a reader must not rewrite the index (its directory
        may be read-only); the next write of the index records the drop.
        """
        present = set(self._shard_names())
        gone = sorted({e["shard"] for e in self._index.values()} - present)
        if not gone:
            return
        before = len(self._index)
        self._index = {k: e for k, e in self._index.items() if e["shard"] in present}
        logger.warning(
            "%d soft prompts of %d missing shard(s) in %s/shards (%s) are no longer stored; compressing the same "
            "documents again recomputes them", before - len(self._index), len(gone), self.backend.location,
            ", ".join(gone[:3]) + (", ..." if len(gone) > 3 else ""))

    def _drop(self, ids: Iterable[str], reason: str) -> None:
        ids = [i for i in ids if i in self._index]
        for prompt_id in ids:
            del self._index[prompt_id]
        if ids:
            logger.warning("%s; its %d soft prompt(s) are recomputed", reason, len(ids))

    def adopt_shards(self) -> int:
        """Index the shards the index does not list yet; returns how many soft prompts were added.

        Shards land before the index, so a crash between the two (or writers
        that only write shards, like the data-parallel compressor) leaves
        shards to adopt. Called on open; call it again to see shards other
        processes have written since. ``index.json`` is rewritten when
        anything was adopted.
        """
        known = {entry["shard"] for entry in self._index.values()}
        added = 0
        for shard in self._shard_names():
            if shard in known:
                continue
            # Written, but the index update did not land (a crash between the two renames): adopt it.
            try:
                entries, digests = self._shard_entries(shard)
            except CorruptStoreError as exc:
                logger.warning("ignoring unreadable shard: %s", exc)
                continue
            for key, positions in entries:
                if key not in self._index:
                    self._index[key] = {"shard": shard, "positions": positions}
                    if key in digests:
                        self._index[key]["sha256"] = digests[key]
                    added += 1
        if added:
            self._write_index()
        return added

    def _shard_entries(self, shard: Union[str, Path]) -> tuple[list[tuple[str, int]], dict[str, str]]:
        """``([(id, positions)], {id: sha256})`` of a shard, read from its header; refuses another compressor's shard."""
        name = Path(shard).name if isinstance(shard, Path) else shard
        local = self.backend.local_path(f"shards/{name}")
        try:
            if local is not None:
                from safetensors import safe_open

                with safe_open(str(local), framework="pt") as f:
                    shapes = [(k, f.get_slice(k).get_shape()) for k in f.keys()]
                    metadata = f.metadata() or {}
            else:
                from .storage.safetensors_io import read_header

                header = read_header(self.backend, f"shards/{name}")
                shapes = [(k, v["shape"]) for k, v in header.tensors.items()]
                metadata = header.metadata
            digests = json.loads(metadata.get("sha256", "{}"))
        except Exception as exc:
            raise CorruptStoreError(self._corrupt_message(name, exc)) from exc
        self._check_shard_fingerprint(name, metadata)
        return [(k, int(shape[0])) for k, shape in shapes if not k.endswith(SCALE_SUFFIX)], digests

    def _check_shard_fingerprint(self, shard: str, metadata: dict) -> None:
        found = metadata.get("fingerprint")
        if found != self.fingerprint:
            raise StoreMismatchError(
                f"Shard '{self.backend.location.rstrip('/')}/shards/{shard}' holds soft prompts of compressor "
                f"{found or '(none recorded)'}, but this store belongs to compressor {self.fingerprint}. It was copied "
                f"in from another store: move it out of shards/ (back to the persist dir it came from)."
            )

    def _write_meta(self) -> None:
        meta = {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "compressor": self.compressor_info}
        if self.quantization is not None:  # absent for unquantized stores: their store.json is unchanged
            meta["quantization"] = self.quantization
        self.backend.write_atomic("store.json", json.dumps(meta, indent=2, sort_keys=True).encode())

    def _write_index(self) -> None:
        self.backend.write_atomic("index.json", json.dumps(self._index, sort_keys=True).encode())

    def _corrupt_message(self, shard: str, exc: Exception) -> str:
        location = self.backend.location if self.backend is not None else "..."
        where = self.path.parent if self.path else location
        return (
            f"Soft-prompt shard '{location.rstrip('/')}/shards/{shard}' is truncated or corrupt ({exc}). Other shards "
            f"are intact: delete this file and run the compression again (`lloco-index compress ... --persist-dir "
            f"{where}`); only the chunks it held are recomputed."
        )

    # -------------------------------------------------------------- access
    def make_id(self, text: str) -> str:
        from .chunking import check_text

        return content_id(self.fingerprint, check_text(text))  # the hash encodes it: refuse what UTF-8 cannot

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
        where = f"'{self.location}'" if self.backend is not None else "this in-memory store"
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
            stored = {prompt_id: self._read_tensor(entry["shard"], handle, prompt_id)}
            if self.quantization is not None:
                stored[prompt_id + SCALE_SUFFIX] = self._read_tensor(entry["shard"], handle, prompt_id + SCALE_SUFFIX)
        except Exception as exc:
            raise CorruptStoreError(self._corrupt_message(entry["shard"], exc)) from exc
        if "sha256" in entry and tensors_digest(stored) != entry["sha256"]:  # stores written before 0.1 have none
            raise CorruptStoreError(self._corrupt_message(
                entry["shard"], ValueError(f"soft prompt {prompt_id} does not match its recorded sha256")))
        if self.quantization is None:
            return stored[prompt_id]
        return dequantize_rows(stored[prompt_id], stored[prompt_id + SCALE_SUFFIX], self._output_dtype())

    def _read_tensor(self, shard: str, handle, key: str) -> torch.Tensor:
        if self.path is not None:
            return handle.get_tensor(key)
        from .storage.safetensors_io import read_tensor

        return read_tensor(self.backend, f"shards/{shard}", handle, key)

    def _output_dtype(self) -> torch.dtype:
        """What the compressor produced (and an unquantized store would return)."""
        dtype = getattr(torch, str(self.compressor_info.get("dtype") or "float32"), None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32

    def _handle(self, shard: str):
        if shard not in self._handles:
            name = f"shards/{shard}"
            if not self.backend.exists(name):
                raise CorruptStoreError(self._corrupt_message(shard, FileNotFoundError("file missing")))
            try:
                if self.path is not None:
                    from safetensors import safe_open

                    handle = safe_open(str(self.backend.local_path(name)), framework="pt")  # memory-mapped, lazy
                    metadata = handle.metadata() or {}
                else:
                    from .storage.safetensors_io import read_header

                    handle = read_header(self.backend, name)  # then one ranged read per tensor
                    metadata = handle.metadata
            except Exception as exc:
                raise CorruptStoreError(self._corrupt_message(shard, exc)) from exc
            self._check_shard_fingerprint(shard, metadata)
            self._handles[shard] = handle
        return self._handles[shard]

    def verify(self, ids: Optional[Iterable[str]] = None) -> list[str]:
        """Read and check the stored entries (all, or ``ids``); drop the damaged ones and return their ids.

        An entry is damaged when its shard is missing or unreadable or its
        bytes no longer match their sha256. Dropped entries are recomputed by
        the next :meth:`add` of their chunks. Shards of another compressor
        are not damage: they raise :class:`StoreMismatchError`.
        """
        by_shard: dict[str, list[str]] = defaultdict(list)
        for prompt_id in (self._index if ids is None else ids):
            if prompt_id in self._index and prompt_id not in self._pending:
                by_shard[self._index[prompt_id]["shard"]].append(prompt_id)
        damaged: list[str] = []
        for shard, keys in sorted(by_shard.items()):
            bad = []
            for prompt_id in keys:
                try:
                    self.get(prompt_id)
                except CorruptStoreError as exc:
                    bad.append(prompt_id)
                    reason = str(exc).split(" Other shards", 1)[0]
            if bad:
                self._handles.pop(shard, None)
                self._drop(bad, reason)
                damaged.extend(bad)
        return damaged

    # --------------------------------------------------------------- write
    def put(self, tensors: dict[str, torch.Tensor], *, update_index: bool = True) -> Optional[str]:
        """Add soft prompts; written at once (one new shard) when the store is persisted. Returns the shard name.

        ``update_index=False`` writes the shard only: for many writers sharing
        one store (data-parallel workers), whose index updates would race.
        The store's owner then calls :meth:`adopt_shards` (opening the store
        does it too).
        """
        fresh = {k: v.detach().cpu().contiguous() for k, v in tensors.items() if k not in self}
        if not fresh:
            return None
        if self.backend is None:
            if self.quantization is not None:  # what a persisted store would give back
                fresh = {k: dequantize_rows(*quantize_rows(v), v.dtype) for k, v in fresh.items()}
            self._pending.update(fresh)
            return None
        return self._write_shard(fresh, update_index=update_index)

    def _encode(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.quantization is None:
            return tensors
        out = {}
        for key, value in tensors.items():
            out[key], out[key + SCALE_SUFFIX] = quantize_rows(value)
        return out

    def _write_shard(self, tensors: dict[str, torch.Tensor], *, update_index: bool = True) -> str:
        from safetensors.torch import save

        name = f"shard-{time.strftime('%Y%m%d%H%M%S')}-{hashlib.sha256(''.join(sorted(tensors)).encode()).hexdigest()[:10]}.safetensors"
        encoded = {k: v.detach().contiguous().cpu() for k, v in self._encode(tensors).items()}
        digests = {k: tensors_digest({n: encoded[n] for n in (k, k + SCALE_SUFFIX) if n in encoded}) for k in tensors}
        metadata = {"fingerprint": self.fingerprint, "sha256": json.dumps(digests, sort_keys=True)}
        self.backend.write_atomic(f"shards/{name}", save(encoded, metadata=metadata))
        for key, value in tensors.items():
            self._index[key] = {"shard": name, "positions": int(value.shape[0]), "sha256": digests[key]}
        if update_index:
            self._write_index()
        return name

    def storage_bytes(self) -> int:
        """Bytes of all shards (what the soft prompts cost on disk or in the bucket)."""
        if self.backend is None:
            return 0
        return sum(self.backend.size(n) for n in self.backend.list("shards/") if n.endswith(".safetensors"))

    def add(self, texts: Sequence[str], compressor, *, batch_size: Optional[int] = None, progress: bool = False,
            flush_every: int = 256, flush_seconds: float = FLUSH_SECONDS, verify: bool = True) -> list[str]:
        """Compress the texts not stored yet and return the ids of all of them, in order.

        Finished soft prompts are written to a shard every ``flush_seconds``
        or ``flush_every`` chunks, whichever comes first, and once more when
        the run is interrupted (Ctrl-C, an exception), so a rerun resumes
        where it stopped: a ``kill -9`` loses at most ``flush_seconds`` of
        work. With ``verify`` the stored entries that would be reused are read
        and checked first, and damaged ones are recomputed.
        """
        from tqdm.auto import tqdm

        self.check_compressor(compressor)
        ids = [self.make_id(t) for t in texts]
        if verify and self.backend is not None:
            self.verify(set(ids))
        todo: dict[str, str] = {}
        for prompt_id, text in zip(ids, texts):
            if prompt_id not in self and prompt_id not in todo:
                todo[prompt_id] = text
        items = list(todo.items())
        step = max(1, min(batch_size or defaults.DEFAULT_COMPRESS_BATCH_SIZE, flush_every))
        done: dict[str, torch.Tensor] = {}
        last_flush = time.monotonic()
        bar = tqdm(total=len(items), desc="compressing", unit="chunk", disable=not progress)
        try:
            for start in range(0, len(items), step):
                part = items[start : start + step]
                prompts = compressor.compress([t for _, t in part], batch_size=batch_size)
                done.update((k, p) for (k, _), p in zip(part, prompts))
                bar.update(len(part))
                if len(done) >= flush_every or time.monotonic() - last_flush >= flush_seconds:
                    self.put(done)
                    done, last_flush = {}, time.monotonic()
        except BaseException:
            if done:  # keep what is finished; the interruption itself propagates
                self.put(done)
                logger.warning("interrupted: %d finished soft prompts saved in %s before stopping", len(done),
                               self.location or "memory")
            raise
        finally:
            bar.close()
        self.put(done)
        return ids

    def persist(self, persist_dir: Union[str, Path], *, storage_options: Optional[dict[str, Any]] = None) -> None:
        """Write the store beside an index's StorageContext (``index.storage_context.persist(persist_dir)``).

        ``persist_dir`` may be an fsspec URL (e.g. to copy a local store to object storage).
        """
        target_location = self.store_dir(persist_dir)
        if (self.path is not None and not is_url(target_location)
                and Path(target_location).resolve() == self.path.resolve()):
            return
        if self.backend is not None and is_url(target_location) and self.backend.location == str(target_location).rstrip("/"):
            return
        target = backend_for(target_location, **(storage_options or {}))
        if target.exists("store.json"):
            SoftPromptStore._read(target)._check_same(self)
        previous = self.backend
        self.backend = target
        local = target.local_path("")
        self.path = Path(local) if local is not None else None
        self._write_meta()
        everything = dict(self._pending)
        if previous is not None:
            old = SoftPromptStore._read(previous)
            everything.update({k: old.get(k) for k in old.ids()})
        self._index = json.loads(target.read("index.json").decode("utf-8")) if target.exists("index.json") else {}
        self._handles = {}
        self._pending = {}
        self.put(everything)
        self._write_index()

    def _check_same(self, other: "SoftPromptStore") -> None:
        if other.fingerprint != self.fingerprint:
            raise StoreMismatchError(
                f"'{self.location}' already holds soft prompts of compressor {self.fingerprint}; refusing to mix in "
                f"{other.fingerprint}. Persist into a new directory."
            )
        if other.quantization != self.quantization:
            raise StoreMismatchError(
                f"'{self.location}' stores {self.quantization or 'unquantized'} soft prompts; refusing to mix in "
                f"{other.quantization or 'unquantized'} ones. Persist into a new directory."
            )

