"""The text side works with any LlamaIndex vector store: LlamaIndex's own SimpleVectorStore next to faiss.

Soft prompts live in the SoftPromptStore and placeholders in the nodes' persisted fields, so the vector
store only has to hold node embeddings and return nodes: the retriever and the LLM are the same.
"""

from __future__ import annotations

import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.vector_stores import SimpleVectorStore

from lloco_index.compressors import TokenEmbeddingCompressor
from lloco_index.compressors.token_embedding import TokenEmbeddingConfig
from lloco_index.llamaindex import LLoCOLLM, LLoCONodeParser, LLoCOQueryEngine, LLoCORetriever, build_index
from lloco_index.llamaindex.node_keys import ID_KEY
from lloco_index.generation import find_ids

from helpers import DOCS  # shared with the Qdrant test


@pytest.fixture(scope="module")
def embed_model():
    from lloco_index.llamaindex import default_embed_model

    return default_embed_model()


def test_simple_vector_store_gives_the_same_nodes_and_answers_as_faiss(backbone, embed_model):
    comp = TokenEmbeddingCompressor(backbone, TokenEmbeddingConfig(segment_length=32))
    parser = LLoCONodeParser(comp)
    nodes = parser.get_nodes_from_documents(DOCS)
    simple = VectorStoreIndex(nodes, embed_model=embed_model)  # LlamaIndex's default in-memory vector store
    assert isinstance(simple.vector_store, SimpleVectorStore)
    faiss_index, faiss_store = build_index(DOCS, comp, embed_model=embed_model)

    question = "What do bees make?"
    from_simple = LLoCORetriever.from_index(simple, parser.store, similarity_top_k=3).retrieve(question)
    from_faiss = LLoCORetriever.from_index(faiss_index, faiss_store, similarity_top_k=3).retrieve(question)
    assert [n.node.metadata[ID_KEY] for n in from_simple] == [n.node.metadata[ID_KEY] for n in from_faiss]

    llm = LLoCOLLM(comp, parser.store, max_new_tokens=6)
    seen: list[str] = []
    real = llm.reader.prepare

    def spy(messages, **kwargs):
        seen.extend(find_ids(" ".join(m["content"] for m in messages)))
        return real(messages, **kwargs)

    llm.reader.prepare = spy
    answer = LLoCOQueryEngine.from_index(simple, llm, similarity_top_k=3, response_mode="compact").query(question)
    assert seen and set(seen) <= set(parser.store.ids())  # the LLM read soft prompts found through SimpleVectorStore
    # Same soft prompts found through faiss: the same greedy answer.
    llm.reader.prepare = real
    via_faiss = LLoCOQueryEngine.from_index(faiss_index, llm, similarity_top_k=3, response_mode="compact").query(question)
    assert answer.response.strip() and via_faiss.response == answer.response
