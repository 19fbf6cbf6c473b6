"""LLM errors reach the caller through every response mode, never as LlamaIndex's "Empty Response";
budgets and answer lengths that leave room for nothing are refused where they are set."""

from __future__ import annotations

import pytest
from llama_index.core import Document

from lloco_index.compressors import ICAECompressor, ICAEConfig
from lloco_index.errors import ContextBudgetError, EmptyDocumentError
from lloco_index.llamaindex import LLoCOLLM, LLoCOQueryEngine, LLoCORetriever, build_index

from tiny_models import tiny_backbone

TOPICS = ["lighthouses guide ships", "bees make honey from nectar", "bicycles have two wheels"]
DOCS = [Document(text=" ".join(f"Sentence {i} says that {t}." for i in range(12))) for t in TOPICS]


@pytest.fixture(scope="module")
def small_window_index():
    """A decoder with a 48-position window under an LLM that claims a large one: LlamaIndex packs a
    prompt that the reader then refuses with ContextBudgetError, inside the synthesizer."""
    from lloco_index.llamaindex import default_embed_model

    backbone = tiny_backbone(max_positions=48)
    compressor = ICAECompressor(backbone, ICAEConfig(n_slots=8, segment_length=32, pooling="mean", lora_r=4, lora_alpha=8))
    index, store = build_index(DOCS, compressor, embed_model=default_embed_model())
    return index, store, compressor


@pytest.mark.parametrize("mode", ["refine", "compact", "tree_summarize", "simple_summarize"])
def test_context_budget_error_surfaces_in_every_response_mode(small_window_index, mode):
    index, store, compressor = small_window_index
    llm = LLoCOLLM(compressor, store, max_new_tokens=4, context_window=4096)
    for engine in (index.as_query_engine(llm=llm, response_mode=mode, similarity_top_k=2),
                   LLoCOQueryEngine.from_index(index, llm, response_mode=mode, similarity_top_k=2)):
        with pytest.raises(ContextBudgetError, match="positions"):
            engine.query("What do bees make?")


@pytest.mark.parametrize("mode", ["refine", "compact"])
def test_zero_answer_length_set_after_construction_surfaces(small_window_index, mode):
    index, store, compressor = small_window_index
    llm = LLoCOLLM(compressor, store, max_new_tokens=4, context_window=4096)
    llm.max_new_tokens = 0
    engine = LLoCOQueryEngine.from_index(index, llm, response_mode=mode, similarity_top_k=1)
    with pytest.raises(ContextBudgetError, match="max_new_tokens must be a whole number of at least 1"):
        engine.query("What do bees make?")


def test_package_errors_are_not_value_errors():
    """LlamaIndex's synthesizers catch ValueError (structured refine answers "Empty Response")."""
    assert not issubclass(ContextBudgetError, ValueError) and not issubclass(EmptyDocumentError, ValueError)


def test_zero_position_budget_is_refused_where_it_is_set(small_window_index):
    index, store, _ = small_window_index
    with pytest.raises(ValueError, match="position_budget must be at least 1"):
        LLoCORetriever.from_index(index, store, position_budget=0)
    with pytest.raises(ValueError, match="position_budget must be"):
        LLoCORetriever.from_index(index, store, position_budget=-5)
    assert LLoCORetriever.from_index(index, store, position_budget=None).position_budget is None  # no limit


def test_zero_position_budget_for_the_langchain_retriever():
    from conftest_langchain import CORPUS, tiny_compressor
    from lloco_index.langchain import LLoCOLangChainRetriever

    with pytest.raises(ValueError, match=r"position_budget\n.*greater than or equal to 1"):
        LLoCOLangChainRetriever.from_texts(CORPUS[:2], tiny_compressor(), None, position_budget=0)
    retriever = LLoCOLangChainRetriever.from_texts(CORPUS[:2], tiny_compressor(), None)
    with pytest.raises(ValueError, match="position_budget must be at least 1"):
        retriever.invoke("Eiffel", position_budget=0)


def test_simple_summarize_counts_the_soft_prompts_it_cannot_fit():
    """simple_summarize joins all chunks into one string before truncate: the message counts soft prompts."""
    from lloco_index.llamaindex import default_embed_model

    backbone = tiny_backbone()
    compressor = ICAECompressor(backbone, ICAEConfig(n_slots=8, segment_length=32, pooling="mean", lora_r=4, lora_alpha=8))
    index, store = build_index(DOCS, compressor, embed_model=default_embed_model())
    llm = LLoCOLLM(compressor, store, max_new_tokens=4, context_window=140)
    engine = LLoCOQueryEngine.from_index(index, llm, response_mode="simple_summarize", similarity_top_k=6,
                                         position_budget=None, expand_top_k=0)
    retrieved = len(engine.retrieve(_bundle("What do bees make?")))
    assert retrieved > 1
    with pytest.raises(ContextBudgetError, match=rf"The retrieved context \({retrieved} soft prompts\) needs \d+ positions"):
        engine.query("What do bees make?")


def _bundle(text):
    from llama_index.core.schema import QueryBundle

    return QueryBundle(text)
