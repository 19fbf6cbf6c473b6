"""Compressor training on a tiny random LLaMA with the real SmolLM2 tokenizer (seconds on a CPU).

Checks: the loss goes down; a run interrupted and resumed from its checkpoint ends bit-identical to an
uninterrupted run; a checkpoint write killed midway leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import math

import pytest
import torch

import tiny_models
from helpers import PROSE as TEXT
from helpers import pretrain_config as config
from lloco_index.backbone import Backbone
from lloco_index.training import checkpoint as ckpt
from lloco_index.training.data import WindowSampler, make_windows, shorten
from lloco_index.training.evaluate import evaluate_compressor
from lloco_index.training.pretrain import PretrainConfig, pretrain, trainable_state

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_models.smollm2_tokenizer()


def tiny_backbone(tokenizer) -> Backbone:
    """A fresh 2-layer random LLaMA (same weights every call) with SmolLM2's tokenizer."""
    return tiny_models.tiny_backbone(1234, "tiny-test-llama", max_positions=512)


@pytest.fixture(scope="module")
def windows(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    return make_windows([ids, ids[7:]], segment_length=32, continuation_length=16)


def test_loss_goes_down(tmp_path, tokenizer, windows):
    # One fixed batch of AE examples: the reconstruction loss must fall within a few steps.
    batch = windows[:2]
    result = pretrain(config(tmp_path, objectives={"ae": 1.0}, steps=8, checkpoint_every=0, lr_schedule="constant"),
                      backbone=tiny_backbone(tokenizer), windows=batch, progress=False)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses


def test_resume_is_bit_identical(tmp_path, tokenizer, windows):
    full = pretrain(config(tmp_path / "full"), backbone=tiny_backbone(tokenizer), windows=windows, progress=False)
    first = pretrain(config(tmp_path / "split"), backbone=tiny_backbone(tokenizer), windows=windows,
                     progress=False, stop_after=3)
    assert first.step == 3 and ckpt.has_checkpoints(tmp_path / "split")
    # A new process would start from a fresh model: so does this second call.
    second = pretrain(config(tmp_path / "split"), backbone=tiny_backbone(tokenizer), windows=windows, progress=False)
    assert second.step == 6
    a, b = trainable_state(full.compressor), trainable_state(second.compressor)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in full.history] == [r["loss"] for r in second.history]


