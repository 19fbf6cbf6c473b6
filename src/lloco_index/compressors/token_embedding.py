"""The identity reference compressor: a chunk's soft prompt is its own token embeddings.

It compresses nothing (one position per token), which makes it the test of
everything around compression: through the whole pipeline it must give the
same greedy answer as the plain model reading the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import defaults
from .base import BaseCompressor, CompressorConfig


@dataclass
class TokenEmbeddingConfig(CompressorConfig):
    mode: str = "token_embedding"
    n_slots: int = defaults.DEFAULT_SEGMENT_LENGTH  # one position per token
    storage_dtype: str = "float32"  # exact copies of the embedding rows


class TokenEmbeddingCompressor(BaseCompressor):
    """``TokenEmbeddingCompressor(Backbone.load())``: soft prompt = ``embed_tokens(chunk)``."""

    mode = "token_embedding"
    config_class = TokenEmbeddingConfig

    def __init__(self, backbone, config: TokenEmbeddingConfig | None = None):
        config = config or TokenEmbeddingConfig()
        config.n_slots = config.segment_length
        super().__init__(backbone, config)
        self.config.storage_dtype = str(self.backbone.embedding_table().weight.dtype).replace("torch.", "")

    def _segment_positions(self, n_tokens: int) -> int:
        return n_tokens

    def _compress_segments(self, segments: list[list[int]]) -> list[torch.Tensor]:
        return [self.backbone.embed_ids(torch.tensor(seg, dtype=torch.long)) for seg in segments]
