"""``load_compressor(dir)``: read a compressor directory and build the right class."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from .. import defaults
from ..backbone import Backbone
from ..errors import ModelNotFoundError
from .base import BaseCompressor, read_compressor_config  # read_compressor_config: re-exported


def _registry() -> dict[str, type]:
    from .autocompressor import AutoCompressor
    from .icae import ICAECompressor
    from .token_embedding import TokenEmbeddingCompressor

    return {c.mode: c for c in (ICAECompressor, TokenEmbeddingCompressor, AutoCompressor)}


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
    return registry[mode].from_directory(directory, config, backbone=backbone, decoder=decoder)
