"""Held-out evaluation of a compressor, always against its control lines.

A compressor carries information only when the decoder does better with a
chunk's own soft prompt than

* with no context at all (``cont_none``: the plain model's LM loss), and
* with the soft prompt of a *different* chunk (``cont_shuffled``): with a
  trainable reader adapter, the first line alone can be beaten just by the
  adapter learning the domain.

Reported (per-token means over the same scored tokens in every condition):
``cont_own`` / ``cont_shuffled`` / ``cont_raw`` (base model reading the
uncompressed segment) / ``cont_none`` (base model, no context); ``ae_loss``,
``ae_acc`` (teacher-forced autoencoding token accuracy) and their shuffled
controls; ``slot_gain`` = cont_shuffled - cont_own and ``ae_gain``. Given QA
data: answer EM/F1 with soft prompts vs the full text vs closed book, and the
normalised score (soft - closed) / (full - closed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, TypeVar

import torch

from ..eval.metrics import exact_match, f1_score
from ..generation import SoftPromptReader, make_placeholder
from ..store import SoftPromptStore
from .data import QAExample, Window, context_text, load_documents, make_windows, tokenize_documents
from .objectives import (
    SEGMENT,
    Example,
    build_decoder_batch,
    decoder_logits,
    per_example_scores,
    qa_messages,
    window_example,
)

T = TypeVar("T")


def held_out_windows(backbone, data_dir, n: int, segment_length: int, continuation_length: int,
                     documents=None) -> list[Window]:
    """``n`` windows spread evenly over the test splits (or over ``documents``)."""
    docs = documents if documents is not None else load_documents(data_dir, "test")
    windows = make_windows(tokenize_documents(docs, backbone.tokenize), segment_length, continuation_length,
                           min_continuation=continuation_length)
    if n >= len(windows):
        return windows
    step = len(windows) / n
    return [windows[int(i * step)] for i in range(n)]


def derangement(n: int) -> list[int]:
    """Another chunk for every chunk: halfway round the list, so usually another document."""
    if n < 2:
        raise ValueError("The shuffled-slot control needs at least 2 eval windows.")
    shift = max(1, n // 2)
    return [(i + shift) % n for i in range(n)]


def shuffled_slots(per_example: Sequence[Sequence[T]], fallback: Sequence[T]) -> list[list[T]]:
    """The shuffled-slot control: each example's soft prompts replaced by another example's
    (:func:`derangement`), cycled to the example's own count; ``fallback`` stands in where the other has none."""
    out = []
    for own, k in zip(per_example, derangement(len(per_example))):
        other = list(per_example[k]) or list(fallback)
        out.append([other[i % len(other)] for i in range(len(own))])
    return out


@torch.no_grad()
def _score(backbone, adapter: Optional[str], examples: list[Example], soft, batch_size: int) -> tuple[float, float]:
    """(mean per-token CE, token accuracy) over all scored tokens."""
    total = correct = count = 0.0
    for i in range(0, len(examples), batch_size):
        ex = examples[i : i + batch_size]
        s = soft[i : i + batch_size]
        embeds, mask, labels = build_decoder_batch(backbone, ex, s)
        logits = decoder_logits(backbone, adapter, embeds, mask)
        for pred, tgt, _ in per_example_scores(logits, labels):
            total += float(torch.nn.functional.cross_entropy(pred, tgt, reduction="sum"))
            correct += float((pred.argmax(-1) == tgt).sum())
            count += tgt.numel()
    return total / max(count, 1), correct / max(count, 1)


