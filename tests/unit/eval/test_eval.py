"""Tests of the evaluation harness: metrics against known values, loaders on fixtures, a quick-suite
smoke run on a tiny random LLaMA (seconds). Nothing here is timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lloco_index.eval import datasets as ds
from lloco_index.eval import metrics as m

# ------------------------------------------------------------------ metrics


def test_squad_normalisation_and_em():
    assert m.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert m.normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    assert m.exact_match("the Eiffel Tower.", ["Eiffel Tower", "Paris"]) == 1.0
    assert m.exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert m.exact_match("anything", []) == 0.0


def test_squad_f1_known_values():
    # precision 1/3, recall 1 -> 0.5
    assert m.f1_score("in Paris, France", ["Paris"]) == pytest.approx(0.5)
    # max over references
    assert m.f1_score("Denver Broncos", ["Broncos", "Denver Broncos"]) == pytest.approx(1.0)
    # two of three predicted tokens match a two-token reference: P=2/3, R=1 -> 0.8
    assert m.f1_score("the Denver Broncos won", ["Denver Broncos"]) == pytest.approx(0.8)
    assert m.f1_score("", ["x"]) == 0.0
    # repeated tokens count with multiplicity (Counter intersection)
    assert m.f1_score("a b b", ["b c"]) == pytest.approx(2 * 0.5 * 0.5 / 1.0)


def test_rouge_l_known_values():
    assert m.lcs_length("a b c d".split(), "a c d e".split()) == 3
    # LCS "the cat on the mat" = 5 of 6 tokens each way
    assert m.rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(5 / 6)
    assert m.rouge_l("Hello, world!", ["hello world"]) == pytest.approx(1.0)
    assert m.rouge_l("abc", ["xyz"]) == 0.0
    # P = 2/2, R = 2/4 -> F = 2/3
    assert m.rouge_l_single("police killed", "police killed the gunman") == pytest.approx(2 / 3)


def test_choice_letter_extraction_and_accuracy():
    assert m.extract_choice_letter("(C) He has a sense of duty") == "C"
    assert m.extract_choice_letter("The answer is B.") == "B"
    assert m.extract_choice_letter("D. Because it rained") == "D"
    assert m.extract_choice_letter("A") == "A"
    assert m.extract_choice_letter("I do not know") is None
    assert m.choice_accuracy("answer: (a)", "A") == 1.0
    assert m.loglik_accuracy([-3.0, -1.0, -2.0, -5.0], 1) == 1.0
    assert m.loglik_accuracy([-3.0, -1.0, -2.0, -5.0], 2) == 0.0


def test_normalized_score():
    assert m.normalized_score(0.6, 0.25, 0.75) == pytest.approx(0.7)
    assert m.normalized_score(0.25, 0.25, 0.75) == pytest.approx(0.0)
    assert m.normalized_score(0.5, 0.5, 0.5) is None  # full context no better than closed book
    assert m.normalized_score(0.1, 0.3, 0.2) is None  # ... or worse: a negative gap would flip the sign


def test_score_prediction_by_task():
    assert m.score_prediction("mc", "(B)", gold_letter="B", option_scores=[-2, -1, -3, -4], gold_index=1) == {
        "accuracy": 1.0, "accuracy_loglik": 1.0}
    out = m.score_prediction("needle", "Eat a sandwich in Dolores Park.", answers=[ds.NEEDLE_ANSWER])
    assert 0 < out["recall"] < 1 and set(out) >= {"em", "f1", "rouge_l"}


# ------------------------------------------------------------------ loaders


def _write_fixtures(root: Path) -> Path:
    (root / "squad").mkdir(parents=True)
    paragraphs = [
        {"context": "Alpha Centauri is the closest star system to the Sun. It lies 4.37 light-years away.",
         "qas": [{"id": "q1", "question": "What is the closest star system to the Sun?",
                  "answers": [{"text": "Alpha Centauri", "answer_start": 0}, {"text": "Alpha Centauri", "answer_start": 0}]}]},
        {"context": "Proxima Centauri b orbits within the habitable zone of its star.",
         "qas": [{"id": "q2", "question": "What orbits in the habitable zone?",
                  "answers": [{"text": "Proxima Centauri b", "answer_start": 0}]},
                 {"id": "q3", "question": "Unanswerable?", "answers": [], "is_impossible": True}]},
    ]
    (root / "squad" / "test.json").write_text(json.dumps({"version": "1.1", "data": [{"title": "Alpha_Centauri", "paragraphs": paragraphs}]}))
    (root / "quality").mkdir()
    story = " ".join(f"Sentence {i} of the story about the captain and the ship." for i in range(60))
    record = {"input": story, "instructions": [
        "Why does the Captain act?\n\n (A) Money\n (B) Love\n (C) Duty\n (D) Fear",
        "Where is the ship?\n\n (A) Mars\n (B) Venus\n (C) Earth\n (D) The Sun"],
        "outputs": ["(C) Duty", "(D) The Sun"], "source": "fixture", "evaluation": "exam"}
    (root / "quality" / "test.jsonl").write_text(json.dumps(record) + "\n")
    hay = root / "needle" / "paul_graham_essays"
    hay.mkdir(parents=True)
    for i in range(2):
        (hay / f"essay{i}.txt").write_text(" ".join(f"Essay {i} sentence {j} talks about startups and work." for j in range(120)))
    return root


class _WordTokenizer:
    """Whitespace 'tokenizer' with the two methods the needle generator uses."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split(" ")}

    def decode(self, ids):
        return " ".join(ids)


