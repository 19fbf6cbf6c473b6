"""Compressors: text chunks -> soft prompts in the decoder's input-embedding space."""

from .autocompressor import AutoCompressor, AutoCompressorConfig
from .base import BaseCompressor, Compressor, CompressorConfig
from .icae import ICAECompressor, ICAEConfig
from .loading import default_compressor, load_compressor
from .token_embedding import TokenEmbeddingCompressor, TokenEmbeddingConfig

__all__ = [
    "AutoCompressor",
    "AutoCompressorConfig",
    "BaseCompressor",
    "Compressor",
    "CompressorConfig",
    "ICAECompressor",
    "ICAEConfig",
    "TokenEmbeddingCompressor",
    "TokenEmbeddingConfig",
    "default_compressor",
    "load_compressor",
]
