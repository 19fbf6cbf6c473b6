"""How each benchmarked system turns (document, question) into a timed, scored answer.

Every system reads through the same :class:`~lloco_index.generation.SoftPromptReader` on the same
decoder, with the same prompt template, so the only difference between systems is what fills the
context slot: nothing (closed book), the document text (full context, cut to the window), retrieved
chunk text (text RAG), LLMLingua's compression of that text, or the chunks' soft prompts (lloco).

>>> messages = build_messages(example, context="...retrieved text...")
>>> out = timed_generate(reader, messages, adapter=None, max_new_tokens=64)
>>> out["prediction"], out["prefill_s"], out["positions"]
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..generation import PreparedPrompt, SoftPromptReader
from .datasets import LETTERS, Example

SYSTEM_CLOSED_BOOK = "closed_book"
SYSTEM_FULL = "full_context"
SYSTEM_RAG = "rag"
SYSTEM_LLMLINGUA = "llmlingua"
SYSTEM_LLOCO = "lloco"
BASE_SYSTEMS = (SYSTEM_CLOSED_BOOK, SYSTEM_FULL, SYSTEM_RAG, SYSTEM_LLMLINGUA, SYSTEM_LLOCO)
READER_SUFFIX = "+reader"  # a text system that reads with the compressor's reader adapter, as the lloco systems do

_ANSWER_INSTRUCTIONS = {
    "mc": "Answer with the letter of the correct option: A, B, C or D.",
    "extractive": "Answer with a short phrase taken from the text.",
    "needle": "Answer in one sentence.",
    "abstractive": "Answer in a few sentences.",
}
CHUNK_SEPARATOR = "\n\n"


def question_block(example: Example) -> str:
    lines = [f"Question: {example.question}"]
    if example.options:
        lines += [f"({LETTERS[i]}) {opt}" for i, opt in enumerate(example.options)]
    lines.append(_ANSWER_INSTRUCTIONS.get(example.task, _ANSWER_INSTRUCTIONS["extractive"]))
    return "\n".join(lines)


def build_messages(example: Example, context: Optional[str]) -> list[dict]:
    """The one prompt template of a run; ``context=None`` is the closed-book variant."""
    if context is None:
        content = f"Answer the question.\n\n{question_block(example)}"
    else:
        content = f"Read the text below and answer the question.\n\nText:\n{context}\n\n{question_block(example)}"
    return [{"role": "user", "content": content}]


def option_texts(example: Example) -> list[str]:
    """Options as the model would write them after the template's instruction: ``"(C) text"``."""
    return [f"({LETTERS[i]}) {opt}" for i, opt in enumerate(example.options)]


# ------------------------------------------------------------------ memory
class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every ``interval`` s).

    Torch allocations bypass tracemalloc, so RSS is what shows a long prefill's activations and KV
    cache on CPU; on CUDA the allocator's own peak is recorded as well.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_bytes = 0
        self.start_bytes = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.cuda_peak_bytes: Optional[int] = None

    @staticmethod
    def rss() -> int:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start_bytes = self.peak_bytes = self.rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.rss())
        if torch.cuda.is_available():
            self.cuda_peak_bytes = int(torch.cuda.max_memory_allocated())

    def as_record(self) -> dict:
        out = {"peak_rss_mb": self.peak_bytes / 2**20, "rss_growth_mb": (self.peak_bytes - self.start_bytes) / 2**20}
        if self.cuda_peak_bytes is not None:
            out["cuda_peak_mb"] = self.cuda_peak_bytes / 2**20
        return out