def test_load_quality_fixture(tmp_path):
    root = _write_fixtures(tmp_path)
    bench = ds.load_quality(root / "quality" / "test.jsonl")
    assert bench.task == "mc" and len(bench.documents) == 1 and len(bench.examples) == 2
    first = bench.examples[0]
    assert first.question == "Why does the Captain act?"
    assert first.options == ["Money", "Love", "Duty", "Fear"]
    assert first.gold_letter == "C" and first.gold_index == 2
    assert bench.examples[1].options[3] == "The Sun" and bench.examples[1].gold_letter == "D"
    assert len(ds.load_quality(root / "quality" / "test.jsonl", max_questions=1).examples) == 1


def test_load_squad_fixture(tmp_path):
    root = _write_fixtures(tmp_path)
    bench = ds.load_squad(root / "squad" / "test.json")
    assert [e.id for e in bench.examples] == ["squad-q1", "squad-q2"]  # the impossible one dropped
    assert bench.examples[0].answers == ["Alpha Centauri"]  # duplicates merged, order kept
    doc = bench.documents["squad-Alpha_Centauri"]
    assert "Alpha Centauri" in doc.text and "Proxima" in doc.text
    cut = ds.load_squad(root / "squad" / "test.json", max_document_words=16)
    assert [e.id for e in cut.examples] == ["squad-q1"] and "Proxima" not in cut.documents["squad-Alpha_Centauri"].text
    assert cut.notes and "first 1 of 2 paragraphs" in cut.notes[0]


