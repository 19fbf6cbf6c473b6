"""LLoCOQueryEngine: a RetrieverQueryEngine wired so that soft prompts arrive exactly once.

Its synthesizer packs with :class:`LLoCOPromptHelper`, which never splits, repeats or drops a soft prompt.
LlamaIndex's PromptHelper measures text with a tokenizer and re-splits it with
a TokenTextSplitter (with 10% overlap): a placeholder is counted as ~10
tokens instead of its real positions, can be cut in half, and lands twice
in overlapping windows. Here chunks are whole units: ``repack`` packs whole
chunks greedily by their real positions, ``truncate`` keeps them whole and
fails loudly when they cannot all fit.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from llama_index.core import get_response_synthesizer
from llama_index.core.indices.prompt_helper import PromptHelper
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import QueryBundle

from .. import defaults
from ..errors import ContextBudgetError
from ..generation import PLACEHOLDER_RE, escape_placeholders, find_ids
from .retriever import LLoCORetriever

SEPARATOR = "\n\n"


class LLoCOPromptHelper(PromptHelper):
    """A PromptHelper whose token counts are decoder positions and whose units are whole chunks.

    >>> helper = LLoCOPromptHelper.from_llm(llm)
    >>> synth = get_response_synthesizer(llm=llm, prompt_helper=helper, response_mode="compact")
    """

    @classmethod
    def from_llm(cls, llm, **kwargs: Any) -> "LLoCOPromptHelper":
        return cls(context_window=llm.metadata.context_window, num_output=llm.metadata.num_output,
                   chunk_overlap_ratio=0.0, tokenizer=llm.position_tokenizer(), **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "LLoCOPromptHelper"

    def _positions(self, text: str) -> int:
        return self._token_counter.get_string_tokens(text)

    def repack(self, prompt: BasePromptTemplate, text_chunks: Sequence[str], padding: int = 5,
               llm: Optional[Any] = None, tools: Optional[List[Any]] = None) -> List[str]:
        budget = self._get_available_chunk_size(prompt, 1, padding=padding, llm=llm, tools=tools)
        packs: List[str] = []
        current: List[str] = []
        used = 0
        for chunk in (c.strip() for c in text_chunks):
            if not chunk:
                continue
            cost = self._positions(chunk) + (self._positions(SEPARATOR) if current else 0)
            if current and used + cost > budget:
                packs.append(SEPARATOR.join(current))
                current, used = [], 0
                cost = self._positions(chunk)
            # A chunk larger than the budget travels alone and whole: the reader reports it if it cannot fit.
            current.append(chunk)
            used += cost
        if current:
            packs.append(SEPARATOR.join(current))
        return packs

    def truncate(self, prompt: BasePromptTemplate, text_chunks: Sequence[str], padding: int = 5,
                 llm: Optional[Any] = None, tools: Optional[List[Any]] = None) -> List[str]:
        if not text_chunks:
            return []
        budget = self._get_available_chunk_size(prompt, 1, padding=padding, llm=llm, tools=tools)
        needed = sum(self._positions(c) for c in text_chunks) + self._positions("\n") * (len(text_chunks) - 1)
        if needed > budget:
            # simple_summarize joins every chunk into one string before it calls truncate: count the soft
            # prompts in it, not the strings.
            soft = sum(len(find_ids(c)) for c in text_chunks)
            text = any(PLACEHOLDER_RE.sub("", c).strip() for c in text_chunks)
            what = f"{soft} soft prompt{'' if soft == 1 else 's'}" + (" and text" if text and soft else "") if soft else "text"
            raise ContextBudgetError(
                f"The retrieved context ({what}) needs {needed} positions but one call has {budget}. Truncating "
                f"would drop or cut soft prompts: lower the retriever's position_budget or similarity_top_k, or use "
                f"response_mode='compact' / 'tree_summarize', which spread chunks over several calls."
            )
        return [c for c in text_chunks]



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
    :func:`~lloco_index.escape_placeholders`).
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
