"""The placeholder that stands for a soft prompt in prompt text.

Compressed nodes carry ``<|lloco:ID|>`` as their LLM-facing content, so they
flow unchanged through LlamaIndex and LangChain prompt templates; only the
LLM wrapper turns a placeholder back into vectors.

Trust model (docs/concepts.md, "Trust: prompt text and user text"): a
question containing ``<|lloco:ID|>`` must not read a chunk that the
retriever did not select. Two guards:

* ``LLoCOQueryEngine`` (and so ``lloco-index query``) escapes the question
  with :func:`escape_placeholders`; do the same wherever user text enters a
  prompt.
* ``LLoCOLLM`` and ``ChatLLoCO`` resolve only ids that a retriever handed
  out in this process (:func:`hand_out`: LlamaIndex retrievals and
  ``LLoCOLangChainRetriever`` record them) and refuse any other id with
  :class:`~lloco_index.errors.PlaceholderNotAllowedError`. A retriever's
  placeholders and the user's question arrive in one formatted message, so
  the wrappers cannot tell them apart by message; the allow-list needs no
  such split. ``resolve_placeholders="any"`` turns it off for prompts built
  from ids of your own (``store.add``). ``SoftPromptReader`` itself resolves
  every id it is given.
"""

from __future__ import annotations

import re
import threading
from typing import Iterable, Union

from .defaults import PLACEHOLDER_PREFIX, PLACEHOLDER_SUFFIX
from .errors import PlaceholderNotAllowedError

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


# Ids are sha256(fingerprint, text): an id names one chunk of one compressor in every store, so one set
# for the process serves every store and every store object opened on the same persist dir.
_handed_out: set[str] = set()
_handed_out_lock = threading.Lock()

RESOLVE_RETRIEVED = "retrieved"
RESOLVE_ANY = "any"
RESOLVE_CHOICES = (RESOLVE_RETRIEVED, RESOLVE_ANY)


def hand_out(ids: Iterable[str]) -> None:
    """Record soft-prompt ids that a retriever put into a prompt; ``LLoCOLLM``/``ChatLLoCO`` resolve only these."""
    with _handed_out_lock:
        _handed_out.update(str(i) for i in ids)


def was_handed_out(prompt_id: str) -> bool:
    with _handed_out_lock:
        return prompt_id in _handed_out


def check_handed_out(ids: Iterable[str], reader_name: str) -> None:
    """Refuse the first id that no retriever handed out in this process (``PlaceholderNotAllowedError``)."""
    with _handed_out_lock:
        refused = next((i for i in ids if i not in _handed_out), None)
    if refused is not None:
        # Worded the same whether or not the store holds the id: the error is no oracle for guessed chunks.
        raise PlaceholderNotAllowedError(
            f"The prompt names soft prompt '{refused}', which no retriever handed out in this process; {reader_name} "
            f"reads only soft prompts that retrieval put into the prompt, so that text from a user cannot read "
            f"other chunks. Escape user text with lloco_index.placeholders.escape_placeholders; for prompts you "
            f"build yourself from ids you trust (e.g. from store.add), pass resolve_placeholders='any'."
        )


def check_resolve_choice(value: str) -> str:
    if value not in RESOLVE_CHOICES:
        raise ValueError(f"resolve_placeholders must be one of {', '.join(map(repr, RESOLVE_CHOICES))}, got {value!r}.")
    return value
