"""lloco-index: LLoCO-style offline context compression for LlamaIndex and LangChain.

Documents are compressed offline into short soft prompts; retrievers return
placeholders for them; :class:`LLoCOLLM` / :class:`ChatLLoCO` read the soft
prompts with a (LoRA-tuned) decoder.

>>> from lloco_index import build_index, LLoCOLLM, LLoCOQueryEngine
>>> index, store = build_index(documents, persist_dir="./storage")
>>> llm = LLoCOLLM.from_persist_dir("./storage")
>>> LLoCOQueryEngine.from_index(index, llm).query("...")

Framework adapters are imported lazily, so the core works without them.
"""

from __future__ import annotations

import importlib
from typing import Any

from .backbone import Backbone
from .compressors import (
    BaseCompressor,
    Compressor,
    ICAECompressor,
    ICAEConfig,
    TokenEmbeddingCompressor,
    load_compressor,
)
from .errors import (
    AdapterMismatchError,
    ContextBudgetError,
    CorruptStoreError,
    EmptyDocumentError,
    LLoCOError,
    ModelNotFoundError,
    PersistDirError,
    StoreLockedError,
    StoreMismatchError,
    PlaceholderNotAllowedError,
    UnknownPlaceholderError,
)
from .generation import SoftPromptReader, escape_placeholders, find_ids, make_placeholder, split_prompt
from .precision import describe as describe_precision
from .precision import set_precision
from .store import SoftPromptStore

__version__ = "0.1.0"

_LAZY = {
    "LLoCONodeParser": "lloco_index.llamaindex",
    "LLoCORetriever": "lloco_index.llamaindex",
    "LLoCOLLM": "lloco_index.llamaindex",
    "LLoCOQueryEngine": "lloco_index.llamaindex",
    "LLoCOPromptHelper": "lloco_index.llamaindex",
    "build_index": "lloco_index.llamaindex",
    "load_index": "lloco_index.llamaindex",
    "configure_settings": "lloco_index.llamaindex",
    "LLoCOFinetuneEngine": "lloco_index.llamaindex",
    "ChatLLoCO": "lloco_index.langchain",
    "LLoCOLangChainRetriever": "lloco_index.langchain",
    "AutoCompressor": "lloco_index.compressors.autocompressor",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lloco_index' has no attribute {name!r}")


__all__ = [
    "AdapterMismatchError",
    "Backbone",
    "BaseCompressor",
    "Compressor",
    "ContextBudgetError",
    "CorruptStoreError",
    "EmptyDocumentError",
    "ICAECompressor",
    "ICAEConfig",
    "LLoCOError",
    "ModelNotFoundError",
    "PersistDirError",
    "SoftPromptReader",
    "SoftPromptStore",
    "StoreLockedError",
    "StoreMismatchError",
    "TokenEmbeddingCompressor",
    "PlaceholderNotAllowedError",
    "UnknownPlaceholderError",
    "describe_precision",
    "escape_placeholders",
    "find_ids",
    "load_compressor",
    "make_placeholder",
    "set_precision",
    "split_prompt",
    *_LAZY,
]
