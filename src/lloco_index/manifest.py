"""The persist-dir manifest ``lloco_index.json``: which compressor and decoder made a persist dir.

It names the compressor (``shipped:<name>`` for one shipped in this package, so a
persist dir survives a new virtualenv or another machine; a path relative to the
persist dir when the compressor lives inside it; else an absolute path), the
decoder, and the vector store when it is not the faiss one kept in the persist dir. Framework-free, so that one persist dir
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
SHIPPED_PREFIX = "shipped:"


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


def compressor_ref(source: Union[str, Path], persist_dir: Path) -> str:
    """How the manifest names a compressor directory (see the module docstring)."""
    source = Path(source).resolve()
    shipped = defaults.default_compressor_dir().parent.resolve()
    if source.parent == shipped:
        return SHIPPED_PREFIX + source.name
    try:
        return str(source.relative_to(Path(persist_dir).resolve()))
    except ValueError:
        return str(source)


def resolve_compressor_ref(ref: str, persist_dir: Union[str, Path]) -> Path:
    """The compressor directory a manifest names. Records written before ``shipped:`` names existed hold the
    absolute path of the shipped compressor inside some installed package: when that path is gone, the
    compressor of the same name shipped with this installation is used (the store's fingerprint check still
    refuses it if its weights differ)."""
    shipped = defaults.default_compressor_dir().parent
    if ref.startswith(SHIPPED_PREFIX):
        return shipped / ref[len(SHIPPED_PREFIX):]
    source = Path(ref)
    if not source.is_absolute():
        return Path(persist_dir) / source
    if not source.exists() and source.parent.name == shipped.name and source.parent.parent.name == shipped.parent.name \
            and (shipped / source.name).is_dir():
        return shipped / source.name
    return source


def write_manifest(persist_dir: Union[str, Path], compressor: Any, vector_store: Optional[str] = None) -> None:
    """Record the compressor (saving a copy into ``persist_dir`` when it was made in code).

    ``vector_store`` names the vector store class when the vectors do not live in the persist dir's
    faiss file, so that reopening without that store is refused with a clear message.

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
    source = compressor.source_dir
    if source is None:  # a compressor made in code: keep a copy so the persist dir can be reopened alone
        compressor.save_pretrained(persist_dir / COMPRESSOR_COPY)
        source = persist_dir / COMPRESSOR_COPY
    manifest = {"compressor_dir": compressor_ref(source, persist_dir), "decoder": decoder_ref(compressor),
                "fingerprint": compressor.fingerprint}
    if vector_store is not None:
        manifest["vector_store"] = vector_store
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
    source = resolve_compressor_ref(manifest["compressor_dir"], persist_dir)
    return load_compressor(source, decoder=decoder if decoder is not None else manifest.get("decoder"))
