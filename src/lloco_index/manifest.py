"""The persist-dir manifest ``lloco_index.json``: which compressor and decoder made a persist dir.

It names the compressor directory (relative to the persist dir when a copy
was saved into it) and the decoder. Framework-free, so that one persist dir
can be reopened from LlamaIndex or LangChain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from . import defaults
from .fileio import atomic_write_bytes
from .errors import CorruptStoreError, StoreMismatchError

MANIFEST = "lloco_index.json"
COMPRESSOR_COPY = "lloco_compressor"


def decoder_ref(compressor: Any) -> Optional[str]:
    """How to reload the compressor's decoder: ``None`` for the embedded default, else a path or identity."""
    backbone = compressor.backbone
    if backbone.identity == defaults.DEFAULT_DECODER_NAME:
        return None
    return getattr(backbone, "source_path", None) or backbone.identity


def read_manifest(persist_dir: Union[str, Path]) -> Optional[dict]:
    """The manifest of ``persist_dir``, or ``None`` when there is none."""
    path = Path(persist_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptStoreError(
            f"{path} is corrupt ({exc}). It names the compressor that made this persist dir: restore it, or pass "
            f"compressor=... explicitly."
        ) from exc


def write_manifest(persist_dir: Union[str, Path], compressor: Any) -> None:
    """Record the compressor (saving a copy into ``persist_dir`` when it was made in code).

    An existing manifest of the same compressor is left alone; one of another
    compressor is refused, so that two compressors never share a persist dir.
    """
    persist_dir = Path(persist_dir)
    existing = read_manifest(persist_dir)
    if existing is not None:
        if existing.get("fingerprint") != compressor.fingerprint:
            raise StoreMismatchError(
                f"'{persist_dir}' was built with compressor {existing.get('fingerprint')}, not {compressor.fingerprint}. "
                f"Use that compressor, or build into a new persist_dir."
            )
        return
    source = getattr(compressor, "source_dir", None)
    if source is None:  # a compressor made in code: keep a copy so the persist dir can be reopened alone
        compressor.save_pretrained(persist_dir / COMPRESSOR_COPY)
        source = COMPRESSOR_COPY
    manifest = {"compressor_dir": str(source), "decoder": decoder_ref(compressor), "fingerprint": compressor.fingerprint}
    atomic_write_bytes(persist_dir / MANIFEST, json.dumps(manifest, indent=2).encode())


def load_compressor_for(persist_dir: Union[str, Path], decoder: Optional[Union[str, Path]] = None) -> Any:
    """The compressor that made ``persist_dir``, reloaded from the directory its manifest names."""
    from .compressors import load_compressor

    manifest = read_manifest(persist_dir)
    if manifest is None:
        raise CorruptStoreError(
            f"'{persist_dir}' has no {MANIFEST}, so the compressor that made it is unknown. Pass compressor=... "
            f"(the one used with build_index / LLoCOLangChainRetriever.from_texts)."
        )
    source = Path(manifest["compressor_dir"])
    if not source.is_absolute():
        source = Path(persist_dir) / source
    return load_compressor(source, decoder=decoder if decoder is not None else manifest.get("decoder"))
