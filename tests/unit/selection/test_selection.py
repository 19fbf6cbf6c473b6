"""The framework-free selection policy: dedupe, selective expansion, budgets, reading order."""

from __future__ import annotations

import pytest

from lloco_index.errors import UnknownPlaceholderError
from lloco_index.selection import (
    Candidate,
    SelectionConfig,
    expansion_scores,
    lexical_scores,
    select,
    selection_counts,
)


def _c(pid, doc, chunk, score, soft=32, text=250):
    return Candidate(pid, doc, chunk, score, soft, text)


CANDIDATES = [_c("a", "d1", 3, 0.9), _c("b", "d1", 1, 0.8, text=260), _c("c", "d2", 0, 0.7),
              _c("a", "d1", 3, 0.6), _c("e", "d2", 5, 0.5)]


def _form(picked):
    return [(s.candidate.id, s.expanded) for s in picked]


@pytest.mark.parametrize("k, expected", [
    (0, [("b", False), ("a", False), ("c", False), ("e", False)]),
    (1, [("b", False), ("a", True), ("c", False), ("e", False)]),
    (2, [("b", True), ("a", True), ("c", False), ("e", False)]),
    (9, [("b", True), ("a", True), ("c", True), ("e", True)]),  # more than retrieved: all of it
])
def test_expands_the_best_scored_chunks_in_reading_order(k, expected):
    assert _form(select(CANDIDATES, SelectionConfig(top_k=4, expand_top_k=k, position_budget=None))) == expected


def test_every_position_is_counted_as_its_form_costs():
    picked = select(CANDIDATES, SelectionConfig(top_k=4, expand_top_k=1, position_budget=None))
    assert selection_counts(picked) == {"chunks_text": 1, "chunks_soft": 3, "text_positions": 250, "soft_positions": 96}


def test_text_budget_keeps_a_chunk_that_does_not_fit_as_its_soft_prompt():
    picked = select(CANDIDATES, SelectionConfig(top_k=4, expand_top_k=2, text_budget=300, position_budget=None))
    assert _form(picked) == [("b", False), ("a", True), ("c", False), ("e", False)]
    # A budget smaller than any chunk expands nothing (documented fallback), never a cut chunk.
    assert not any(s.expanded for s in select(CANDIDATES, SelectionConfig(expand_top_k=2, text_budget=10)))


def test_position_budget_covers_text_and_soft_prompts():
    picked = select(CANDIDATES, SelectionConfig(top_k=4, expand_top_k=1, position_budget=250 + 64))
    assert _form(picked) == [("b", False), ("a", True), ("c", False)]


def test_query_aware_scores_rank_the_expansion_only():
    scores = [0.0, 0.0, 5.0, 0.0, 0.0]  # the decoder prefers "c"
    picked = select(CANDIDATES, SelectionConfig(top_k=4, expand_top_k=1, position_budget=None), expansion_scores=scores)
    assert _form(picked) == [("b", False), ("a", False), ("c", True), ("e", False)]


def test_missing_soft_prompt_is_read_as_text_or_refused():
    gone = [_c("x", "d1", 0, 0.9, soft=None), _c("y", "d1", 1, 0.8)]
    assert _form(select(gone, SelectionConfig(expand_top_k=0))) == [("x", True), ("y", False)]
    with pytest.raises(UnknownPlaceholderError, match="neither a soft prompt in the store nor its text"):
        select([_c("z", "d1", 0, 0.9, soft=None, text=None)], SelectionConfig())
    # A chunk whose text was dropped from the docstore stays a soft prompt.
    assert _form(select([_c("w", "d1", 0, 0.9, text=None)], SelectionConfig(expand_top_k=1))) == [("w", False)]


@pytest.mark.parametrize("field, value", [("expand_top_k", -1), ("top_k", -2), ("text_budget", -5),
                                          ("position_budget", 1.5), ("expand_top_k", True)])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SelectionConfig(**{field: value})


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="score, lexical, likelihood"):
        SelectionConfig(policy="random")


# ----------------------------------------------------------------------- the expansion policies
def _t(pid, chunk, score, text):
    return Candidate(pid, "d1", chunk, score, 32, 250, text=text)


LEXICAL = [
    _t("topic", 0, 0.9, "Lighthouses guide ships along the coast; the keepers lived in the towers."),
    _t("answer", 1, 0.8, "Grace Darling, the keeper's daughter, rowed to the Forfarshire wreck in 1838."),
    _t("other", 2, 0.7, "The coast has many lighthouses and many towers."),
]


def test_lexical_policy_expands_the_chunk_with_the_questions_rare_words():
    question = "Who rowed to the Forfarshire wreck?"
    scores = expansion_scores("lexical", question, LEXICAL)
    assert scores == lexical_scores(question, LEXICAL) and scores[1] > 0 == scores[0] == scores[2]
    picked = select(LEXICAL, SelectionConfig(expand_top_k=1, position_budget=None), expansion_scores=scores)
    assert _form(picked) == [("topic", False), ("answer", True), ("other", False)]  # reading order kept
    # The retriever's own order would have expanded the best-scored topic chunk.
    assert _form(select(LEXICAL, SelectionConfig(expand_top_k=1, position_budget=None)))[0] == ("topic", True)


def test_lexical_weights_a_word_every_chunk_shares_below_a_rare_one():
    scores = lexical_scores("Which towers did the keepers of the coast live in?", LEXICAL)
    # "keepers" appears in one chunk only, "coast"/"towers" in two: the one with the rare word wins.
    assert scores[0] > scores[2] > scores[1] == 0


def test_lexical_ranks_chunks_without_text_last_and_ties_keep_the_retrievers_order():
    no_text = [_t("a", 0, 0.9, None), _t("b", 1, 0.8, "nothing in common"), _t("c", 2, 0.7, "nothing here")]
    scores = lexical_scores("Forfarshire?", no_text)
    assert scores[0] == float("-inf") and scores[1] == scores[2] == 0
    picked = select(no_text, SelectionConfig(expand_top_k=1, position_budget=None), expansion_scores=scores)
    assert [s.candidate.id for s in picked if s.expanded] == ["b"]  # a tie: the better-scored of the two


def test_expansion_scores_dispatch():
    assert expansion_scores("score", "Who?", LEXICAL) is None
    assert expansion_scores("lexical", None, LEXICAL) is None  # no question: the retriever's order
    with pytest.raises(ValueError, match="pass the reader"):
        expansion_scores("likelihood", "Who?", LEXICAL)
    with pytest.raises(ValueError, match="Unknown expansion policy 'bm42'"):
        expansion_scores("bm42", "Who?", LEXICAL)
