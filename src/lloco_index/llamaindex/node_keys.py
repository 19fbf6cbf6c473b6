"""Metadata keys that make a plain, persisted TextNode a compressed node.

TextNode subclasses come back from the docstore as plain TextNodes, so the
placeholder lives in ordinary fields: a metadata key that is the only thing
the LLM sees (``text_template="{metadata_str}"``, ``metadata_template="{value}"``)
and that the embedder never sees, while ``node.text`` keeps the chunk text for
retrieval and display.
"""

from __future__ import annotations

from llama_index.core.schema import BaseNode, TextNode

from ..keys import (  # noqa: F401  (the adapter's modules import the keys from here)
    CHUNK_KEY,
    DOC_KEY,
    EXPANDED_KEY,
    FINGERPRINT_KEY,
    ID_KEY,
    LLOCO_KEYS,
    POSITIONS_KEY,
    SOFT_PROMPT_KEY,
)


def is_compressed(node: BaseNode) -> bool:
    return isinstance(node, TextNode) and SOFT_PROMPT_KEY in (node.metadata or {})


def apply_placeholder_view(node: TextNode) -> TextNode:
    """Make the LLM see only the placeholder and the embedder only the text (idempotent)."""
    keys = list(node.metadata)
    node.excluded_embed_metadata_keys = keys
    node.excluded_llm_metadata_keys = [k for k in keys if k != SOFT_PROMPT_KEY]
    node.metadata_template = "{value}"
    node.text_template = "{metadata_str}"
    return node


def apply_text_view(node: TextNode) -> TextNode:
    """Make the LLM see the chunk's text instead of its placeholder (an expanded chunk; idempotent)."""
    node.excluded_llm_metadata_keys = list(node.metadata)
    node.excluded_embed_metadata_keys = list(node.metadata)
    node.metadata_template = "{key}: {value}"
    node.text_template = "{metadata_str}\n\n{content}"
    return node
