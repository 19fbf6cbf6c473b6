"""LlamaIndex adapter: index (with its node parser), retriever, LLM, query engine (with its prompt helper)."""

from .finetune import LLoCOFinetuneEngine
from .index import LLoCONodeParser, build_index, configure_settings, default_embed_model, load_index, persist_index
from .llm import LLoCOLLM, PositionTokenizer
from .query_engine import LLoCOPromptHelper, LLoCOQueryEngine
from .retriever import LLoCORetriever

__all__ = [
    "LLoCOFinetuneEngine",
    "LLoCOLLM",
    "LLoCONodeParser",
    "LLoCOPromptHelper",
    "LLoCOQueryEngine",
    "LLoCORetriever",
    "PositionTokenizer",
    "build_index",
    "configure_settings",
    "default_embed_model",
    "load_index",
    "persist_index",
]