def test_load_jsonl_fixture(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"document": "Doc one text.", "question": "Q1?", "answers": ["a"]},
            {"document": "Doc one text.", "question": "Q2?", "answers": "b"},
            {"document": "Doc two.", "question": "Q3?", "answers": ["c", "d"], "id": "x"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    bench = ds.load_jsonl_qa(path)
    assert len(bench.documents) == 2 and len(bench.examples) == 3
    assert bench.examples[1].answers == ["b"] and bench.examples[2].id == "x"
    assert bench.examples[0].document_id == bench.examples[1].document_id
    path.write_text(json.dumps({"document": "d", "question": "q"}) + "\n")
    with pytest.raises(ValueError, match="answers"):
        ds.load_jsonl_qa(path)


def test_needle_generator_depths_and_lengths(tmp_path):
    root = _write_fixtures(tmp_path)
    bench = ds.needle_in_a_haystack(root / "needle" / "paul_graham_essays", _WordTokenizer(),
                                    lengths=[100, 400], depths=[0.0, 0.5, 1.0])
    assert len(bench.examples) == 6
    start = bench.documents["needle-100-000"].text
    end = bench.documents["needle-100-100"].text
    middle = bench.documents["needle-400-050"].text
    assert start.startswith(ds.NEEDLE) and end.endswith(ds.NEEDLE)
    pos = middle.index(ds.NEEDLE) / len(middle)
    assert 0.3 < pos < 0.6
    assert abs(len(middle.split(" ")) - 400) <= 3
    with pytest.raises(ValueError, match="fewer than"):
        ds.needle_in_a_haystack(root / "needle" / "paul_graham_essays", _WordTokenizer(), lengths=[10**6], depths=[0.5])


def test_missing_data_file_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="data-dir"):
        ds.load_quality(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- smoke run


@pytest.fixture(scope="module")
def tiny_backbone():
    from tiny_models import tiny_backbone

    return tiny_backbone(special_tokens=False)


def test_quick_suite_smoke_on_tiny_model(tmp_path, tiny_backbone, monkeypatch):
    from lloco_index.eval.report import read_records
    from lloco_index.eval.runner import SuiteSpec, run_benchmark

    monkeypatch.setenv("LLMLINGUA_VENV", str(tmp_path / "no-such-venv"))  # the peer must be skipped visibly
    root = _write_fixtures(tmp_path / "data")
    out = tmp_path / "out"
    from lloco_index.eval.retrieval import load_embedder

    suite = SuiteSpec(squad=dict(max_documents=1, max_questions=1), quality=dict(max_documents=1, max_questions=1),
                      needle=dict(lengths=[2500], depths=[0.5]), max_new_tokens=4)
    kwargs = dict(data_dir=root, out_dir=out, compressors=["icae-untrained", "token_embedding"],
                  backbone=tiny_backbone, embedder=load_embedder(), top_k=2, tag="smoke", progress=False)
    summary = run_benchmark(suite, **kwargs)
    assert "llmlingua" in summary["skipped"] and "no llmlingua environment" in summary["skipped"]["llmlingua"]
    records = read_records(summary["results"])
    questions = [r for r in records if r["type"] == "question"]
    systems = {r["system"] for r in questions}
    assert systems == {"closed_book", "full_context", "rag", "lloco[icae-untrained]", "lloco[token_embedding]"}
    assert len(questions) == 3 * 5  # 1 squad + 1 quality + 1 needle, 5 systems
    by = {(r["example_id"], r["system"]): r for r in questions}
    long_needle = "needle-2500-050"
    assert by[(long_needle, "full_context")]["truncated"] is True  # 2,500 tokens do not fit a 2,048 window
    assert by[(long_needle, "full_context")]["positions"] <= 2048
    # Soft prompts: 32 slots per 256-token chunk, top-2 chunks -> far fewer positions than the full text.
    soft = by[(long_needle, "lloco[icae-untrained]")]
    assert soft["soft_positions"] == 64 and soft["positions"] < by[(long_needle, "rag")]["positions"]
    # The identity reference reads the same chunks as RAG, as embeddings: same positions and answer.
    ident, rag = by[(long_needle, "lloco[token_embedding]")], by[(long_needle, "rag")]
    assert ident["retrieved"] == rag["retrieved"] and ident["positions"] == rag["positions"]
    assert ident["prediction"] == rag["prediction"]
    for r in questions:
        lat = r["latency"]
        assert lat["total_s"] == pytest.approx(sum(v for k, v in lat.items() if k != "total_s"))
        assert r["memory"]["peak_rss_mb"] > 0 and "scores" in r
    mc = [r for r in questions if r["task"] == "mc"]
    assert all(len(r["option_scores"]) == 4 and "accuracy_loglik" in r["scores"] for r in mc)
    docs = [r for r in records if r["type"] == "document"]
    assert {d["compressor"] for d in docs} == {"icae-untrained", "token_embedding"}
    assert all(d["compress_s"] > 0 and d["store_bytes"] > 0 for d in docs)
    table = Path(summary["table"]).read_text()
    assert "Skipped `llmlingua`" in table and "UNTRAINED" in table and "break-even" in table
    assert any(p.endswith("needle-heatmap.png") for p in summary["plots"])
    # Resume: a second run finds everything done and appends no question record.
    again = run_benchmark(suite, **kwargs, report=False)
    assert sum(1 for r in read_records(again["results"]) if r["type"] == "question") == len(questions)




def _needle_run(tmp_path, tiny_backbone, monkeypatch, **kwargs) -> dict:
    """One needle (1,500 tokens, depth 0.5) through text RAG, soft prompts and ``hybrid1``, top-3."""
    from lloco_index.eval.retrieval import load_embedder
    from lloco_index.eval.runner import SuiteSpec, run_benchmark

    monkeypatch.setenv("LLMLINGUA_VENV", str(tmp_path / "no-such-venv"))
    root = _write_fixtures(tmp_path / "data")
    suite = SuiteSpec(squad=dict(max_documents=0, max_questions=0), quality=dict(max_documents=0, max_questions=0),
                      needle=dict(lengths=[1500], depths=[0.5]), max_new_tokens=4)
    return run_benchmark(suite, data_dir=root, out_dir=tmp_path / "out", systems=["rag", "lloco"], datasets=["needle"],
                         backbone=tiny_backbone, embedder=load_embedder(), top_k=3, progress=False, expand_top_k=[1],
                         **kwargs)


def test_hybrid_system_expands_the_best_chunk_and_keeps_reading_order(tmp_path, tiny_backbone, monkeypatch):
    from lloco_index.eval.report import read_records

    summary = _needle_run(tmp_path, tiny_backbone, monkeypatch, compressors=["token_embedding"], tag="hybrid")
    by = {r["system"]: r for r in read_records(summary["results"]) if r["type"] == "question"}
    hybrid, rag, soft = by["hybrid1[token_embedding]"], by["rag"], by["lloco[token_embedding]"]
    assert hybrid["retrieved"] == rag["retrieved"] == soft["retrieved"]  # reading order unchanged
    assert len(hybrid["expanded"]) == 1 and hybrid["expanded"][0] in hybrid["retrieved"]
    # The identity compressor's soft prompts are the chunks' own token embeddings: expanding one changes the
    # positions only where its first token merges with the separator before it.
    assert abs(hybrid["positions"] - rag["positions"]) <= 1
    assert hybrid["soft_positions"] < soft["soft_positions"]


# ------------------------------------------------- text baselines at equal positions


class _WordTokenizer:
    """One token per whitespace-separated word: budgets in tests can be counted by eye."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [hash(w) % 1000 for w in text.split()]}

    def decode(self, ids):
        return " ".join("w" for _ in ids)


def test_fill_text_budget_keeps_best_chunks_whole_and_cuts_only_the_last():
    from lloco_index.eval.systems import fill_text_budget

    tok = _WordTokenizer()  # the separator "\n\n" is no word: 0 tokens
    chunks = [(2, "a " * 10), (0, "b " * 6), (5, "c " * 8)]  # best score first
    cut = fill_text_budget(tok, chunks, 13)
    assert cut.chunks == [0, 2] and cut.whole == [2]  # document order; chunk 0 cut to the 3 tokens left
    assert cut.kept_tokens == 13 and cut.budget == 13
    whole = fill_text_budget(tok, chunks, 16)
    assert whole.chunks == [0, 2] and whole.whole == [0, 2] and whole.kept_tokens == 16
    assert fill_text_budget(tok, chunks, 100).whole == [0, 2, 5]
    assert fill_text_budget(tok, chunks, 0).chunks == [] and fill_text_budget(tok, chunks, 0).text == ""
    with pytest.raises(ValueError, match="budget must be >= 0"):
        fill_text_budget(tok, chunks, -1)


def test_fill_text_budget_never_exceeds_the_budget_with_a_real_tokenizer():
    from lloco_index.eval.systems import fill_text_budget
    from lloco_index.models import load_decoder

    tok = load_decoder().tokenizer
    chunks = [(1, "The lighthouse keeper, Mr. O'Brien, lit 2,000 lamps."), (0, "Sostratus of Cnidus built the Pharos.")]
    for budget in range(0, 30, 3):
        cut = fill_text_budget(tok, chunks, budget)
        assert cut.kept_tokens <= budget
        assert len(tok(cut.text, add_special_tokens=False)["input_ids"]) == cut.kept_tokens


class _Compressor:
    def __init__(self, reader):
        self.reader_adapter = reader
        self.fingerprint = "fp"


def test_plan_has_same_reader_text_systems_and_cut_baselines_after_the_hybrids():
    from lloco_index.eval.runner import CompressorEntry, build_plan

    entries = [CompressorEntry("icae:c", _Compressor("reader"))]
    plan = build_plan(["closed_book", "full_context", "rag", "lloco"], entries, expand_top_k=[1, 2], rag_top_k=[1],
                      rag_cut=True, same_reader=True)
    names = [s.name for s in plan]
    assert names == ["closed_book+reader", "full_context+reader", "rag+reader", "rag_top1+reader", "lloco[icae:c]",
                     "hybrid1[icae:c]", "hybrid2[icae:c]", "rag_cut1+reader", "rag_cut2+reader"]
    by = {s.name: s for s in plan}
    assert by["rag_top1+reader"].top_k == 1 and by["rag+reader"].top_k is None
    assert by["rag_cut2+reader"].cut_to is by["hybrid2[icae:c]"]
    assert all(s.text_reader is entries[0] for s in plan if s.kind != "lloco")
    plain = [s.name for s in build_plan(["rag", "lloco"], entries, expand_top_k=[1], rag_cut=True)]
    assert plain == ["rag", "lloco[icae:c]", "hybrid1[icae:c]", "rag_cut1"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(systems=["rag"], rag_cut=True), "--rag-cut cuts text RAG"),
    (dict(systems=["rag", "lloco"], rag_cut=True), "at least one --expand-top-k"),
    (dict(systems=["lloco"], rag_top_k=[1]), "add rag to --systems"),
    (dict(systems=["rag"], rag_top_k=[0]), "whole numbers >= 1"),
    (dict(systems=["rag", "lloco"], expand_top_k=[-1]), "whole numbers >= 1"),
    (dict(systems=["rag"], same_reader=True, reader=None), "ships no reader adapter"),
])
def test_plan_refuses_what_it_cannot_run(kwargs, message):
    from lloco_index.eval.runner import CompressorEntry, build_plan

    entries = [CompressorEntry("c", _Compressor(kwargs.pop("reader", "reader")))]
    systems = kwargs.pop("systems")
    with pytest.raises(ValueError, match=message):
        build_plan(systems, entries, **kwargs)


def test_rag_cut_reads_the_hybrids_positions_and_rag_top1_one_chunk(tmp_path, tiny_backbone, monkeypatch):
    from lloco_index.eval.report import read_records

    summary = _needle_run(tmp_path, tiny_backbone, monkeypatch, compressors=["icae-untrained"], tag="cut",
                          rag_top_k=[1], rag_cut=True)
    by = {r["system"]: r for r in read_records(summary["results"]) if r["type"] == "question"}
    hybrid, cut, top1 = by["hybrid1[icae-untrained]"], by["rag_cut1"], by["rag_top1"]
    assert len(top1["retrieved"]) == 1 and len(by["rag"]["retrieved"]) == 3
    assert cut["cut_to"]["system"] == "hybrid1[icae-untrained]" and cut["cut_to"]["positions"] == hybrid["positions"]
    # Same positions as the hybrid, give or take a token merged at the template's join; all of them text.
    assert abs(cut["positions"] - hybrid["positions"]) <= 2 and cut["soft_positions"] == 0
    assert hybrid["soft_positions"] > 0 and cut["positions"] < by["rag"]["positions"]


def test_needle_recall_by_length_averages_the_depths_of_each_length():
    from lloco_index.eval.report import needle_by_length

    def q(system, length, recall):
        return {"task": "needle", "system": system, "metadata": {"length": length, "depth": 0.5}, "scores": {"recall": recall}}

    rows = needle_by_length([q("a", 1024, 1.0), q("a", 1024, 0.0), q("a", 4096, 0.5), q("b", 1024, 1.0),
                             {"task": "extractive", "system": "a", "metadata": {}, "scores": {}}])
    assert rows == {"a": {1024: (0.5, 2), 4096: (0.5, 1)}, "b": {1024: (1.0, 1)}}
