"""Metadata of reader/domain LoRA adapters, and the check that refuses a mismatched one.

An adapter directory is peft's format plus ``lloco_adapter.json``:
``{"base_model": ..., "compressor_fingerprint": ..., "data_hash": ..., "metrics": {...}}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from . import defaults
from .fileio import atomic_write_bytes
from .errors import AdapterMismatchError, ModelNotFoundError


def write_adapter_metadata(directory: Union[str, Path], compressor, **extra: Any) -> None:
    meta = {"base_model": compressor.backbone.identity, "compressor_fingerprint": compressor.fingerprint, **extra}
    atomic_write_bytes(Path(directory) / defaults.ADAPTER_METADATA_NAME, json.dumps(meta, indent=2, sort_keys=True).encode())


def read_adapter_metadata(directory: Union[str, Path]) -> Optional[dict]:
    path = Path(directory) / defaults.ADAPTER_METADATA_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def check_adapter(directory: Union[str, Path], compressor) -> None:
    """Raise unless the adapter at ``directory`` was trained for this compressor and base model."""
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise ModelNotFoundError(f"No peft adapter at '{directory}' (adapter_config.json missing).")
    meta = read_adapter_metadata(directory)
    if meta is None:
        return  # a plain peft adapter: the user vouches for it
    if meta.get("base_model") != compressor.backbone.identity:
        raise AdapterMismatchError(
            f"Adapter '{directory}' was trained on base model '{meta.get('base_model')}', not the loaded "
            f"'{compressor.backbone.identity}'. Load the base model it was trained on, or finetune a new adapter."
        )
    if meta.get("compressor_fingerprint") != compressor.fingerprint:
        raise AdapterMismatchError(
            f"Adapter '{directory}' was trained on soft prompts of compressor {meta.get('compressor_fingerprint')}, "
            f"but the compressor in use is {compressor.fingerprint}. Use that compressor, or finetune a new adapter "
            f"on this one (`lloco-index finetune`)."
        )
