"""``load_compressor(dir)``: read a compressor directory and build the right class."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from .. import defaults
from ..backbone import Backbone
from ..errors import ModelNotFoundError, StoreMismatchError
from .base import BaseCompressor


def _registry() -> dict[str, type]:
    from .autocompressor import AutoCompressor
    from .icae import ICAECompressor
    from .token_embedding import TokenEmbeddingCompressor

    return {c.mode: c for c in (ICAECompressor, TokenEmbeddingCompressor, AutoCompressor)}


def read_compressor_config(directory: Union[str, Path]) -> dict:
    directory = Path(directory)
    path = directory / defaults.COMPRESSOR_CONFIG_NAME
    if not path.is_file():
        raise ModelNotFoundError(
            f"No compressor at '{directory}' ({defaults.COMPRESSOR_CONFIG_NAME} missing). Pass a directory written "
            f"by save_pretrained / `lloco-index pretrain`, or omit it to use the shipped default."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelNotFoundError(f"{path} is not valid JSON ({exc}); restore or re-save the compressor.") from exc


def load_compressor(
    directory: Optional[Union[str, Path]] = None,
    *,
    backbone: Optional[Backbone] = None,
    decoder: Optional[Union[str, Path]] = None,
) -> BaseCompressor:
    """Load a compressor saved with ``save_pretrained`` (default: the one shipped for SmolLM2).

    >>> compressor = load_compressor()                      # shipped default on SmolLM2
    >>> compressor = load_compressor("runs/my-compressor", decoder="/models/llama")
    """
    directory = Path(directory) if directory is not None else defaults.default_compressor_dir()
    config = read_compressor_config(directory)
    mode = config.get("mode")
    registry = _registry()
    if mode not in registry:
        raise ModelNotFoundError(f"{directory}: unknown compressor mode {mode!r}; known: {sorted(registry)}.")
    cls = registry[mode]
    if hasattr(cls, "from_pretrained_directory"):  # AutoCompressor carries its own decoder weights
        compressor = cls.from_pretrained_directory(directory, config)
        compressor.source_dir = directory.resolve()
        return compressor
    if backbone is None:
        backbone = Backbone.load(decoder if decoder is not None else _decoder_for(config))
    if config.get("base_model") and config["base_model"] != backbone.identity:
        raise StoreMismatchError(
            f"Compressor at '{directory}' was trained for base model '{config['base_model']}', but the loaded decoder "
            f"is '{backbone.identity}'. Load the decoder it was trained with, or train a compressor for this one."
        )
    compressor = cls._from_directory(directory, backbone, config)
    compressor.source_dir = directory.resolve()
    return compressor


def _decoder_for(config: dict) -> Optional[str]:
    base = config.get("base_model")
    if base in (None, defaults.DEFAULT_DECODER_NAME):
        return None
    if isinstance(base, str) and base.startswith("local:"):
        raise ModelNotFoundError(
            f"This compressor was trained for the local decoder '{base}': pass decoder=<its directory>."
        )
    return base
