"""The quick-start demo end to end on a tiny decoder: it indexes the sample corpus once, answers each
question in hybrid and soft-prompt mode and from the whole document, and reports what each read."""

from __future__ import annotations

from lloco_index import demo
from lloco_index.compressors import ICAECompressor, ICAEConfig

from tiny_models import tiny_backbone


def test_demo_answers_every_question_and_reuses_its_index(tmp_path):
    compressor = ICAECompressor(tiny_backbone(), ICAEConfig(n_slots=8, segment_length=64, pooling="mean", lora_r=4))
    lines: list[str] = []
    records = demo.run_demo(tmp_path / "storage", max_questions=2, top_k=3, compressor=compressor, out=lines.append)

    docs, questions = demo.load_sample_corpus()
    assert [r["question"] for r in records] == [q["question"] for q in questions[:2]]
    for r in records:
        hybrid, soft, full = r["hybrid"], r["soft"], r["full"]
        # Soft prompts read 8 positions per 64-token chunk; hybrid reads the best chunk as text on top;
        # the whole document costs the most.
        assert soft["positions"] < hybrid["positions"] < full["positions"]
    text = "\n".join(lines)
    assert f"indexed {len(docs)} documents" in text and "answers containing the reference: hybrid" in text
    assert (tmp_path / "storage" / "lloco_index.json").is_file()

    # A second run finds the persisted index of the same compressor: it rewrites nothing, answers the same.
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "storage").rglob("*") if p.is_file()}
    again = demo.run_demo(tmp_path / "storage", max_questions=2, top_k=3, compressor=compressor, out=lambda *_: None)
    assert [r["hybrid"]["answer"] for r in again] == [r["hybrid"]["answer"] for r in records]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "storage").rglob("*") if p.is_file()} == files
