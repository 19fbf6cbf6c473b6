"""One QA record for pretraining and finetuning: every file shape either wrote still loads."""

from __future__ import annotations

import json

import pytest

from lloco_index import finetune
from lloco_index.training.data import QAExample, context_text, load_qa_examples, load_qa_jsonl, write_qa_jsonl


def _lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_one_class_for_both_trainers():
    assert finetune.QAExample is QAExample and finetune.load_qa_examples is load_qa_examples


def test_files_of_the_older_pretraining_shape_load(tmp_path):
    # What `python -m lloco_index.training.distill` wrote: the teacher's answer first, the gold answers after it.
    path = _lines(tmp_path / "distill.jsonl", [
        {"context": "Rollo led the Norse raiders.", "question": "Who led them?", "answers": ["Rollo", "rollo"],
         "doc_id": "squad:Normans"}])
    [ex] = load_qa_jsonl(path)
    assert (ex.question, ex.answer, ex.references) == ("Who led them?", "Rollo", ["Rollo", "rollo"])
    assert ex.contexts == ["Rollo led the Norse raiders."] and ex.group == "squad:Normans"
    assert context_text(ex) == "Rollo led the Norse raiders."


def test_files_of_the_finetuning_question_cache_load(tmp_path):
    # What LLoCOFinetuneEngine cached as generated_questions.jsonl before write_qa_jsonl wrote it.
    record = {"question": "When?", "answer": "1901", "contexts": ["In 1901 ..."], "group": "d1", "id": "abc"}
    [ex] = load_qa_examples(_lines(tmp_path / "generated_questions.jsonl", [record]))
    assert ex == QAExample("When?", "1901", ["1901"], ["In 1901 ..."], "abc", "d1")


def test_write_and_read_back_keeps_every_field(tmp_path):
    examples = [QAExample("Who led them?", "Rollo", ["Rollo", "the Viking Rollo"], ["ctx a", "ctx b"], "q1", "doc"),
                QAExample("Unanswered?", contexts=["ctx"])]  # finetuning distils its answer later
    write_qa_jsonl(tmp_path / "qa.jsonl", examples)
    assert load_qa_jsonl(tmp_path / "qa.jsonl") == examples
    assert context_text(examples[0]) == "ctx a\n\nctx b"


def test_pretraining_refuses_qa_examples_without_answer_or_context(tmp_path):
    import tiny_models
    from helpers import pretrain_config
    from lloco_index.training.pretrain import pretrain

    write_qa_jsonl(tmp_path / "qa.jsonl", [QAExample("No context?", "yes")])
    config = pretrain_config(tmp_path / "run", objectives={"qa": 1.0}, qa_file=str(tmp_path / "qa.jsonl"))
    with pytest.raises(ValueError, match="needs an answer and a context for every example"):
        pretrain(config, backbone=tiny_models.tiny_backbone(0), windows=[], progress=False)
