"""The selection policy: which retrieved chunks the decoder reads, and in which form.

Every chunk is compressed offline; at query time the retriever's scored chunks
pass through :func:`select`, one implementation for LlamaIndex, LangChain, the
CLI, the demo, the benchmarks and the finetune data builder:

1. one chunk per soft-prompt id (a document ingested twice is read once),
   best score first, at most ``top_k``;
2. **selective expansion** (REFRAG): the ``expand_top_k`` chunks the expansion
   policy ranks first go in as their *text*, while their text fits
   ``text_budget``; a small compressor's soft prompt carries a chunk's topic
   more than its exact names and numbers, so the chunks that most likely hold
   the answer are the ones worth their full length. The policy
   (:func:`expansion_scores`) is ``score`` (the retriever's ranking),
   ``lexical`` (BM25 of the question's words over the retrieved chunks' text,
   the default: a dense retriever finds the topic, the question's rare words
   find the sentence that answers it) or ``likelihood`` (the decoder's);
3. the others go in as soft prompts while the total fits ``position_budget``;
4. reading order: documents by their best score, chunks by position, as LLoCO
   feeds its summaries.

Every cost is what the chunk really takes in the decoder: a soft prompt's
stored length, or the text's token count under the decoder's tokenizer.

Documented fallbacks, never a silently cut chunk: ``expand_top_k`` larger
than what was retrieved expands all of it; a chunk whose text is over the text
budget (or unknown) stays a soft prompt; a chunk whose soft prompt is missing
from the store is read as text when its text is known, else refused
(:class:`~lloco_index.errors.UnknownPlaceholderError`).

>>> picked = select(candidates, SelectionConfig(top_k=4, expand_top_k=1))
>>> [(s.candidate.id, s.expanded) for s in picked]
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

from . import defaults
from .errors import UnknownPlaceholderError

POLICIES = ("score", "lexical", "likelihood")


@dataclass(frozen=True)
class SelectionConfig:
    """How many chunks, how many of them as text, and the budgets (in decoder positions)."""

    top_k: Optional[int] = defaults.DEFAULT_TOP_K  # chunks kept (None: every retrieved chunk)
    position_budget: Optional[int] = defaults.DEFAULT_POSITION_BUDGET  # text + soft positions of the context
    expand_top_k: int = defaults.DEFAULT_EXPAND_TOP_K  # chunks read as text (0: pure soft prompts)
    text_budget: Optional[int] = defaults.DEFAULT_TEXT_BUDGET  # positions of expanded text (None: no limit)
    policy: str = defaults.DEFAULT_EXPANSION_POLICY  # which chunks to expand: one of POLICIES

    def __post_init__(self) -> None:
        for name in ("top_k", "position_budget", "text_budget"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be a whole number >= 0 or None, got {value!r}.")
        if self.position_budget is not None and self.position_budget < 1:
            # 0 positions leave room for no chunk: every answer would come without context ("Empty Response").
            raise ValueError(f"position_budget must be at least 1 (None: no limit), got {self.position_budget}: a "
                             f"budget of 0 positions leaves room for no chunk.")
        if not isinstance(self.expand_top_k, int) or isinstance(self.expand_top_k, bool) or self.expand_top_k < 0:
            raise ValueError(f"expand_top_k must be a whole number >= 0 (0 reads only soft prompts), got "
                             f"{self.expand_top_k!r}.")
        if self.policy not in POLICIES:
            raise ValueError(f"Unknown expansion policy {self.policy!r}: use one of {', '.join(POLICIES)}.")

    def with_overrides(self, **overrides: Any) -> "SelectionConfig":
        """A copy with the given fields replaced (``None`` values leave a field as it is)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class Candidate:
    """One retrieved chunk, framework-neutral; ``item`` carries the framework's own object through."""

    id: str  # the soft-prompt id (or another stable key for chunks that were never compressed)
    doc_id: str
    chunk: int  # position within its document
    score: float
    soft_positions: Optional[int]  # positions of its soft prompt; None: no soft prompt in the store
    text_positions: Optional[int]  # positions of its text; None: the text is not available
    item: Any = None
    text: Optional[str] = None  # the chunk's text, for the lexical policy (None: ranked last by it)


@dataclass
class Selection:
    candidate: Candidate
    expanded: bool  # True: read as text; False: read as its soft prompt

    @property
    def positions(self) -> int:
        c = self.candidate
        return int(c.text_positions if self.expanded else c.soft_positions)


