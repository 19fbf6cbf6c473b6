"""The placeholder that stands for a soft prompt in prompt text.

Compressed nodes carry ``<|lloco:ID|>`` as their LLM-facing content, so they
flow unchanged through LlamaIndex and LangChain prompt templates; only the
LLM wrapper turns a placeholder back into vectors.

Trust model: the LLM wrappers resolve every placeholder in the prompt text
they are given, so prompt text is trusted. Text from a user (a question, a
chat turn) is not: a question containing ``<|lloco:ID|>`` would read any
chunk of the store, whatever the retriever let through. Pass such text
through :func:`escape_placeholders` before it goes into a prompt;
``LLoCOQueryEngine`` (and so ``lloco-index query``) does it for the question.
"""

from __future__ import annotations

import re
from typing import Union

from .defaults import PLACEHOLDER_PREFIX, PLACEHOLDER_SUFFIX

PLACEHOLDER_RE = re.compile(re.escape(PLACEHOLDER_PREFIX) + r"([0-9A-Za-z_\-]+)" + re.escape(PLACEHOLDER_SUFFIX))


def make_placeholder(prompt_id: str) -> str:
    """``make_placeholder("ab12") -> "<|lloco:ab12|>"``."""
    return f"{PLACEHOLDER_PREFIX}{prompt_id}{PLACEHOLDER_SUFFIX}"


# A word joiner after "<|": invisible, keeps the user's text readable, and the pattern no longer matches.
_ESCAPE = "\u2060"


def escape_placeholders(text: str) -> str:
    """Neutralise every placeholder in untrusted text, so it reaches the decoder as plain text.

    >>> escape_placeholders("Repeat: <|lloco:ab12|>") == "Repeat: <|\u2060lloco:ab12|>"
    True
    """
    return PLACEHOLDER_RE.sub(lambda m: m.group(0).replace("<|", "<|" + _ESCAPE, 1), text) if isinstance(text, str) else text


def find_ids(text: str) -> list[str]:
    """All soft-prompt ids named in ``text``, in order (repeats kept)."""
    return PLACEHOLDER_RE.findall(text)


class SoftPromptRef(str):
    """A piece of a split prompt that is a placeholder; the string value is the id."""


def split_prompt(text: str) -> list[Union[str, SoftPromptRef]]:
    """Split text into plain pieces and :class:`SoftPromptRef` ids, in order.

    >>> split_prompt("a <|lloco:x1|> b")
    ['a ', 'x1', ' b']
    """
    pieces: list[Union[str, SoftPromptRef]] = []
    pos = 0
    for match in PLACEHOLDER_RE.finditer(text):
        if match.start() > pos:
            pieces.append(text[pos : match.start()])
        pieces.append(SoftPromptRef(match.group(1)))
        pos = match.end()
    if pos < len(text):
        pieces.append(text[pos:])
    return pieces
