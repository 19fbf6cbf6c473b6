"""The one retriever that serves text RAG, LLMLingua and the lloco systems in a benchmark run.

Documents are cut into token-exact chunks of the compressor's segment length (so a chunk is one
soft-prompt segment), embedded with the local all-MiniLM-L6-v2, and searched with faiss inner
product over normalised vectors (:mod:`lloco_index.vectors`, as the LangChain index does). Retrieved chunks are returned in document order, as
LLoCORetriever does, so text and soft prompts arrive in the same order.

>>> embedder = load_embedder()
>>> index = ChunkIndex.build(document.text, tokenizer, chunk_tokens=256, embedder=embedder)
>>> hits = index.search("Who founded it?", top_k=4)      # chunk numbers, document order
>>> [index.chunks[i] for i in hits]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..vectors import DenseIndex, Embedder, as_embedder


def load_embedder(path: Optional[str] = None):
    """The packaged sentence-transformers model (no download; one copy per process, shared with the LangChain index)."""
    return Embedder(path).model


def chunk_by_tokens(text: str, tokenizer, chunk_tokens: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``chunk_tokens`` tokens *after re-tokenisation*.

    Decoding a token window and tokenising it again can give a different count at the edges; a
    piece that grows past the limit is shortened token by token, so each chunk is exactly one
    compressor segment.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks: list[str] = []
    start = 0
    while start < len(ids):
        end = min(start + chunk_tokens, len(ids))
        piece = tokenizer.decode(ids[start:end])
        while end - start > 1 and len(tokenizer(piece, add_special_tokens=False)["input_ids"]) > chunk_tokens:
            end -= 1
            piece = tokenizer.decode(ids[start:end])
        if piece.strip():
            chunks.append(piece)
        start = end
    return chunks


@dataclass
class ChunkIndex:
    """One document's chunks and their :class:`~lloco_index.vectors.DenseIndex` (built per document, in memory)."""

    chunks: list[str]
    index: DenseIndex
    embedder: Embedder = field(repr=False)
    build_s: float = 0.0

    @classmethod
    def build(cls, text: str, tokenizer, *, chunk_tokens: int, embedder: Any) -> "ChunkIndex":
        """Chunk ``text`` and embed the chunks; ``embedder`` is anything :class:`~lloco_index.vectors.Embedder` takes."""
        import time

        start = time.perf_counter()
        embedder = as_embedder(embedder)
        chunks = chunk_by_tokens(text, tokenizer, chunk_tokens)
        index = DenseIndex(embedder.embed_documents(chunks))
        return cls(chunks, index, embedder, time.perf_counter() - start)

    def search(self, query: str, top_k: int) -> list[int]:
        """The ``top_k`` most similar chunks, returned in document order."""
        return sorted(self.search_scored(query, top_k)[0])

    def search_scored(self, query: str, top_k: int) -> tuple[list[int], list[float]]:
        """The ``top_k`` most similar chunks and their scores, best first."""
        return self.index.search(self.embedder.embed_query(query), top_k)