# -------------------------------------------------------------- generation
class _FirstTokenClock:
    """A stopping criterion that never stops; it notes when generate() has produced its first token."""

    def __init__(self) -> None:
        self.first: Optional[float] = None

    def __call__(self, input_ids, scores, **kwargs):
        if self.first is None:
            self.first = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _StopAtLineEnd:
    """Stop once the answer has text and a token brings a line break (short-answer tasks, as QA harnesses do).

    Small instruct models append explanations after the answer; without this the decode time
    measures rambling, the same for every system, and drowns the differences in prefill.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.has_text = False

    def __call__(self, input_ids, scores, **kwargs):
        piece = self.tokenizer.decode(input_ids[0, -1:])
        stop = self.has_text and "\n" in piece
        self.has_text = self.has_text or bool(piece.strip())
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def timed_generate(reader: SoftPromptReader, messages: Sequence[dict], *, adapter: Optional[str],
                   max_new_tokens: int, stop_at_line_end: bool = False) -> tuple[dict, PreparedPrompt]:
    """Greedy answer with the latency split: assemble (template + embeddings), prefill (to the first token), decode.

    ``stop_at_line_end`` ends the answer at its first line break (short-answer tasks).
    """
    start = time.perf_counter()
    prepared = reader.prepare(messages, max_new_tokens=max_new_tokens)
    assembled = time.perf_counter()
    clock = _FirstTokenClock()
    criteria = [clock] + ([_StopAtLineEnd(reader.backbone.tokenizer)] if stop_at_line_end else [])
    result = reader.generate_prepared(prepared, adapter=adapter, max_new_tokens=max_new_tokens, stopping_criteria=criteria)
    if reader.backbone.device.type == "cuda":
        torch.cuda.synchronize()
    done = time.perf_counter()
    first = clock.first or done
    return {
        "prediction": result.text,
        "positions": prepared.positions,
        "text_positions": prepared.text_positions,
        "soft_positions": prepared.soft_positions,
        "new_tokens": result.new_tokens,
        "assemble_s": assembled - start,
        "prefill_s": first - assembled,
        "decode_s": done - first,
    }, prepared


@dataclass
class FullContextPlan:
    """The document text the full-context system reads, and whether it had to be cut."""

    text: str
    document_tokens: int
    kept_tokens: int

    @property
    def truncated(self) -> bool:
        return self.kept_tokens < self.document_tokens


def _cut_text(tok, ids: list[int], kept: int, room: int, step: int = 16) -> tuple[str, int]:
    """``ids[:kept]`` as text, shrunk by ``step`` tokens until it re-encodes to at most ``room`` tokens (a cut
    can merge differently)."""
    text = tok.decode(ids[:kept])
    while kept > 0 and len(tok(text, add_special_tokens=False)["input_ids"]) > room:
        kept = max(kept - step, 0)
        text = tok.decode(ids[:kept])
    return text, kept


@dataclass
class BudgetedText:
    """Retrieved chunks' text filled into a fixed number of positions (the text-RAG-at-equal-positions baseline)."""

    text: str
    chunks: list[int]  # chunk rows kept, in document order
    whole: list[int]  # the rows kept whole (the others in ``chunks`` were cut to their first tokens)
    budget: int  # context tokens allowed
    kept_tokens: int  # context tokens used (re-encoded)


def fill_text_budget(tok, chunks_by_score: Sequence[tuple[int, str]], budget: int, separator: str = CHUNK_SEPARATOR) -> BudgetedText:
    """Fill ``budget`` tokens with the best chunks' text: whole chunks best score first, the first that does not
    fit cut to the tokens left, the rest dropped; the kept pieces are then joined in document order, as text
    RAG reads them. A baseline only: the selection policy never cuts a chunk.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0 tokens, got {budget}.")
    sep = len(tok(separator, add_special_tokens=False)["input_ids"])
    used, pieces, whole = 0, {}, []
    for row, text in chunks_by_score:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        room = budget - used - (sep if pieces else 0)
        if room <= 0:
            break
        if len(ids) <= room:
            pieces[row] = text
            whole.append(row)
            used += len(ids) + (sep if len(pieces) > 1 else 0)
            continue
        pieces[row], kept = _cut_text(tok, ids, room, room, step=1)  # a chunk's worth: exact is cheap
        if kept == 0:
            del pieces[row]
        break
    order = sorted(pieces)

    def join() -> str:
        return separator.join(pieces[r] for r in order)

    text = join()
    # Joining can merge tokens across a separator; trim the cut piece (else the last one) until the whole fits.
    while order and len(tok(text, add_special_tokens=False)["input_ids"]) > budget:
        victim = next((r for r in order if r not in whole), order[-1])
        ids = tok(pieces[victim], add_special_tokens=False)["input_ids"]
        if victim in whole:
            whole.remove(victim)
        if len(ids) <= 1:
            del pieces[victim]
            order.remove(victim)
        else:
            pieces[victim] = tok.decode(ids[:-1])
        text = join()
    kept_tokens = len(tok(text, add_special_tokens=False)["input_ids"]) if order else 0
    return BudgetedText(text, order, [r for r in order if r in whole], budget, kept_tokens)


def plan_full_context(reader: SoftPromptReader, example: Example, document_text: str, *, max_new_tokens: int) -> FullContextPlan:
    """Fit the document into the window: keep its first tokens when template + document + answer do not fit.

    Keeping the beginning is the plainest policy (and the one that loses a late needle, which the
    heatmap then shows); the record says how many tokens were kept.
    """
    tok = reader.backbone.tokenizer
    ids = tok(document_text, add_special_tokens=False)["input_ids"]
    overhead = reader.count_positions(reader.render(build_messages(example, "")))
    option_room = max((len(reader.text_ids(o)) for o in option_texts(example)), default=0)
    room = reader.backbone.context_window - max_new_tokens - overhead - option_room - 8  # 8: join slack
    if len(ids) <= room:
        return FullContextPlan(document_text, len(ids), len(ids))
    # Decoding and re-encoding can grow by a token or two at the cut; _cut_text shrinks until it fits.
    text, kept = _cut_text(tok, ids, max(room, 0), room)
    return FullContextPlan(text, len(ids), kept)