def test_killed_checkpoint_write_keeps_previous(tmp_path, tokenizer, windows, monkeypatch):
    pretrain(config(tmp_path, steps=3), backbone=tiny_backbone(tokenizer), windows=windows, progress=False)
    folder = ckpt.CheckpointDir(tmp_path / ckpt.CHECKPOINT_DIR)
    assert folder.names() == ["step-000003"] and folder.latest_name() == "step-000003"

    # Killed after the temporary folder is written, before it is renamed into place.
    def killed(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        folder.save(6, tensors={"model": {"w": torch.ones(3)}}, objects={}, state={"step": 6})
    monkeypatch.undo()
    found = ckpt.load_run_checkpoint(tmp_path)
    assert found.path.name == "step-000003" and found.step == 3 and found.state["step"] == 3

    # A damaged newer checkpoint (e.g. a full disk) is skipped too, even when LATEST names it.
    damaged = tmp_path / ckpt.CHECKPOINT_DIR / "step-000006"
    damaged.mkdir()
    (damaged / "state.json").write_text('{"step": 6}')
    (damaged / "model.safetensors").write_bytes(b"\x80truncated")
    (tmp_path / ckpt.CHECKPOINT_DIR / ckpt.POINTER).write_text("step-000006")
    found = ckpt.load_run_checkpoint(tmp_path)
    assert found.path.name == "step-000003" and found.step == 3
    leftovers = [p for p in (tmp_path / ckpt.CHECKPOINT_DIR).iterdir() if p.name.startswith(".")]
    assert not leftovers


def _as_legacy_file(run_dir, step: int) -> None:
    """Rewrite a run's checkpoint folder as the single ``.pt`` file pretraining used to write (with the
    scheduler state and the config names of that time), then remove the folder."""
    found = ckpt.load_run_checkpoint(run_dir, step)
    config = dict(found.state["config"])
    for new, old in (("learning_rate", "lr"), ("grad_accum_steps", "grad_accum"), ("lr_schedule", "schedule")):
        if new in config:
            config[old] = config.pop(new)
    legacy = {"step": step, "config": config, "model": found.tensors["model"], "optimizer": found.objects["optimizer"],
              "scheduler": {"base_lrs": [3e-3], "last_epoch": step}, "data": found.state["data"],
              "rng": found.objects["rng"], "history": found.state["history"], "machine": found.state["machine"]}
    torch.save(legacy, str(run_dir / ckpt.CHECKPOINT_DIR / f"step-{step:08d}.pt"))
    import shutil

    shutil.rmtree(found.path)
    (run_dir / ckpt.CHECKPOINT_DIR / ckpt.POINTER).unlink()


def test_single_file_checkpoints_still_resume_and_convert(tmp_path, tokenizer, windows, capsys):
    from lloco_index.cli import main

    full = pretrain(config(tmp_path / "full"), backbone=tiny_backbone(tokenizer), windows=windows, progress=False)
    for name in ("old", "converted"):
        pretrain(config(tmp_path / name), backbone=tiny_backbone(tokenizer), windows=windows, progress=False,
                 stop_after=3)
        _as_legacy_file(tmp_path / name, 3)
    assert [p.name for p in ckpt.legacy_checkpoints(tmp_path / "old")] == ["step-00000003.pt"]

    assert main(["pretrain", "--convert-checkpoints", str(tmp_path / "converted"), "--remove-legacy"]) == 0
    folder = tmp_path / "converted" / ckpt.CHECKPOINT_DIR
    assert capsys.readouterr().out.splitlines() == [f"wrote {folder / 'step-000003'}"]
    assert not ckpt.legacy_checkpoints(tmp_path / "converted")
    assert ckpt.CheckpointDir(folder).latest_name() == "step-000003"
    # A second call has nothing left to convert; a damaged file is named and kept.
    assert main(["pretrain", "--convert-checkpoints", str(tmp_path / "converted")]) == 0
    assert "nothing to convert" in capsys.readouterr().out
    (folder / "step-00000009.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="1 of 1 .pt checkpoints .* did not load and were left as they are"):
        main(["pretrain", "--convert-checkpoints", str(tmp_path / "converted")])
    (folder / "step-00000009.pt").unlink()

    a = trainable_state(full.compressor)
    for name in ("old", "converted"):
        resumed = pretrain(config(tmp_path / name), backbone=tiny_backbone(tokenizer), windows=windows, progress=False)
        assert resumed.step == 6
        b = trainable_state(resumed.compressor)
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert [r["loss"] for r in full.history] == [r["loss"] for r in resumed.history]


def test_sampler_state_and_shorten(windows):
    a = WindowSampler(windows, batch_size=3, seed=5)
    for _ in range(4):
        a.next_batch()
    b = WindowSampler(windows, batch_size=3, seed=5)
    b.load_state_dict(a.state_dict())
    assert [w.segment for w in a.next_batch()] == [w.segment for w in b.next_batch()]
    w = shorten(windows[0], 16, 16)
    assert w.segment == windows[0].segment[:16] and w.continuation == windows[0].segment[16:32]


def test_eval_reports_control_lines(tmp_path, tokenizer, windows):
    result = pretrain(config(tmp_path, steps=1, checkpoint_every=0), backbone=tiny_backbone(tokenizer),
                      windows=windows, progress=False)
    metrics = evaluate_compressor(result.compressor, windows[:4], reader_adapter=result.compressor.reader_adapter)
    for key in ("cont_own", "cont_shuffled", "cont_raw", "cont_none", "ae_acc", "ae_acc_shuffled", "slot_gain"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["ae_acc"] <= 1.0


def test_qa_eval_reports_reader_controls(tmp_path, tokenizer, windows):
    from lloco_index.training.data import QAExample
    from lloco_index.training.evaluate import evaluate_qa

    result = pretrain(config(tmp_path, steps=1, checkpoint_every=0), backbone=tiny_backbone(tokenizer),
                      windows=windows, progress=False)
    qa = [QAExample("Who led the Norse raiders?", "Rollo", contexts=[TEXT[:400]], group="t")]
    m = evaluate_qa(result.compressor, qa, reader_adapter=result.compressor.reader_adapter, max_new_tokens=4)
    for name in ("soft", "full", "closed", "full_reader", "closed_reader"):
        assert 0.0 <= m[f"qa_{name}_f1"] <= 1.0 and 0.0 <= m[f"qa_{name}_em"] <= 1.0, name
    assert m["qa_n"] == 1.0
    # Without a reader adapter the two reader controls would repeat the base-model lines: not reported.
    assert "qa_closed_reader_f1" not in evaluate_qa(result.compressor, qa, reader_adapter=None, max_new_tokens=4)


def test_qa_objective_reads_what_a_query_reads(tmp_path, tokenizer, windows):
    # The qa objective's decoder input is the reader's own preparation of the same messages: the same
    # embeddings as SoftPromptReader.prepare gives a query holding that soft prompt, and the answer as the
    # reader's chat template closes it.
    from lloco_index.generation import SoftPromptReader
    from lloco_index.generation import make_placeholder
    from lloco_index.store import SoftPromptStore
    from lloco_index.training.data import QAExample
    from lloco_index.training.objectives import build_decoder_batch, qa_example, qa_messages

    compressor = pretrain(config(tmp_path, steps=1, checkpoint_every=0), backbone=tiny_backbone(tokenizer),
                          windows=windows, progress=False).compressor
    qa = QAExample("Who led the Norse raiders?", "Rollo", contexts=[TEXT[:150]])
    reader = SoftPromptReader(compressor.backbone, SoftPromptStore.for_compressor(compressor), compressor=compressor)
    example = qa_example(reader, qa, compressor.segment_length)
    with torch.no_grad():
        [soft] = compressor.encode([example.segment])
    reader.store.put({"c0": soft})
    query = reader.prepare(qa_messages(qa.question, make_placeholder("c0")))
    # With the soft prompt as the store gives it back (at its storage precision), the inputs are equal.
    embeds, _, labels = build_decoder_batch(compressor.backbone, [example], [reader.store.get("c0")])
    n_prompt = query.inputs_embeds.shape[1]
    assert torch.equal(embeds[0, :n_prompt], query.inputs_embeds[0])
    assert example.target_ids == reader.answer_ids(qa_messages(qa.question, make_placeholder("c0")), "Rollo")
    assert labels[0, n_prompt:n_prompt + len(example.target_ids)].tolist() == example.target_ids
    assert query.soft_positions == soft.shape[0] and (labels[0, :n_prompt] == -100).all()


def test_export_round_trip(tmp_path, tokenizer, windows):
    from lloco_index.compressors.loading import load_compressor
    from lloco_index.training.pretrain import export_checkpoint

    result = pretrain(config(tmp_path / "run", steps=2, checkpoint_every=2), backbone=tiny_backbone(tokenizer),
                      windows=windows, progress=False)
    exported = export_checkpoint(str(tmp_path / "run"), str(tmp_path / "out"), backbone=tiny_backbone(tokenizer))
    trained, written = trainable_state(result.compressor), trainable_state(exported)
    assert trained.keys() == written.keys() and all(torch.equal(trained[k], written[k]) for k in trained)
    loaded = load_compressor(tmp_path / "out", backbone=tiny_backbone(tokenizer))
    assert loaded.fingerprint == exported.fingerprint and loaded.reader_adapter == "lloco_reader"
    with torch.no_grad():
        a = result.compressor.encode([windows[0].segment])[0]
        b = loaded.encode([windows[0].segment])[0]
        ids = torch.tensor([windows[0].continuation])
        with result.compressor.backbone.using("lloco_reader") as m1:
            la = m1(input_ids=ids).logits
        with loaded.backbone.using("lloco_reader") as m2:
            lb = m2(input_ids=ids).logits
    assert torch.allclose(a, b) and torch.allclose(la, lb)


def test_model_card_records_the_machine_the_run_trained_on(tmp_path, tokenizer, windows):
    from lloco_index.training.model_card import describe_machine, write_model_card

    pretrain(config(tmp_path / "run", steps=2, checkpoint_every=2), backbone=tiny_backbone(tokenizer),
             windows=windows, progress=False)
    state = ckpt.load_run_checkpoint(tmp_path / "run").state
    assert state["machine"] == describe_machine("cpu") and "torch threads" in state["machine"]
    card_args = dict(base_model="tiny", config={**state["config"], "reader": True}, final_eval=None,
                     command="lloco-index pretrain", step=2, wall_hours=0.5)
    (tmp_path / "out").mkdir()
    (tmp_path / "out2").mkdir()
    card = write_model_card(str(tmp_path / "out"), str(tmp_path / "run"), machine=state["machine"], **card_args)
    text = card.read_text()
    assert f"wall time 0.50 h on {state['machine']}" in text and "2-core" not in text
    # A checkpoint that predates the record says so instead of naming a machine.
    unknown = write_model_card(str(tmp_path / "out2"), str(tmp_path / "run"), **card_args).read_text()
    assert "on a machine the run did not record" in unknown


def test_reader_and_encoder_both_train_with_teacher_passes(tmp_path, tokenizer, windows):
    # The KL objective runs the plain base model (adapters disabled) inside a training step; that must not
    # freeze the reader or the encoder adapter (peft re-enables only the last active adapter).
    result = pretrain(config(tmp_path, objectives={"kl": 1.0}, steps=2, checkpoint_every=0),
                      backbone=tiny_backbone(tokenizer), windows=windows, progress=False)
    state = trainable_state(result.compressor)
    reader_b = [v for k, v in state.items() if k.startswith("reader.") and "lora_B" in k]
    encoder_b = [v for k, v in state.items() if k.startswith("lora.") and "lora_B" in k]
    assert reader_b and any(float(v.abs().max()) > 0 for v in reader_b)
    assert encoder_b and any(float(v.abs().max()) > 0 for v in encoder_b)


# ------------------------------------------------------------------ AutoCompressor objective
def ac_config(tmp_path, **kw) -> PretrainConfig:
    base = dict(method="autocompressor", objectives={"ac": 1.0}, segment_length=16, n_slots=4, ac_segments=2)
    base.update(kw)
    return config(tmp_path, **base)


@pytest.fixture(scope="module")
def ac_windows(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    return make_windows([ids, ids[5:]], segment_length=32, continuation_length=16)  # 2 segments of 16


def test_recursive_loss_reads_the_summaries(tokenizer, ac_windows):
    # The second segment's loss depends on the first segment through its summary vectors (and only so):
    # changing the first segment changes it, and the gradient reaches the summary-token embeddings.
    from lloco_index.training.pretrain import build_compressor
    from lloco_index.training.recursive import recursive_lm_loss, split_segments

    backbone = tiny_backbone(tokenizer)
    compressor = build_compressor(ac_config("unused"), backbone)
    with torch.no_grad():  # a non-zero LoRA: the writer must differ from the plain model
        for name, p in backbone.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    a = split_segments(ac_windows[0].segment, 16, 2)
    b = [ac_windows[1].segment[:16], a[1]]
    assert [len(s) for s in a] == [16, 16]
    with backbone.using(compressor.writer_adapter):
        loss_a, n = recursive_lm_loss(compressor, [a], score_first_segment=False)
        loss_b, _ = recursive_lm_loss(compressor, [b], score_first_segment=False)
        loss_all, n_all = recursive_lm_loss(compressor, [a])
    assert n == 16 and n_all == 16 + 15
    assert not torch.allclose(loss_a, loss_b)
    loss_a.backward()
    assert compressor.embed_summary.weight.grad is not None and compressor.embed_summary.weight.grad.abs().sum() > 0
    lora_grads = [p.grad for name, p in backbone.peft_model.named_parameters() if "lora_A" in name]
    assert lora_grads and any(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_autocompressor_training_learns_and_resumes(tmp_path, tokenizer, ac_windows):
    batch = ac_windows[:2]
    result = pretrain(ac_config(tmp_path / "a", steps=8, checkpoint_every=0, lr_schedule="constant"),
                      backbone=tiny_backbone(tokenizer), windows=batch, progress=False)
    losses = [r["loss_ac"] for r in result.history if "loss_ac" in r]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses
    # Mixed with a shared objective, interrupted and resumed: identical to one uninterrupted run.
    mix = {"ac": 1.0, "lm": 1.0}
    full = pretrain(ac_config(tmp_path / "full", objectives=mix), backbone=tiny_backbone(tokenizer),
                    windows=ac_windows, progress=False)
    pretrain(ac_config(tmp_path / "split", objectives=mix), backbone=tiny_backbone(tokenizer), windows=ac_windows,
             progress=False, stop_after=3)
    second = pretrain(ac_config(tmp_path / "split", objectives=mix), backbone=tiny_backbone(tokenizer),
                      windows=ac_windows, progress=False)
    a, b = trainable_state(full.compressor), trainable_state(second.compressor)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("writer.") for k in a) and "embed_summary.weight" in a
    assert not any(k.startswith("reader.") for k in a)  # one LoRA writes and reads: stored once
    # save_pretrained would drop the LoRA (and keep the base identity): refused, the export merges it.
    with pytest.raises(ValueError, match="pretrain --export"):
        full.compressor.save_pretrained(tmp_path / "direct")


def test_autocompressor_export_merges_the_lora(tmp_path, tokenizer, ac_windows):
    from lloco_index.compressors.autocompressor import AutoCompressor
    from lloco_index.compressors.loading import load_compressor
    from lloco_index.training.pretrain import export_checkpoint

    result = pretrain(ac_config(tmp_path / "run", steps=3, checkpoint_every=3, learning_rate=3e-2),
                      backbone=tiny_backbone(tokenizer), windows=ac_windows, progress=False)
    exported = export_checkpoint(str(tmp_path / "run"), str(tmp_path / "out"), backbone=tiny_backbone(tokenizer))
    loaded = load_compressor(tmp_path / "out")
    assert isinstance(loaded, AutoCompressor) and loaded.fingerprint == exported.fingerprint
    assert loaded.writer_adapter is None and loaded.config.base_model != "tiny-test-llama"
    text = tokenizer.decode(ac_windows[0].segment)
    with torch.no_grad():
        # What training wrote (decoder + LoRA) is what the merged decoder writes.
        trained = result.compressor
        with trained.backbone.using(trained.writer_adapter):
            expected = trained.summarize([trained.tokenize_segments(text)])[0]
    [got] = loaded.compress([text])
    assert got.shape == expected.shape == (2 * 4, 64)
    assert torch.allclose(got.float(), expected.float(), atol=3e-2, rtol=3e-2)


def test_ac_objective_needs_the_autocompressor_method(tmp_path):
    with pytest.raises(ValueError, match="--method autocompressor"):
        config(tmp_path, objectives={"ac": 1.0}).check()
    with pytest.raises(ValueError, match="no --slots-curriculum"):
        ac_config(tmp_path, slots_curriculum=[[0, 2]]).check()


def test_model_card_describes_each_method():
    from lloco_index.training.model_card import describe_method

    base = dict(segment_length=256, n_slots=32, lora_r=16, reader_r=16, reader=True, pool_layer=8)
    assert "mean of the encoder's hidden states" in describe_method({**base, "pooling": "mean"})
    assert "learned memory tokens" in describe_method({**base, "pooling": "memory"})
    text = describe_method({**base, "method": "autocompressor"})
    assert "AutoCompressor" in text and "merged" in text and "8x" in text


def test_pretrain_without_data_is_a_clear_error_and_leaves_no_run_dir(tmp_path, capsys):
    from lloco_index.cli import main

    run_dir = tmp_path / "run"
    assert main(["pretrain", "--run-dir", str(run_dir), "--data-dir", str(tmp_path / "no-data"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--text" in err and "Traceback" not in err
    assert not run_dir.exists()
    assert main(["pretrain", "--run-dir", str(run_dir), "--text", str(tmp_path / "empty"), "--steps", "1"]) == 2
    assert "No training text" in capsys.readouterr().err and not run_dir.exists()


def test_pretrain_on_your_own_text_folder(tmp_path, tokenizer):
    import json

    folder = tmp_path / "my-text"
    (folder / "sub").mkdir(parents=True)
    sentences = TEXT.split(". ")
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(". ".join(sentences[i:] + sentences[:i]))
    (folder / "sub" / "more.jsonl").write_text("\n".join(json.dumps({"text": TEXT[i * 50:]}) for i in range(6)))
    result = pretrain(config(tmp_path / "run", text=str(folder), steps=2, eval_every=2, eval_windows=2,
                             checkpoint_every=0), backbone=tiny_backbone(tokenizer), progress=False)
    assert result.step == 2 and all(math.isfinite(r["loss"]) for r in result.history if "loss" in r)
    assert result.last_eval and math.isfinite(result.last_eval["cont_own"])  # held out from the same text


class _Loaded(Exception):
    """Raised by a stand-in Backbone.load once it has seen where the decoder would go."""


def _spy_on_decoder_device(monkeypatch) -> list:
    from lloco_index.training import pretrain as pretrain_module

    seen = []

    def load(name_or_path=None, *, dtype=None, device=None):
        seen.append(device)
        raise _Loaded

    monkeypatch.setattr(pretrain_module.Backbone, "load", staticmethod(load))
    return seen


def test_pretrain_device_is_where_the_decoder_loads(tmp_path, windows, monkeypatch):
    seen = _spy_on_decoder_device(monkeypatch)
    with pytest.raises(_Loaded):
        pretrain(config(tmp_path / "a", device="meta"), windows=windows, eval_windows=[], progress=False)
    assert seen == [torch.device("meta")]
    # Unset, it follows $LLOCO_DEVICE like every other decoder load.
    monkeypatch.setenv("LLOCO_DEVICE", "meta")
    assert config(tmp_path / "b").device is None
    with pytest.raises(_Loaded):
        pretrain(config(tmp_path / "b"), windows=windows, eval_windows=[], progress=False)
    assert seen[-1] == torch.device("meta")


def test_pretrain_cli_device_reaches_the_config(tmp_path, monkeypatch):
    from lloco_index.cli import main

    seen = _spy_on_decoder_device(monkeypatch)
    (tmp_path / "text.txt").write_text(TEXT)
    with pytest.raises(_Loaded):
        main(["pretrain", "--run-dir", str(tmp_path / "run"), "--text", str(tmp_path / "text.txt"), "--steps", "1",
              "--eval-every", "0", "--device", "meta"])
    assert seen == [torch.device("meta")]


def test_one_config_vocabulary_reads_the_older_pretraining_names(tmp_path):
    import argparse
    import json

    from lloco_index.finetune.config import FinetuneConfig
    from lloco_index.training.cli import add_pretrain_arguments, config_from_args

    old = {"run_dir": "r", "lr": 1e-3, "grad_accum": 4, "schedule": "linear", "retired_field": 1}
    loaded = PretrainConfig.from_dict(old)
    assert (loaded.learning_rate, loaded.grad_accum_steps, loaded.lr_schedule) == (1e-3, 4, "linear")
    # A current name given next to an old one wins.
    assert PretrainConfig.from_dict({**old, "learning_rate": 5e-4}).learning_rate == 5e-4
    assert FinetuneConfig.from_dict({"lr": 1e-3, "grad_accum": 4}).examples_per_step == 4

    # A --config file saved by an older run: its values hold unless a flag is given explicitly.
    (tmp_path / "config.json").write_text(json.dumps(old))
    parser = argparse.ArgumentParser()
    add_pretrain_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "config.json"), "--lr", "2e-3"])
    cfg = config_from_args(args)
    assert (cfg.learning_rate, cfg.grad_accum_steps, cfg.lr_schedule) == (2e-3, 4, "linear")

    # Finetuning kept its names, so the hash a saved run is resumed against is what it was.
    assert FinetuneConfig().training_hash() == "08cea5087ecad53f"
    assert FinetuneConfig(learning_rate=1e-4, grad_accum_steps=2, lr_schedule="linear").training_hash() == "caa63a7be01b2c31"
    with pytest.raises(ValueError, match="lr_schedule must be"):
        PretrainConfig(run_dir="r", lr_schedule="step").check()


def test_ctrl_c_in_pretrain_names_the_checkpoint_it_resumes_from(tmp_path, tokenizer, capsys, monkeypatch):
    from lloco_index.cli import main
    from lloco_index.training.loop import TrainLoop

    model_dir, text, run_dir = tmp_path / "model", tmp_path / "text.txt", tmp_path / "run"
    saved = tiny_backbone(tokenizer)
    saved.base_model.save_pretrained(str(model_dir))
    saved.tokenizer.save_pretrained(str(model_dir))
    text.write_text(TEXT * 4)
    argv = ["pretrain", "--run-dir", str(run_dir), "--decoder", str(model_dir), "--text", str(text), "--steps", "4",
            "--checkpoint-every", "2", "--segment-length", "32", "--n-slots", "8", "--pool-layer", "1", "--lora-r", "4",
            "--reader-r", "4", "--batch-size", "2", "--continuation-length", "16", "--objectives", "lm=1,ae=1",
            "--eval-every", "0"]
    original = TrainLoop.lrs_at

    def interrupted_in_step_4(self, step):  # the rates of step `step` (0-based) are set as it begins
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(TrainLoop, "lrs_at", interrupted_in_step_4)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    checkpoints = run_dir / ckpt.CHECKPOINT_DIR
    assert err.strip().splitlines()[-1] == (
        f"interrupted: the checkpoint of step 2 is saved in {checkpoints}; run the same command again to resume from "
        f"it (the steps after 2 are trained again; --checkpoint-every 2 sets how many can be lost).")
    monkeypatch.undo()
    assert main(argv) == 0 and ckpt.CheckpointDir(checkpoints).latest_name() == "step-000004"
