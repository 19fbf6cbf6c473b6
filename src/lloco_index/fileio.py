"""Crash-safe file writes and the lock that keeps two writers out of one persist dir.

Every file this package writes goes through :func:`atomic_write_bytes`
(temp file, fsync, ``os.replace``), so a crash leaves either the old file or
the new one. :func:`exclusive_lock` serialises writers of a persist dir: two
``compress`` runs into the same directory would otherwise each write the
LlamaIndex docstore they read at start, and the later one would drop the
other's documents.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Union

from .errors import PersistDirError, StoreLockedError

LOCK_NAME = ".lloco-write.lock"


def read_json(path: Path, on_error: Callable[[Exception], Exception]) -> Any:
    """Parse the JSON file ``path``; a file that is not UTF-8 JSON raises ``on_error(exc)`` (chained).

    ``on_error`` builds the caller's own error, whose message says how to restore that particular file.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise on_error(exc) from exc


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line index, record)`` for each non-blank line of a JSONL file."""
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if line.strip():
            yield i, json.loads(line)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; written files should read like any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def exclusive_lock(directory: Union[str, Path]) -> Iterator[Path]:
    """Hold ``directory/.lloco-write.lock`` exclusively, or raise :class:`StoreLockedError` at once.

    The lock is an ``flock`` on an open file: the kernel releases it when the
    process ends, however it ends (a ``kill -9`` leaves no stale lock). The
    file records the holder's pid for the error message. Not waiting is
    deliberate: a second writer finds out in a second, not after it has
    compressed everything. Also the first write into the directory, so a
    read-only persist dir is reported before any work is done.
    """
    import fcntl

    directory = Path(directory)
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise PersistDirError(
            f"Cannot write to persist dir '{directory}' ({exc.strerror or exc}). Nothing was compressed: make the "
            f"directory writable, or pass another --persist-dir."
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
            raise StoreLockedError(
                f"Persist dir '{directory}' is locked by a compression already writing into it (pid {holder}). "
                f"Wait for it to finish and run again (chunks it stored are not recomputed), or compress into "
                f"another persist dir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing releases the flock
