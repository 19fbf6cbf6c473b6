"""LLoCOQueryEngine: a RetrieverQueryEngine wired so that soft prompts arrive exactly once."""

from __future__ import annotations

from typing import Any, Optional

from llama_index.core import get_response_synthesizer
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import QueryBundle

from .. import defaults
from ..placeholders import escape_placeholders
from .prompt_helper import LLoCOPromptHelper
from .retriever import LLoCORetriever


class LLoCOQueryEngine(RetrieverQueryEngine):
    """Query an index of compressed nodes with :class:`LLoCOLLM`.

    >>> engine = LLoCOQueryEngine.from_index(index, llm, response_mode="compact", similarity_top_k=4)
    >>> engine.query("Who built the first lighthouse?")

    ``expand_top_k`` chunks (default 1) reach the LLM as their text, the rest as soft prompts
    (:mod:`lloco_index.selection`); ``expand_top_k=0`` reads soft prompts only.

    ``index.as_query_engine(llm=llm)`` also runs, but LlamaIndex then counts a
    placeholder as ~10 tokens and ignores a ``prompt_helper`` argument; this
    entry point passes an :class:`LLoCOPromptHelper` to the synthesizer and an
    :class:`LLoCORetriever` with a position budget in front of the index.

    The question is untrusted text: placeholders in it are escaped, so only
    the soft prompts of the retrieved nodes are read (see
    :func:`~lloco_index.placeholders.escape_placeholders`).
    """

    def _query(self, query_bundle: QueryBundle):
        return super()._query(_untrusted(query_bundle))

    async def _aquery(self, query_bundle: QueryBundle):
        return await super()._aquery(_untrusted(query_bundle))

    @classmethod
    def from_index(
        cls,
        index,
        llm,
        *,
        response_mode: str = "compact",
        similarity_top_k: int = defaults.DEFAULT_TOP_K,
        position_budget: Optional[int] = None,
        expand_top_k: int = defaults.DEFAULT_EXPAND_TOP_K,
        text_budget: Optional[int] = defaults.DEFAULT_TEXT_BUDGET,
        policy: str = defaults.DEFAULT_EXPANSION_POLICY,
        streaming: bool = False,
        **synth_kwargs: Any,
    ) -> "LLoCOQueryEngine":
        helper = LLoCOPromptHelper.from_llm(llm)
        if position_budget is None:
            position_budget = min(defaults.DEFAULT_POSITION_BUDGET, llm.metadata.context_window // 2)
        retriever = LLoCORetriever.from_index(index, llm.store, similarity_top_k=similarity_top_k,
                                              position_budget=position_budget, expand_top_k=expand_top_k,
                                              text_budget=text_budget, policy=policy,
                                              text_positions=llm.count_positions, reader=llm.reader)
        synthesizer = get_response_synthesizer(llm=llm, prompt_helper=helper, response_mode=response_mode,
                                               streaming=streaming, **synth_kwargs)
        return cls(retriever=retriever, response_synthesizer=synthesizer)


def _untrusted(query_bundle: QueryBundle) -> QueryBundle:
    """The question with its placeholders escaped; retrieval still embeds what the user typed."""
    escaped = escape_placeholders(query_bundle.query_str)
    if escaped == query_bundle.query_str:
        return query_bundle
    return QueryBundle(query_str=escaped, image_path=query_bundle.image_path, embedding=query_bundle.embedding,
                       custom_embedding_strs=query_bundle.custom_embedding_strs or [query_bundle.query_str])
