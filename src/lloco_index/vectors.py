"""Dense retrieval without a framework: text -> unit vectors -> faiss inner-product search.

The LangChain :class:`~lloco_index.langchain.search.ChunkIndex` and the benchmark's retriever
(:mod:`lloco_index.eval.retrieval`) both embed with :class:`Embedder` (the shipped
all-MiniLM-L6-v2 by default, loaded once per process) and search with :class:`DenseIndex`.
The LlamaIndex path uses LlamaIndex's own embedding and vector-store classes instead.

>>> embedder = Embedder()                                  # shipped all-MiniLM-L6-v2
>>> index = DenseIndex(embedder.embed_documents(["bees make honey", "ships need lighthouses"]))
>>> rows, scores = index.search(embedder.embed_query("who makes honey?"), k=1)   # [0], [0.6...]
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import defaults

_EMBEDDER_CACHE: dict[str, Any] = {}
_EMBEDDER_LOCK = threading.Lock()


class Embedder:
    """Texts -> L2-normalised float32 vectors, from whatever the caller has.

    Accepts ``None`` (the shipped all-MiniLM-L6-v2, loaded once per process),
    a local sentence-transformers directory, a ``SentenceTransformer``-like
    object (``encode``) or a LangChain ``Embeddings`` (``embed_documents`` /
    ``embed_query``).
    """

    def __init__(self, model: Any = None):
        if model is None or isinstance(model, (str, Path)):
            from .models import default_embedder_path

            path = str(model) if model is not None else default_embedder_path()
            self.name = defaults.DEFAULT_EMBEDDER_NAME if model is None else f"local:{Path(path).name}"
            self.model = _load_sentence_transformer(path)
        else:
            self.model = model
            self.name = str(getattr(model, "model_name", None) or getattr(model, "model", None) or type(model).__name__)

    def embed_documents(self, texts: Sequence[str], *, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """``[len(texts), dim]`` unit vectors (``[0, 0]`` for no texts)."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        if hasattr(self.model, "embed_documents"):
            vectors = np.asarray(self.model.embed_documents(list(texts)), dtype=np.float32)
        else:
            vectors = np.asarray(self.model.encode(list(texts), batch_size=batch_size, show_progress_bar=progress,
                                                   convert_to_numpy=True), dtype=np.float32)
        return _normalise(vectors)

    def embed_query(self, text: str) -> np.ndarray:
        """``[1, dim]`` unit vector."""
        if hasattr(self.model, "embed_query"):
            vector = np.asarray([self.model.embed_query(text)], dtype=np.float32)
        else:
            vector = np.asarray(self.model.encode([text], convert_to_numpy=True), dtype=np.float32)
        return _normalise(vector)


def as_embedder(embedder: Any) -> Embedder:
    """``embedder`` itself if it is an :class:`Embedder`, else ``Embedder(embedder)``."""
    return embedder if isinstance(embedder, Embedder) else Embedder(embedder)


def _load_sentence_transformer(path: str) -> Any:
    # One copy per process: constructing a retriever must not reload the model (~3 s).
    with _EMBEDDER_LOCK:
        if path not in _EMBEDDER_CACHE:
            from sentence_transformers import SentenceTransformer

            _EMBEDDER_CACHE[path] = SentenceTransformer(path, device="cpu")
        return _EMBEDDER_CACHE[path]


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


class DenseIndex:
    """Unit vectors searched by inner product (= cosine) with an exact faiss ``IndexFlatIP``.

    ``gpu=True`` moves the in-memory index onto the GPUs when faiss has GPU
    support (:func:`lloco_index.gpu.to_gpu_if_available`). The vectors stay
    available as :attr:`vectors` (persisting them is the caller's business).
    """

    def __init__(self, vectors: np.ndarray, *, gpu: bool = False):
        import faiss

        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._index = None
        if len(self.vectors):
            index = faiss.IndexFlatIP(self.vectors.shape[1])
            index.add(self.vectors)
            if gpu:
                from .gpu import to_gpu_if_available

                index = to_gpu_if_available(index)
            self._index = index

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, query: np.ndarray, k: int) -> tuple[list[int], list[float]]:
        """Rows of the ``k`` vectors nearest ``query`` (``[1, dim]``) and their scores, best first."""
        k = min(k, len(self))
        if k <= 0 or self._index is None:
            return [], []
        scores, rows = self._index.search(np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1), k)
        kept = [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
        return [r for r, _ in kept], [s for _, s in kept]
