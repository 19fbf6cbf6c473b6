"""The one retriever that serves text RAG, LLMLingua and the lloco systems in a benchmark run.

Documents are cut by the shipped chunker (:func:`lloco_index.chunking.chunk_text`: token-exact chunks of the
compressor's segment length, ending at a sentence end where one is near, as every index cuts them), embedded with the local all-MiniLM-L6-v2, and searched with faiss inner
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

from ..chunking import chunk_text
from ..vectors import DenseIndex, Embedder, as_embedder


def load_embedder(path: Optional[str] = None):
    """The packaged sentence-transformers model (no download; one copy per process, shared with the LangChain index)."""
    return Embedder(path).model


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
        chunks = [c.text for c in chunk_text(text, tokenizer, chunk_tokens)]
        index = DenseIndex(embedder.embed_documents(chunks))
        return cls(chunks, index, embedder, time.perf_counter() - start)

    def search(self, query: str, top_k: int) -> list[int]:
        """The ``top_k`` most similar chunks, returned in document order."""
        return sorted(self.search_scored(query, top_k)[0])

    def search_scored(self, query: str, top_k: int) -> tuple[list[int], list[float]]:
        """The ``top_k`` most similar chunks and their scores, best first."""
        return self.index.search(self.embedder.embed_query(query), top_k)
