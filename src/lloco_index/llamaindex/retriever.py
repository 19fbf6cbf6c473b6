"""LLoCORetriever: any retriever's nodes, ordered, deduplicated and fitted to a position budget."""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle

from .. import defaults
from ..store import SoftPromptStore
from .node_keys import CHUNK_KEY, DOC_KEY, ID_KEY, POSITIONS_KEY, apply_placeholder_view, is_compressed


class LLoCORetriever(BaseRetriever):
    """Wrap a retriever so that what it returns is ready for soft-prompt reading.

    * drops duplicate chunks (same soft-prompt id, e.g. a document ingested twice);
    * keeps the best-scoring chunks whose soft prompts fit ``position_budget``
      (a node's real cost is its soft prompt's positions, not its text);
    * orders the survivors document by document (best document first) and, within
      a document, in reading order, as LLoCO feeds its summaries;
    * re-applies the placeholder view, so that metadata added after ingestion
      cannot hide the placeholder from the LLM.

    >>> retriever = LLoCORetriever(index.as_retriever(similarity_top_k=8), store=store, position_budget=1024)
    """

    def __init__(
        self,
        retriever: BaseRetriever,
        store: Optional[SoftPromptStore] = None,
        *,
        position_budget: int = defaults.DEFAULT_POSITION_BUDGET,
        text_positions: Optional[Callable[[str], int]] = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.retriever = retriever
        self.store = store
        self.position_budget = position_budget
        self.text_positions = text_positions or (lambda text: len(text) // 4 + 1)

    @classmethod
    def from_index(cls, index, store: Optional[SoftPromptStore] = None, *, similarity_top_k: int = defaults.DEFAULT_TOP_K,
                   position_budget: int = defaults.DEFAULT_POSITION_BUDGET, **kwargs: Any) -> "LLoCORetriever":
        return cls(index.as_retriever(similarity_top_k=similarity_top_k), store, position_budget=position_budget, **kwargs)

    def _cost(self, nws: NodeWithScore) -> int:
        node = nws.node
        if is_compressed(node):
            prompt_id = node.metadata[ID_KEY]
            if self.store is not None and prompt_id in self.store:
                return self.store.num_positions(prompt_id)
            return int(node.metadata.get(POSITIONS_KEY, 0))
        return self.text_positions(node.get_content())

    def select(self, results: List[NodeWithScore]) -> List[NodeWithScore]:
        """Dedupe, fit the budget, then order by document and chunk (the policy, without retrieval)."""
        seen: set[str] = set()
        unique: List[NodeWithScore] = []
        for nws in sorted(results, key=lambda r: -(r.score or 0.0)):
            key = nws.node.metadata.get(ID_KEY) or nws.node.node_id
            if key not in seen:
                seen.add(key)
                unique.append(nws)
        kept: List[NodeWithScore] = []
        used = 0
        for nws in unique:
            cost = self._cost(nws)
            if used + cost <= self.position_budget:
                kept.append(nws)
                used += cost
        doc_rank: dict[str, int] = {}
        for nws in kept:  # kept is best-first, so the first sighting is the document's best score
            doc_rank.setdefault(str(nws.node.metadata.get(DOC_KEY) or nws.node.ref_doc_id), len(doc_rank))
        kept.sort(key=lambda r: (doc_rank[str(r.node.metadata.get(DOC_KEY) or r.node.ref_doc_id)], r.node.metadata.get(CHUNK_KEY, 0)))
        for nws in kept:
            if is_compressed(nws.node):
                apply_placeholder_view(nws.node)
        return kept

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return self.select(self.retriever.retrieve(query_bundle))

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return self.select(await self.retriever.aretrieve(query_bundle))