@torch.no_grad()
def evaluate_compressor(compressor, windows: Sequence[Window], *, reader_adapter: Optional[str] = None,
                        qa: Optional[Sequence[QAExample]] = None, batch_size: int = 8,
                        max_new_tokens: int = 24, ae: bool = True,
                        baseline_cache: Optional[dict] = None) -> dict[str, float]:
    """Continuation/AE metrics with control lines on held-out ``windows`` (+ QA metrics given ``qa``)."""
    backbone = compressor.backbone
    reader = SoftPromptReader(backbone, compressor=compressor)
    windows = list(windows)
    other = derangement(len(windows))
    soft = []
    for i in range(0, len(windows), batch_size):
        soft.extend(compressor.encode([w.segment for w in windows[i : i + batch_size]]))
    shuffled = [soft[j] for j in other]
    # Score continuation tokens 1.. in every condition: with no context the first one has nothing before it.
    cont = [Example("lm", w.segment, [SEGMENT], w.continuation, score_from=1) for w in windows]
    raw = [Example("lm", w.segment, [w.segment], w.continuation, score_from=1) for w in windows]
    none = [Example("lm", w.segment, [], w.continuation, score_from=1) for w in windows]
    m: dict[str, float] = {}
    m["cont_own"], _ = _score(backbone, reader_adapter, cont, soft, batch_size)
    m["cont_shuffled"], _ = _score(backbone, reader_adapter, cont, shuffled, batch_size)
    # The base model's lines do not change during training: computed once per window set.
    key = ("base", id(backbone), tuple(len(w.segment) for w in windows), tuple(w.continuation[0] for w in windows))
    if baseline_cache is None or key not in baseline_cache:
        lines = (_score(backbone, None, raw, [None] * len(raw), batch_size)[0],
                 _score(backbone, None, none, [None] * len(none), batch_size)[0])
        if baseline_cache is not None:
            baseline_cache[key] = lines
    else:
        lines = baseline_cache[key]
    m["cont_raw"], m["cont_none"] = lines
    if reader_adapter is not None:
        m["cont_none_reader"], _ = _score(backbone, reader_adapter, none, [None] * len(none), batch_size)
    m["slot_gain"] = m["cont_shuffled"] - m["cont_own"]
    if ae:
        ae_ex = [window_example(reader, "ae", w) for w in windows]
        m["ae_loss"], m["ae_acc"] = _score(backbone, reader_adapter, ae_ex, soft, batch_size)
        m["ae_loss_shuffled"], m["ae_acc_shuffled"] = _score(backbone, reader_adapter, ae_ex, shuffled, batch_size)
        m["ae_gain"] = m["ae_loss_shuffled"] - m["ae_loss"]
    if qa:
        m.update(evaluate_qa(compressor, qa, reader_adapter=reader_adapter, max_new_tokens=max_new_tokens))
    return m


# ------------------------------------------------------------------------ QA
@torch.no_grad()
def evaluate_qa(compressor, qa: Sequence[QAExample], *, reader_adapter: Optional[str] = None,
                max_new_tokens: int = 24, batch_size: int = 8) -> dict[str, float]:
    """Greedy answers with the soft prompt vs full text vs closed book, same prompt template, through the query path.

    Each context is compressed into a :class:`SoftPromptStore` and every answer comes from
    :class:`SoftPromptReader` (its rendering, splicing and generation, the stored soft prompt's
    precision), so these numbers are what a query with that chunk gets. ``soft`` reads the soft prompt
    with the reader adapter; ``full`` and ``closed`` are the base model (the reference lines). With a
    reader adapter, ``full_reader`` and ``closed_reader`` repeat those two with the adapter on: a reader
    trained on QA also answers better without context, and only the part of ``soft`` above
    ``closed_reader`` comes from the soft prompt.
    """
    qa = list(qa)
    store = SoftPromptStore.for_compressor(compressor)
    reader = SoftPromptReader(compressor.backbone, store, compressor=compressor)
    contexts = [context_text(ex) for ex in qa]
    ids = store.add(contexts, compressor) if qa else []
    prompts = {"soft": [qa_messages(ex.question, make_placeholder(i)) for ex, i in zip(qa, ids)],
               "full": [qa_messages(ex.question, c) for ex, c in zip(qa, contexts)],
               "closed": [qa_messages(ex.question, None) for ex in qa]}
    runs = [("soft", reader_adapter), ("full", None), ("closed", None)]
    if reader_adapter:
        runs += [("full_reader", reader_adapter), ("closed_reader", reader_adapter)]
    out: dict[str, float] = {}
    n = max(len(qa), 1)
    for name, adapter in runs:
        answers = reader.generate_batch(prompts[name.replace("_reader", "")], adapter=adapter,
                                        max_new_tokens=max_new_tokens, batch_size=batch_size) if qa else []
        out[f"qa_{name}_em"] = sum(exact_match(a.text, ex.references) for a, ex in zip(answers, qa)) / n
        out[f"qa_{name}_f1"] = sum(f1_score(a.text, ex.references) for a, ex in zip(answers, qa)) / n
    gap = out["qa_full_f1"] - out["qa_closed_f1"]
    out["qa_normalised_f1"] = (out["qa_soft_f1"] - out["qa_closed_f1"]) / gap if gap > 0 else float("nan")
    if reader_adapter:
        gap = out["qa_full_reader_f1"] - out["qa_closed_reader_f1"]
        out["qa_normalised_f1_reader"] = (out["qa_soft_f1"] - out["qa_closed_reader_f1"]) / gap if gap > 0 else float("nan")
    out["qa_n"] = float(len(qa))
    return out


