"""LLoCONodeParser: documents -> compressed TextNodes (LlamaIndex NodeParser)."""

from __future__ import annotations

import logging
import warnings
from typing import Any, List, Optional, Sequence

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.node_parser.interface import NodeParser
from llama_index.core.schema import BaseNode, MetadataMode, NodeRelationship, TextNode

from ..chunking import check_text, chunk_text
from ..errors import EmptyDocumentError
from ..placeholders import make_placeholder
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
