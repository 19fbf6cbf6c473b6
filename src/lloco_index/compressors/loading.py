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


def default_compressor(backbone: Optional[Backbone] = None) -> tuple[BaseCompressor, Optional[str]]:
    """The shipped compressor, or the identity compressor when it cannot be loaded, and a notice saying so.

    The notice is ``None`` when the shipped compressor loaded; otherwise it names the reason and what
    the fallback means, for the caller to print or warn with. The identity
    :class:`~lloco_index.compressors.TokenEmbeddingCompressor` is the fallback because its answers are
    those of the plain model reading the text: correct, only not compressed.

    >>> compressor, notice = default_compressor()
    >>> if notice: print(notice)
    """
    try:
        return load_compressor(backbone=backbone), None
    except ModelNotFoundError as exc:
        from .token_embedding import TokenEmbeddingCompressor

        fallback = TokenEmbeddingCompressor(backbone if backbone is not None else Backbone.load())
        return fallback, (
            f"NOTICE: the shipped default compressor is not available ({exc}). Using the identity "
            f"TokenEmbeddingCompressor on {fallback.backbone.identity} instead: soft prompts are the chunks' own "
            f"token embeddings (exact answers, no compression). Pass a compressor directory to choose another."
        )
