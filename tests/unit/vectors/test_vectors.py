"""The framework-free dense retrieval shared by the LangChain index and the benchmark retriever."""

from __future__ import annotations

import numpy as np

from lloco_index.vectors import DenseIndex, as_embedder


class LetterCounts:
    """A SentenceTransformer-like encoder: counts of a few letters (deterministic, no model)."""

    def encode(self, texts, **kwargs):
        return np.array([[t.count(c) + 0.1 for c in "abehlnost"] for t in texts], dtype=np.float32)


def test_dense_index_returns_best_rows_first_with_cosine_scores():
    embedder = as_embedder(LetterCounts())
    texts = ["bees make honey", "lighthouses stand on the coast", "honey bees", "boats"]
    vectors = embedder.embed_documents(texts)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    index = DenseIndex(vectors)
    query = embedder.embed_query("honey bees")
    rows, scores = index.search(query, 10)
    assert len(rows) == len(texts) and rows[0] == 2 and scores[0] == max(scores)
    np.testing.assert_allclose(scores, [float(vectors[r] @ query[0]) for r in rows], rtol=1e-5)
    assert index.search(query, 0) == ([], []) and DenseIndex(np.zeros((0, 0), np.float32)).search(query, 3) == ([], [])


def test_eval_and_langchain_share_one_embedder_model():
    from lloco_index.eval.retrieval import load_embedder
    from lloco_index.langchain.search import Embedder as LangChainEmbedder

    texts = ["bees make honey", "lighthouses stand on the coast", "honey bees"]
    eval_vectors = as_embedder(load_embedder()).embed_documents(texts)
    langchain_vectors = LangChainEmbedder().embed_documents(texts)
    np.testing.assert_array_equal(eval_vectors, langchain_vectors)  # the benchmark ranks as the LangChain index does
    rows, _ = DenseIndex(langchain_vectors).search(LangChainEmbedder().embed_query("who makes honey?")[None], 2)
    assert sorted(rows) == [0, 2]
    assert load_embedder() is LangChainEmbedder().model  # one copy of all-MiniLM-L6-v2 per process
