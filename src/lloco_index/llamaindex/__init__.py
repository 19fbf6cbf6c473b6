"""LlamaIndex adapter: node parser, retriever, LLM, query engine and index helpers."""

from .finetune import LLoCOFinetuneEngine
from .index import build_index, configure_settings, default_embed_model, load_index, persist_index
from .llm import LLoCOLLM, PositionTokenizer
from .node_parser import LLoCONodeParser
from .prompt_helper import LLoCOPromptHelper
from .query_engine import LLoCOQueryEngine
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
