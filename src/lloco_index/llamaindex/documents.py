"""Read a directory of text files into Documents, checking every file before any model is loaded.

What ``SimpleDirectoryReader`` would do silently (decode invalid UTF-8 with
``errors="ignore"``, read a binary file as text) is refused here with a
warning that names the file. Document ids are the file paths, so compressing
the same directory into the same persist dir again adds nothing twice.
"""

from __future__ import annotations

import mimetypes
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import InputError


def _skip(path: Path, why: str) -> None:
    warnings.warn(f"Skipping '{path}': {why}", stacklevel=3)


def read_documents(directory: Union[str, Path], exts: Optional[Sequence[str]] = None) -> list:
    """UTF-8 text files under ``directory`` (recursively, hidden files skipped) as Documents.

    Binary files, files that are not valid UTF-8 and empty files are skipped
    with a warning naming them. Raises :class:`InputError` when the directory
    is missing or yields no document.
    """
    from llama_index.core import Document

    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(
            f"Input directory '{directory}' does not exist or is not a directory. Pass the directory that holds "
            f"the documents to compress."
        )
    wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in exts or ()}
    files = sorted(p for p in directory.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts)
                   and (not wanted or p.suffix.lower() in wanted))
    documents, skipped = [], 0
    for path in files:
        raw = path.read_bytes()
        if b"\x00" in raw[:8192]:
            _skip(path, "it is a binary file, not text. Convert it to UTF-8 text, or leave it out (--ext .txt).")
            skipped += 1
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            _skip(path, f"it is not valid UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start}). Convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8`, and compress again.")
            skipped += 1
            continue
        if not text.strip():
            _skip(path, "it is empty or whitespace-only; nothing to compress.")
            skipped += 1
            continue
        stat = path.stat()
        metadata = {
            "file_path": str(path), "file_name": path.name, "file_type": mimetypes.guess_type(str(path))[0],
            "file_size": stat.st_size, "last_modified_date": time.strftime("%Y-%m-%d", time.gmtime(stat.st_mtime)),
        }
        documents.append(Document(id_=str(path), text=text, metadata=metadata))
    if not documents:
        only = f" with extension {', '.join(sorted(wanted))}" if wanted else ""
        raise InputError(
            f"No documents to compress in '{directory}': {len(files)} file(s){only} found, {skipped} skipped (see "
            f"the warnings). Point it at a directory of UTF-8 text files."
        )
    return documents