def squad_test_qa(backbone, data_dir, n: int, segment_length: int) -> list[QAExample]:
    """``n`` SQuAD test questions spread over the articles, each with a paragraph that fits one segment."""
    from .data import load_squad_qa

    pool = load_squad_qa(Path(data_dir) / "squad/test.json", segment_length, backbone.tokenize)
    if n >= len(pool):
        return pool
    step = len(pool) / n
    return [pool[int(i * step)] for i in range(n)]


def _with_ids(messages: Sequence[dict], ids: dict[str, str]) -> list[dict]:
    """``messages`` with each example-local placeholder ``cJ`` replaced by a store id's placeholder."""
    from ..generation import PLACEHOLDER_RE

    return [{**m, "content": PLACEHOLDER_RE.sub(lambda g: make_placeholder(ids[g.group(1)]), m["content"])} for m in messages]


@torch.no_grad()
def evaluate_query_path(compressor, examples: Sequence, *, max_new_tokens: int = 24, shuffled: bool = True,
                        base_lines: bool = False, batch_size: int = 8, progress: bool = False) -> dict[str, float]:
    """Answers to query-shaped examples (:mod:`.query_data`) through the query path, with the reader's own lines.

    The soft chunks are compressed into a :class:`SoftPromptStore` and read back through
    :class:`SoftPromptReader` (placeholders resolved by the store, the reader adapter on), exactly as a
    query reads them. Lines, all with the reader adapter: ``soft`` (the example's prompt), ``full`` (every
    chunk as text), ``closed`` (no context), and ``shuffled`` (another example's soft prompts: what the
    soft prompt carries about *this* question). ``base_lines`` adds ``full_base``/``closed_base`` (no adapter).
    ``qa_normalised_f1_reader = (soft - closed) / (full - closed)``: the share of the text's gain that the
    soft prompts deliver.
    """
    from .query_data import chunk_ref

    examples = list(examples)
    store = SoftPromptStore.for_compressor(compressor)
    reader = SoftPromptReader(compressor.backbone, store, compressor=compressor, adapter="auto")
    texts = sorted({ex.chunks[j] for ex in examples for j in ex.soft_chunks})
    id_of = dict(zip(texts, store.add(texts, compressor, progress=progress))) if texts else {}
    prompts: dict[str, list[dict]] = {}
    for ex in examples:
        prompts.setdefault("soft", []).append(_with_ids(ex.messages, {chunk_ref(j): id_of[ex.chunks[j]] for j in ex.soft_chunks}))
        prompts.setdefault("full", []).append(ex.teacher_messages)
        prompts.setdefault("closed", []).append(ex.closed_messages)
    if shuffled and len(examples) > 1:
        own = [[id_of[ex.chunks[j]] for j in ex.soft_chunks] for ex in examples]
        for ex, ids in zip(examples, shuffled_slots(own, list(id_of.values())[:1])):
            prompts.setdefault("shuffled", []).append(_with_ids(ex.messages, dict(zip(map(chunk_ref, ex.soft_chunks), ids))))
    runs = [(name, "auto") for name in prompts]
    if base_lines:
        runs += [("full_base", None), ("closed_base", None)]
    out: dict[str, float] = {}
    for name, adapter in runs:
        batch = prompts[name.replace("_base", "")]
        answers = reader.generate_batch(batch, adapter=adapter, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                        progress=f"eval {name}" if progress else False)
        out[f"qa_{name}_em"] = sum(exact_match(a.text, ex.answers) for a, ex in zip(answers, examples)) / len(examples)
        out[f"qa_{name}_f1"] = sum(f1_score(a.text, ex.answers) for a, ex in zip(answers, examples)) / len(examples)
        if name == "soft":
            out["soft_positions"] = sum(a.prompt.soft_positions for a in answers) / len(examples)
            out["positions"] = sum(a.prompt.positions for a in answers) / len(examples)
    gap = out["qa_full_f1"] - out["qa_closed_f1"]
    out["qa_normalised_f1_reader"] = (out["qa_soft_f1"] - out["qa_closed_f1"]) / gap if gap > 0 else float("nan")
    out["qa_n"] = float(len(examples))
    return out
