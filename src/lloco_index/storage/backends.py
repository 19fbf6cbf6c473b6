"""Where the soft-prompt store keeps its bytes: a local directory or any fsspec URL.

:class:`~lloco_index.store.SoftPromptStore` only needs a handful of
operations on named blobs (``store.json``, ``index.json``,
``shards/*.safetensors``): read (whole or a byte range), write atomically,
list, check, delete. :class:`StorageBackend` is that protocol.

- :class:`LocalDirectoryBackend` is the default and today's behaviour: temp
  file + fsync + ``os.replace`` for atomic writes, and real local paths so the
  store memory-maps its shards.
- :class:`FsspecBackend` reaches object storage (``s3://``, ``gs://``,
  ``az://``, ...) and anything else fsspec knows (``memory://``,
  ``file://``). Shards are read with ranged reads, one tensor at a time.

>>> backend = backend_for("s3://bucket/project/lloco_store", key="...", secret="...")  # extra "remote"
>>> backend.write_atomic("index.json", b"{}")
>>> backend.list("shards/")
[]
"""

from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path
from typing import Any, Optional, Protocol, Union, runtime_checkable

from ..fileio import atomic_write_bytes


@runtime_checkable
class StorageBackend(Protocol):
    """Named blobs under one root; names are relative posix paths such as ``shards/a.safetensors``."""

    @property
    def location(self) -> str:
        """A human-readable root (directory or URL), for error messages."""
        ...

    def read(self, name: str) -> bytes:
        """The whole blob; raises FileNotFoundError when absent."""
        ...

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a blob (one ranged GET on object storage)."""
        ...

    def write_atomic(self, name: str, data: bytes) -> None:
        """Replace the blob so that readers see either the old bytes or the new ones, never a part."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Names of the blobs under ``prefix`` (a folder such as ``"shards/"``), sorted."""
        ...

    def exists(self, name: str) -> bool: ...

    def delete(self, name: str) -> None: ...

    def size(self, name: str) -> int: ...

    def local_path(self, name: str) -> Optional[Path]:
        """A real file path for memory-mapping, or None when the blob is not on a local disk."""
        ...


class LocalDirectoryBackend:
    """Blobs as files under a local directory (the default; what the store always did).

    >>> LocalDirectoryBackend("./storage/lloco_store").write_atomic("store.json", b"{}")
    """

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)

    @property
    def location(self) -> str:
        return str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / name

    def read(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def read_range(self, name: str, start: int, end: int) -> bytes:
        with open(self._path(name), "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def write_atomic(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self._path(name), data)  # temp file, fsync, os.replace

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith("."))  # dot files: temp files of unfinished writes

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size

    def local_path(self, name: str) -> Optional[Path]:
        return self._path(name)

    def __repr__(self) -> str:
        return f"LocalDirectoryBackend({str(self.root)!r})"


# Filesystems where a write to the final name could be seen half-done: write a temp name, then rename.
# Object stores (s3, gcs, azure) publish a PUT whole or not at all, so they write the final name directly.
_RENAME_PROTOCOLS = {"file", "local", "sftp", "ssh", "smb", "hdfs", "webhdfs", "arrow_hdfs"}


class FsspecBackend:
    """Blobs under an fsspec URL (needs the ``remote`` extra, plus e.g. ``s3fs`` for ``s3://``).

    >>> FsspecBackend("memory://bucket/lloco_store")
    >>> FsspecBackend("s3://bucket/index/lloco_store", anon=False)   # storage options go to fsspec
    """

    def __init__(self, url: str, **storage_options: Any):
        try:
            import fsspec
        except ImportError as exc:  # pragma: no cover - fsspec comes with the datasets stack, but not always
            raise ImportError("FsspecBackend needs fsspec: pip install 'lloco-index[remote]'") from exc
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self._rename = bool(set(protocols) & _RENAME_PROTOCOLS)

    @property
    def location(self) -> str:
        return self.url

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, name) if name else self.root

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self._path(name))

    def read_range(self, name: str, start: int, end: int) -> bytes:
        return self.fs.cat_file(self._path(name), start=start, end=end)

    def write_atomic(self, name: str, data: bytes) -> None:
        path = self._path(name)
        parent = posixpath.dirname(path)
        if self._rename:
            self.fs.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
            try:
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)
            except BaseException:
                try:
                    self.fs.rm_file(tmp)
                except (FileNotFoundError, OSError):
                    pass
                raise
        else:
            self.fs.pipe_file(path, data)
        self.fs.invalidate_cache(parent)  # listings must see the new blob

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix.rstrip("/"))
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        root = self.root.lstrip("/")
        names = []
        for full in found:
            rel = posixpath.relpath(full.lstrip("/"), root)
            if not posixpath.basename(rel).startswith("."):
                names.append(rel)
        return sorted(names)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self._path(name))

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self._path(name))
        except FileNotFoundError:
            pass

    def size(self, name: str) -> int:
        return int(self.fs.size(self._path(name)))

    def local_path(self, name: str) -> Optional[Path]:
        return None  # even file:// goes through fsspec reads: that is what this backend is for

    def __repr__(self) -> str:
        return f"FsspecBackend({self.url!r})"


def is_url(location: Union[str, os.PathLike]) -> bool:
    """``s3://...``, ``memory://...``, ``file://...`` are URLs; plain paths are not."""
    return isinstance(location, str) and "://" in location


def join_location(location: Union[str, os.PathLike], name: str) -> Union[str, Path]:
    """``location``/``name`` for a URL or a local path."""
    if is_url(location):
        return f"{str(location).rstrip('/')}/{name}"
    return Path(location) / name


def backend_for(location: Union[str, os.PathLike, StorageBackend], **storage_options: Any) -> StorageBackend:
    """A backend for a local directory, an fsspec URL, or a ready backend (returned as is)."""
    if isinstance(location, (LocalDirectoryBackend, FsspecBackend)) or (
        not isinstance(location, (str, os.PathLike)) and isinstance(location, StorageBackend)
    ):
        return location  # type: ignore[return-value]
    if is_url(location):
        return FsspecBackend(str(location), **storage_options)
    return LocalDirectoryBackend(location)