def select(candidates: Sequence[Candidate], config: SelectionConfig = SelectionConfig(), *,
           expansion_scores: Optional[Sequence[float]] = None) -> list[Selection]:
    """Apply the policy to retrieved chunks; returns them in reading order with their form.

    ``expansion_scores`` (one per candidate, higher = expand first) replace the retriever's scores for the
    expansion ranking only, e.g. :func:`likelihood_scores` for the query-aware policy.
    """
    rank_of = {id(c): s for c, s in zip(candidates, expansion_scores)} if expansion_scores is not None else None
    seen: set[str] = set()
    unique: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: -(c.score or 0.0)):
        if c.id not in seen:
            seen.add(c.id)
            unique.append(c)
    if config.top_k is not None:
        unique = unique[:config.top_k]

    # Expansion first: the chunks worth their text claim their positions before the soft prompts do.
    by_expansion = sorted(unique, key=lambda c: -rank_of[id(c)]) if rank_of is not None else unique
    expanded: set[int] = set()
    n_chosen = text_used = total = 0
    for c in by_expansion:
        if n_chosen >= config.expand_top_k and c.soft_positions is not None:
            continue
        cost = c.text_positions
        fits_text = cost is not None and (config.text_budget is None or text_used + cost <= config.text_budget)
        fits_total = cost is not None and (config.position_budget is None or total + cost <= config.position_budget)
        if c.soft_positions is None:  # no soft prompt: text or nothing
            if cost is None:
                raise UnknownPlaceholderError(
                    f"Chunk {c.chunk} of document '{c.doc_id}' (id '{c.id}') has neither a soft prompt in the store "
                    f"nor its text: compress that document again (or restore its docstore entry)."
                )
            if fits_total:
                expanded.add(id(c))
                total += cost
            continue
        if fits_text and fits_total:
            expanded.add(id(c))
            n_chosen += 1
            text_used += cost
            total += cost

    kept: list[Selection] = []
    for c in unique:  # best score first
        if id(c) in expanded:
            kept.append(Selection(c, True))
        elif c.soft_positions is not None and (config.position_budget is None
                                               or total + c.soft_positions <= config.position_budget):
            kept.append(Selection(c, False))
            total += c.soft_positions
    doc_rank: dict[str, int] = {}
    for s in kept:  # best-first, so the first sighting is the document's best score
        doc_rank.setdefault(s.candidate.doc_id, len(doc_rank))
    kept.sort(key=lambda s: (doc_rank[s.candidate.doc_id], s.candidate.chunk))
    return kept


def expansion_scores(policy: str, question: Optional[str], candidates: Sequence[Candidate], *,
                     reader: Any = None) -> Optional[list[float]]:
    """The expansion ranking ``policy`` gives ``candidates`` for ``question`` (higher = expand first), for
    :func:`select`'s ``expansion_scores``; ``None`` for ``score`` (the retriever's order) or without a question.
    ``likelihood`` needs the :class:`~lloco_index.generation.SoftPromptReader`."""
    if policy not in POLICIES:
        raise ValueError(f"Unknown expansion policy {policy!r}: use one of {', '.join(POLICIES)}.")
    if policy == "score" or not question:
        return None
    if policy == "lexical":
        return lexical_scores(question, candidates)
    if reader is None:
        raise ValueError("The 'likelihood' expansion policy ranks chunks with the decoder: pass the reader.")
    return likelihood_scores(reader, question, candidates)


# Words that carry no evidence of where an answer is (question words, articles, auxiliaries).
_STOPWORDS = frozenset("""a an the of to in on at for by with from and or is are was were be been being what which
who whom whose when where why how does do did has have had it its this that these those as into than then there
their they he she his her him i you we our your not no can could would should will shall may might also about
after before over under between during""".split())
_BM25_K1, _BM25_B = 1.2, 0.75  # the usual BM25 constants


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOPWORDS]


def lexical_scores(question: str, candidates: Sequence[Candidate]) -> list[float]:
    """BM25 of the question's words in each candidate's text, with document frequencies over the candidates
    themselves: among chunks the retriever already found on topic, the one that shares the question's rarest
    words is the one most likely to hold the answer. No model; candidates without text score -inf."""
    docs = [_words(c.text) if c.text else None for c in candidates]
    present = [d for d in docs if d is not None]
    if not present:
        return [float("-inf")] * len(candidates)
    mean_len = max(1.0, sum(map(len, present)) / len(present))
    df = Counter(w for d in present for w in set(d))
    terms = set(_words(question))
    scores = []
    for d in docs:
        if d is None:
            scores.append(float("-inf"))
            continue
        tf, norm = Counter(d), _BM25_K1 * (1 - _BM25_B + _BM25_B * len(d) / mean_len)
        scores.append(sum(math.log(1 + (len(present) - df[w] + 0.5) / (df[w] + 0.5)) * tf[w] * (_BM25_K1 + 1)
                          / (tf[w] + norm) for w in terms if tf[w]))
    return scores


def likelihood_scores(reader, question: str, candidates: Sequence[Candidate]) -> list[float]:
    """The query-aware expansion ranking: the decoder's mean log-likelihood of the question after each
    chunk's soft prompt (how well the compressed chunk "predicts" the question). One short forward
    pass per candidate; no model beyond the decoder."""
    return [reader.question_loglik(question, c.id) if c.soft_positions is not None else float("-inf")
            for c in candidates]


def selection_counts(selected: Sequence[Selection]) -> dict[str, int]:
    """Positions and chunk counts by form, for logs and benchmark records."""
    text = [s for s in selected if s.expanded]
    soft = [s for s in selected if not s.expanded]
    return {"chunks_text": len(text), "chunks_soft": len(soft), "text_positions": sum(s.positions for s in text),
            "soft_positions": sum(s.positions for s in soft)}

