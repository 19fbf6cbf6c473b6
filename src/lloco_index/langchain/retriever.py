"""LLoCOLangChainRetriever: a LangChain retriever that returns soft-prompt placeholders.

Each returned ``Document`` has the placeholder ``<|lloco:ID|>`` as its
``page_content`` -- or, for the ``expand_top_k`` best chunks (selective
expansion, :mod:`lloco_index.selection`), the chunk's text -- (so the standard ``format_docs`` + prompt template put the
placeholder into the prompt, and :class:`~lloco_index.langchain.ChatLLoCO`
splices the soft prompt in its place) and keeps everything else in metadata:

=================== ==========================================================
``lloco_text``      the chunk's text (what was embedded, for display/citing)
``lloco_id``        the soft-prompt id in the store
``lloco_doc_id``    the document the chunk came from
``lloco_chunk``     the chunk's position in that document (reading order)
``lloco_positions`` decoder positions the soft prompt takes
``lloco_score``     cosine similarity to the query
``lloco_expanded``  True when the selection policy put the chunk in as its text
``source`` ...      the document's own metadata, unchanged
=================== ==========================================================

The ``lloco_*`` keys have the same names and meaning as the LlamaIndex
adapter's node metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence, Union

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, model_validator

from .. import defaults
from ..keys import CHUNK_KEY, DOC_KEY, EXPANDED_KEY, ID_KEY, POSITIONS_KEY, SCORE_KEY, TEXT_KEY
from ..generation import hand_out, make_placeholder
from ..selection import POLICIES
from ..store import SoftPromptStore
from .search import ChunkIndex, OnEmpty, SearchHit


class LLoCOLangChainRetriever(BaseRetriever):
    """Dense retrieval over compressed chunks; Documents carry placeholders, not text.

    Build once (chunks at the compressor's segment length, compressed into the
    store, embedded with the local all-MiniLM-L6-v2, indexed with faiss):

    >>> retriever = LLoCOLangChainRetriever.from_texts(texts, compressor, persist_dir="./storage",
    ...                                                metadatas=[{"source": p} for p in paths], k=4)

    reopen later (no compressor needed to search):

    >>> retriever = LLoCOLangChainRetriever(persist_dir="./storage", k=4)

    and use it in the usual LCEL RAG chain with :class:`ChatLLoCO`:

    >>> def format_docs(docs): return "\\n\\n".join(d.page_content for d in docs)
    >>> chain = ({"context": retriever | format_docs, "question": RunnablePassthrough()}
    ...          | prompt | ChatLLoCO.from_retriever(retriever) | StrOutputParser())

    ``k``, ``position_budget`` and ``expand_top_k`` can also be given per call:
    ``retriever.invoke(q, k=2, position_budget=256, expand_top_k=0)``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: Optional[ChunkIndex] = Field(default=None, exclude=True, description="The chunk index to search.")
    persist_dir: Optional[str] = Field(default=None, description="Reopen the index persisted here (when index is not given).")
    compressor: Optional[Any] = Field(default=None, exclude=True, description="Needed only to add texts later.")
    embedder: Optional[Any] = Field(default=None, exclude=True,
                                    description="None (shipped all-MiniLM-L6-v2), a sentence-transformers path/model or LangChain Embeddings.")
    k: int = Field(default=defaults.DEFAULT_TOP_K, ge=0, description="Chunks to return.")
    position_budget: Optional[int] = Field(default=defaults.DEFAULT_POSITION_BUDGET, ge=1,
                                           description="Most soft-prompt positions returned per query (None: no limit).")
    fetch_k: Optional[int] = Field(default=None, ge=1, description="Candidates searched before dedupe/budget (default max(4k, k+8)).")
    expand_top_k: int = Field(default=defaults.DEFAULT_EXPAND_TOP_K, ge=0,
                              description="Best chunks returned as their text instead of a placeholder (0: soft prompts only).")
    text_budget: Optional[int] = Field(default=defaults.DEFAULT_TEXT_BUDGET, ge=0,
                                       description="Most decoder positions of expanded text per query (None: no limit).")
    policy: Literal[POLICIES] = Field(default=defaults.DEFAULT_EXPANSION_POLICY,
                                      description="Which chunks to expand: score, lexical or likelihood (needs reader).")
    reader: Optional[Any] = Field(default=None, exclude=True,
                                  description="The SoftPromptReader that ranks chunks for policy='likelihood' (chat.reader).")

    @model_validator(mode="after")
    def _open_index(self) -> "LLoCOLangChainRetriever":
        if self.policy == "likelihood" and self.reader is None:
            raise ValueError("policy='likelihood' ranks chunks with the decoder: pass reader=chat_model.reader.")
        if self.index is None:
            if self.persist_dir is None:
                raise ValueError(
                    "LLoCOLangChainRetriever needs index= or persist_dir=; build one with "
                    "LLoCOLangChainRetriever.from_texts(texts, compressor, persist_dir=...)."
                )
            self.index = ChunkIndex.load(self.persist_dir, self.compressor, embedder=self.embedder)
        return self

    # -------------------------------------------------------------- building
    @classmethod
    def from_texts(cls, texts: Sequence[str], compressor: Any, persist_dir: Optional[Union[str, Path]] = None,
                   metadatas: Optional[Sequence[Optional[dict]]] = None, *, ids: Optional[Sequence[Optional[str]]] = None,
                   embedder: Any = None, on_empty: OnEmpty = "warn", progress: bool = False,
                   **kwargs: Any) -> "LLoCOLangChainRetriever":
        """Chunk, compress and index ``texts`` (appending to ``persist_dir`` if it already holds an index).

        ``ids`` are document ids (default: ``metadata["doc_id"]``/``["id"]`` or a
        content hash); ``kwargs`` go to the retriever (``k``, ``position_budget``, ...).
        """
        index = ChunkIndex.create(compressor, persist_dir, embedder=embedder)
        index.add_texts(texts, metadatas, ids=ids, on_empty=on_empty, progress=progress)
        return cls(index=index, compressor=compressor, persist_dir=str(persist_dir) if persist_dir is not None else None,
                   **kwargs)

    @classmethod
    def from_documents(cls, documents: Iterable[Document], compressor: Any,
                       persist_dir: Optional[Union[str, Path]] = None, **kwargs: Any) -> "LLoCOLangChainRetriever":
        """Like :meth:`from_texts`, from LangChain ``Document`` objects (``Document.id`` is the document id)."""
        documents = list(documents)
        return cls.from_texts([d.page_content for d in documents], compressor, persist_dir,
                              [dict(d.metadata) for d in documents], ids=[d.id for d in documents], **kwargs)

    def add_texts(self, texts: Sequence[str], metadatas: Optional[Sequence[Optional[dict]]] = None, **kwargs: Any) -> list[str]:
        """Add more documents; returns the soft-prompt ids of their chunks."""
        assert self.index is not None
        if self.index.compressor is None and self.compressor is not None:
            self.index.store.check_compressor(self.compressor)
            self.index.compressor = self.compressor
        return self.index.add_texts(texts, metadatas, **kwargs)

    def add_documents(self, documents: Iterable[Document], **kwargs: Any) -> list[str]:
        documents = list(documents)
        return self.add_texts([d.page_content for d in documents], [dict(d.metadata) for d in documents],
                              ids=[d.id for d in documents], **kwargs)

    # ------------------------------------------------------------- accessors
    @property
    def store(self) -> SoftPromptStore:
        """The soft-prompt store the placeholders refer to (hand it to ChatLLoCO)."""
        assert self.index is not None
        return self.index.store

    # -------------------------------------------------------------- retrieval
    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: Optional[int] = None, position_budget: Optional[int] = -1,
                                expand_top_k: Optional[int] = None) -> list[Document]:
        assert self.index is not None
        budget = self.position_budget if position_budget == -1 else position_budget  # -1: not given (None means no limit)
        hits = self.index.search(query, self.k if k is None else k, position_budget=budget, fetch_k=self.fetch_k,
                                 expand_top_k=self.expand_top_k if expand_top_k is None else expand_top_k,
                                 text_budget=self.text_budget, policy=self.policy, reader=self.reader)
        return [self._document(hit) for hit in hits]

    @staticmethod
    def _document(hit: SearchHit) -> Document:
        record = hit.record
        metadata = dict(record.metadata)
        metadata.update({
            TEXT_KEY: record.text,
            ID_KEY: record.soft_prompt_id,
            DOC_KEY: record.doc_id,
            CHUNK_KEY: record.chunk,
            POSITIONS_KEY: record.positions,
            SCORE_KEY: hit.score,
            EXPANDED_KEY: hit.expanded,
        })
        if not hit.expanded:
            hand_out([record.soft_prompt_id])  # ChatLLoCO resolves only ids a retriever handed out
        content = record.text if hit.expanded else make_placeholder(record.soft_prompt_id)
        return Document(id=f"{record.doc_id}#{record.chunk}", page_content=content, metadata=metadata)
