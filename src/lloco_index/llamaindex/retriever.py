"""LLoCORetriever: any retriever's nodes through the selection policy (dedupe, expand, budget, reading order)."""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle

from .. import defaults
from ..selection import Candidate, SelectionConfig, expansion_scores, select
from ..store import SoftPromptStore
from .node_keys import (
    CHUNK_KEY,
    DOC_KEY,
    EXPANDED_KEY,
    ID_KEY,
    POSITIONS_KEY,
    apply_placeholder_view,
    apply_text_view,
    is_compressed,
)


class LLoCORetriever(BaseRetriever):
    """Wrap a retriever so that what it returns is ready for soft-prompt reading.

    The nodes go through :func:`lloco_index.selection.select`: one per soft prompt, the best
    ``expand_top_k`` as their text (the node's text view), the rest as placeholders (the
    placeholder view), within ``position_budget`` positions in all (each node costs what it
    really takes in the decoder), in reading order. The nodes returned are copies: the
    index's own nodes keep their placeholder view.

    >>> retriever = LLoCORetriever(index.as_retriever(similarity_top_k=8), store=store, position_budget=1024,
    ...                            expand_top_k=1, text_positions=llm.count_positions)
    """

    def __init__(
        self,
        retriever: BaseRetriever,
        store: Optional[SoftPromptStore] = None,
        *,
        position_budget: Optional[int] = defaults.DEFAULT_POSITION_BUDGET,
        expand_top_k: int = defaults.DEFAULT_EXPAND_TOP_K,
        text_budget: Optional[int] = defaults.DEFAULT_TEXT_BUDGET,
        policy: str = defaults.DEFAULT_EXPANSION_POLICY,
        top_k: Optional[int] = None,
        text_positions: Optional[Callable[[str], int]] = None,
        reader: Any = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.retriever = retriever
        self.store = store
        self.selection = SelectionConfig(top_k=top_k, position_budget=position_budget, expand_top_k=expand_top_k,
                                         text_budget=text_budget, policy=policy)
        if policy == "likelihood" and reader is None:
            raise ValueError("policy='likelihood' ranks chunks with the decoder: pass reader=llm.reader.")
        self.reader = reader
        # Without the decoder's tokenizer, a rough 4 characters per position (pass llm.count_positions).
        self.text_positions = text_positions or (lambda text: len(text) // 4 + 1)

    @property
    def position_budget(self) -> Optional[int]:
        return self.selection.position_budget

    @classmethod
    def from_index(cls, index, store: Optional[SoftPromptStore] = None, *, similarity_top_k: int = defaults.DEFAULT_TOP_K,
                   **kwargs: Any) -> "LLoCORetriever":
        return cls(index.as_retriever(similarity_top_k=similarity_top_k), store, **kwargs)

    def _candidate(self, nws: NodeWithScore) -> Candidate:
        node = nws.node
        text = node.get_content(metadata_mode="none") if not is_compressed(node) else node.text
        if is_compressed(node):
            prompt_id = node.metadata[ID_KEY]
            if self.store is None:  # no store to ask: the length recorded at ingestion
                soft = int(node.metadata.get(POSITIONS_KEY, 0))
            else:
                soft = self.store.num_positions(prompt_id) if prompt_id in self.store else None
        else:  # a plain text node (e.g. from another index): text only
            prompt_id, soft = node.node_id, None
        return Candidate(id=prompt_id, doc_id=str(node.metadata.get(DOC_KEY) or node.ref_doc_id),
                         chunk=int(node.metadata.get(CHUNK_KEY, 0)), score=float(nws.score or 0.0),
                         soft_positions=soft, text_positions=self.text_positions(text) if text and text.strip() else None,
                         item=nws, text=text)

    def select(self, results: List[NodeWithScore], query: Optional[str] = None, *,
               expand_top_k: Optional[int] = None) -> List[NodeWithScore]:
        """The policy on already retrieved nodes: returns copies in reading order, each in its view."""
        config = self.selection.with_overrides(expand_top_k=expand_top_k)
        candidates = [self._candidate(r) for r in results]
        scores = expansion_scores(config.policy, query, candidates, reader=self.reader) if config.expand_top_k else None
        out: List[NodeWithScore] = []
        for picked in select(candidates, config, expansion_scores=scores):
            nws = picked.candidate.item
            node = nws.node.model_copy(deep=True)
            if is_compressed(node):
                node.metadata[EXPANDED_KEY] = picked.expanded
                (apply_text_view if picked.expanded else apply_placeholder_view)(node)
            out.append(NodeWithScore(node=node, score=nws.score))
        return out

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return self.select(self.retriever.retrieve(query_bundle), query_bundle.query_str)

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return self.select(await self.retriever.aretrieve(query_bundle), query_bundle.query_str)
