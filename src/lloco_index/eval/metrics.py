"""Answer metrics: SQuAD EM/F1, ROUGE-L, multiple-choice accuracy, and the normalised score.

All are plain functions over strings so they can be checked against known values:

>>> exact_match("The Eiffel Tower!", ["eiffel tower"])
1.0
>>> round(f1_score("in Paris, France", ["Paris"]), 3)
0.5
>>> round(rouge_l("the cat sat on the mat", ["the cat is on the mat"]), 3)
0.833
>>> extract_choice_letter("The answer is (C) because ...")
'C'
>>> normalized_score(system=0.6, closed_book=0.25, full_context=0.75)
0.7
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Optional, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1 normalisation: lowercase, drop punctuation and articles, squash spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _exact(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def _f1(prediction: str, truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(truth).split()
    common = Counter(pred_tokens) & Counter(truth_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """Max over references of normalised exact match (SQuAD's ``metric_max_over_ground_truths``)."""
    return max((_exact(prediction, r) for r in references), default=0.0)


def f1_score(prediction: str, references: Sequence[str]) -> float:
    """Max over references of the SQuAD token-overlap F1."""
    return max((_f1(prediction, r) for r in references), default=0.0)


# ----------------------------------------------------------------- ROUGE-L
_WORD = re.compile(r"[a-z0-9]+")


def _rouge_tokens(text: str) -> list[str]:
    # rouge-score's default tokenizer: lowercase, non-alphanumerics are separators, no stemming.
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a)*len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l_single(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) of one prediction against one reference."""
    pred, ref = _rouge_tokens(prediction), _rouge_tokens(reference)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Max ROUGE-L F over references (the usual multi-reference convention for QA)."""
    return max((rouge_l_single(prediction, r) for r in references), default=0.0)


# ------------------------------------------------------- multiple choice
_LETTER_PATTERNS = [
    re.compile(r"\(([A-D])\)"),  # "(C)"
    re.compile(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*:?\s*\(?([A-D])\b", re.IGNORECASE),
    re.compile(r"^\s*\(?([A-D])[\).:\s]", re.MULTILINE),  # "C) ...", "C. ...", "C ..."
    re.compile(r"^\s*([A-D])\s*$"),  # just "C"
]


def extract_choice_letter(text: str, letters: str = "ABCD") -> Optional[str]:
    """The option letter a generated answer commits to, as LLoCO scores QuALITY; ``None`` if none.

    Tries, in order: a parenthesised letter, "answer is X", a letter opening a line, a bare letter.
    """
    for pattern in _LETTER_PATTERNS:
        match = pattern.search(text)
        if match and match.group(1).upper() in letters:
            return match.group(1).upper()
    return None


def choice_accuracy(prediction: str, gold_letter: str) -> float:
    """1.0 when the generated text commits to the gold letter."""
    return float(extract_choice_letter(prediction) == gold_letter.upper())


def loglik_accuracy(option_scores: Sequence[float], gold_index: int) -> float:
    """1.0 when the gold option has the highest log-likelihood (ties go to the first)."""
    if not option_scores:
        return 0.0
    best = max(range(len(option_scores)), key=lambda i: option_scores[i])
    return float(best == gold_index)


def normalized_score(system: float, closed_book: float, full_context: float) -> Optional[float]:
    """(system − closed book) / (full context − closed book); ``None`` when full context is no better.

    With no headroom (the model does as well without the document) the ratio has no meaning, and
    a negative gap would flip its sign, so it is not reported rather than reported misleadingly.
    """
    gap = full_context - closed_book
    if gap <= 1e-12:
        return None
    return (system - closed_book) / gap


def score_prediction(task: str, prediction: str, *, answers: Sequence[str] = (), gold_letter: Optional[str] = None,
                     option_scores: Optional[Sequence[float]] = None, gold_index: Optional[int] = None) -> dict:
    """All metrics that apply to one prediction of a task type (``mc``, ``extractive``, ``abstractive``, ``needle``)."""
    if task == "mc":
        scores = {"accuracy": choice_accuracy(prediction, gold_letter or "")}
        if option_scores is not None and gold_index is not None:
            scores["accuracy_loglik"] = loglik_accuracy(option_scores, gold_index)
        return scores
    scores = {"em": exact_match(prediction, answers), "f1": f1_score(prediction, answers), "rouge_l": rouge_l(prediction, answers)}
    if task == "needle":
        # The needle answer is a sentence: count recall of its words, as NIAH graders do with a rubric.
        scores["recall"] = _recall(prediction, answers)
    return scores


def _recall(prediction: str, references: Sequence[str]) -> float:
    best = 0.0
    for ref in references:
        ref_tokens = normalize_answer(ref).split()
        if not ref_tokens:
            continue
        common = Counter(normalize_answer(prediction).split()) & Counter(ref_tokens)
        best = max(best, sum(common.values()) / len(ref_tokens))
    return best


PRIMARY_METRIC = {"mc": "accuracy", "extractive": "f1", "abstractive": "rouge_l", "needle": "recall"}
