"""Turn QA records into training examples built exactly as the query path builds its LLM calls.

The framework adapters supply two callables, so that this core never re-implements a framework's prompt:

* ``contexts_for(example) -> list[Context]``: the chunks the query path would hand the LLM for this
  question (the retriever's nodes, or the gold contexts mapped onto the store's soft prompts);
* ``messages_for(question, chunks) -> list[Message]``: the chat messages the query path would send for
  these chunk strings (for LlamaIndex: the compact synthesizer's packing + ``text_qa_template`` + the
  LLM's own message extension).

With chunks' LLM-facing content (placeholders) they give the training prompt; with the chunks' plain text
they give the prompt a distillation teacher reads ("the same model reading the full text").

>>> examples = build_train_examples(qa, reader, contexts_for=..., messages_for=..., progress=True)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from tqdm.auto import tqdm

from ..generation import SoftPromptReader
from ..training.data import QAExample
from .data import Message, TrainExample

logger = logging.getLogger(__name__)


@dataclass
class Context:
    """One chunk handed to the LLM: what it sees (a placeholder) and the text it stands for."""

    llm_content: str
    text: str
    ref: str = ""  # node id or soft-prompt id, for the record


ContextsFn = Callable[[QAExample], list[Context]]
MessagesFn = Callable[[str, Sequence[str]], list[Message]]
TeacherFn = Callable[[list[Message]], str]


def self_teacher(reader: SoftPromptReader, max_new_tokens: int) -> TeacherFn:
    """Distillation teacher: the base decoder (no adapter) answering from the full text, greedily."""

    def answer(messages: list[Message]) -> str:
        return reader.generate(messages, adapter=None, max_new_tokens=max_new_tokens).text

    return answer


def build_train_examples(
    qa: Sequence[QAExample],
    *,
    contexts_for: ContextsFn,
    messages_for: MessagesFn,
    teacher: Optional[TeacherFn] = None,
    progress: bool = False,
) -> list[TrainExample]:
    """One :class:`TrainExample` per QA record; records without an answer get the teacher's.

    Records whose question retrieves nothing are skipped (logged): the query path would not call the
    LLM with soft prompts for them either.
    """
    out: list[TrainExample] = []
    skipped = 0
    for ex in tqdm(qa, desc="building examples", unit="q", disable=not progress):
        contexts = contexts_for(ex)
        if not contexts:
            skipped += 1
            continue
        messages = messages_for(ex.question, [c.llm_content for c in contexts])
        target, source = ex.answer, "gold"
        if target is None:
            if teacher is None:
                raise ValueError(f"Example {ex.id} has no answer and no distillation teacher was given.")
            target = teacher(messages_for(ex.question, [c.text for c in contexts]))
            source = "distilled"
        if not target.strip():
            skipped += 1
            continue
        out.append(TrainExample(messages=messages, target=target.strip(), id=ex.id, kind="qa", meta={
            "group": ex.group, "question": ex.question, "references": ex.references, "target_source": source,
            "contexts": [c.ref for c in contexts]}))
    if skipped:
        logger.warning("Skipped %d of %d questions (nothing retrieved, or an empty distilled answer).", skipped, len(qa))
    return out
