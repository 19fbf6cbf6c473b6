"""AutoCompressor: loading the public checkpoint layout, recursion, persistence, reading.

A tiny random LLaMA (hidden 64, 2 layers, SmolLM2's 49152-token vocabulary) is saved in
the exact layout of princeton-nlp/AutoCompressor-Llama-2-7b-6k: config.json with the
AutoCompressor fields and architectures LlamaAutoCompressorModel, two pickle shards
pytorch_model-0000{1,2}-of-00002.bin written with torch.save, pytorch_model.bin.index.json,
the summary-token embeddings as ``embed_summary.weight``, and tokenizer files.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import pytest
import torch

from lloco_index import models
from lloco_index.compressors.autocompressor import (
    READER_ADAPTER,
    SUMMARY_KEY,
    AutoCompressor,
    AutoCompressorConfig,
)
from lloco_index.compressors.loading import load_compressor
from lloco_index.errors import ModelNotFoundError
from lloco_index.generation import SoftPromptReader, make_placeholder
from lloco_index.precision import autocast
from lloco_index.store import SoftPromptStore

SUMMARY_LENGTH = 4
HIDDEN = 64
SEGMENT = 16  # tokens per segment in most tests (the paper's 1536 is the default)
TEXT = ("The lighthouse keeper counted ships every evening. In spring the herring boats came north, and in "
        "autumn the whalers went south past the cape. Nobody else on the island could read the tide tables.")


def make_checkpoint(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny random AutoCompressor-Llama-2 checkpoint in the published layout."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(models.default_decoder_dir()))
    tokenizer.save_pretrained(str(directory))
    config = {
        "_name_or_path": "tiny/AutoCompressor-Llama-test",
        "accumulate_summary": True,
        "architectures": ["LlamaAutoCompressorModel"],
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.2,  # large: a 2-layer random model is otherwise nearly input-blind
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "segment_gradient_checkpointing": True,
        "summary_length": SUMMARY_LENGTH,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.34.0.dev0",
        "use_cache": True,
        "vocab_size": len(tokenizer),
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}))
    torch.manual_seed(seed)
    plain = {k: v for k, v in config.items() if k not in ("summary_length", "accumulate_summary", "segment_gradient_checkpointing")}
    model = LlamaForCausalLM(LlamaConfig(**plain)).to(torch.bfloat16)
    state = dict(model.state_dict())
    eos_row = state["model.embed_tokens.weight"][tokenizer.eos_token_id]
    # Reference init is the EOS row for every slot; add noise so the slots differ, as after training.
    state[SUMMARY_KEY] = (eos_row + 0.2 * torch.randn(SUMMARY_LENGTH, HIDDEN)).to(torch.bfloat16)
    keys = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    weight_map = {}
    for name, shard_keys in shards.items():
        torch.save({k: state[k].clone() for k in shard_keys}, directory / name)
        weight_map.update({k: name for k in shard_keys})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return directory


def reference_summaries(compressor: AutoCompressor, segments: list[list[int]]) -> torch.Tensor:
    """Straightforward batch-1 recursion, written from the reference's description."""
    model = compressor.backbone.base_model
    table = model.get_input_embeddings()
    summary = compressor.embed_summary.weight.to(table.weight.dtype)
    soft = table.weight.new_zeros(0, HIDDEN)
    out = []
    with torch.inference_mode(), autocast("cpu"):
        for segment in segments:
            x = torch.cat([soft.to(table.weight.dtype), table(torch.tensor(segment)), summary])
            new = model.model(inputs_embeds=x[None]).last_hidden_state[0, -SUMMARY_LENGTH:]
            out.append(new)
            soft = torch.cat([soft, new.to(soft.dtype)])
    return torch.cat(out).float()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "AutoCompressor-Llama-test")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def compressor(checkpoint, cache) -> AutoCompressor:
    return AutoCompressor.from_checkpoint(checkpoint, cache_dir=cache, segment_length=SEGMENT)


def test_loads_published_layout(compressor, checkpoint, cache):
    assert compressor.n_slots == SUMMARY_LENGTH and compressor.segment_length == SEGMENT
    assert compressor.accumulate and compressor.config.mode == "autocompressor"
    assert compressor.backbone.identity.startswith("autocompressor:AutoCompressor-Llama-test:")
    assert compressor.backbone.hidden_size == HIDDEN
    original = {}
    for shard in checkpoint.glob("pytorch_model-*.bin"):
        original.update(torch.load(shard, weights_only=True))
    assert torch.equal(compressor.embed_summary.weight, original[SUMMARY_KEY].float())
    model_state = compressor.backbone.base_model.state_dict()
    for key in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        assert torch.equal(model_state[key], original[key].float()), key
    [copy] = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert compressor.source_dir == copy.resolve()  # indexes reference this directory instead of copying 13 GB
    files = {p.name for p in copy.rglob("*") if p.is_file()}
    assert {"lloco_compressor.json", "compressor.safetensors", "model.safetensors.index.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    # Without an override, the paper's segment length.
    assert AutoCompressorConfig().segment_length == 1536


def test_recursion_and_positions(compressor):
    tok = compressor.backbone.tokenize
    ids = tok(TEXT)
    assert len(ids) > 2 * SEGMENT
    seg1, seg2 = ids[:SEGMENT], ids[SEGMENT : 2 * SEGMENT]
    other1 = tok("A completely different opening about trains, timetables and a late conductor.")[:SEGMENT]
    with torch.inference_mode():
        a, b, alone = compressor.summarize([[seg1, seg2], [other1, seg2], [seg2]])
    s = SUMMARY_LENGTH
    assert a.shape == (2 * s, HIDDEN) and alone.shape == (s, HIDDEN)
    # Segment 2's summary is conditioned on segment 1's summary ...
    assert not torch.allclose(a[s:], b[s:], atol=1e-2)
    assert not torch.allclose(a[s:], alone, atol=1e-2)
    # ... and segment 1's summary does not see segment 2 (causal).
    with torch.inference_mode():
        [first_only] = compressor.summarize([[seg1]])
    torch.testing.assert_close(a[:s].float(), first_only.float(), atol=2e-2, rtol=2e-2)
    # Same numbers as a plain batch-1 recursion (summaries of earlier segments prepended, contiguous positions).
    torch.testing.assert_close(a.float(), reference_summaries(compressor, [seg1, seg2]), atol=3e-2, rtol=3e-2)

    # compress(): concatenated summaries, num_positions = summary_length x segments, batch-independent.
    short = "Tide tables."
    prompts = compressor.compress([TEXT, short, TEXT[: len(TEXT) // 2]], batch_size=3)
    for text, prompt in zip([TEXT, short, TEXT[: len(TEXT) // 2]], prompts):
        n = len(tok(text))
        assert prompt.shape == (compressor.num_positions(n), HIDDEN)
        assert prompt.shape[0] == s * -(-n // SEGMENT)
        assert prompt.dtype == torch.bfloat16
        [single] = compressor.compress([text], batch_size=1)
        # bf16 compute: batched kernels round differently, so allow a few ulps; a padding leak would be far larger.
        diff = (prompt.float() - single.float()).abs()
        assert diff.max() < 0.1 and diff.mean() < 5e-3


def test_second_load_uses_safetensors_copy(compressor, checkpoint, cache, monkeypatch):
    expected = compressor.compress([TEXT])[0]

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called although a safetensors copy exists")

    monkeypatch.setattr(torch, "load", no_pickle)
    again = AutoCompressor.from_checkpoint(checkpoint, cache_dir=cache, segment_length=SEGMENT)
    assert again.fingerprint == compressor.fingerprint
    assert torch.equal(again.compress([TEXT])[0], expected)


def test_bad_checkpoints_give_clear_errors(checkpoint, tmp_path):
    cache = tmp_path / "cache"
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    shard = broken / "pytorch_model-00002-of-00002.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(ModelNotFoundError) as info:
        AutoCompressor.from_checkpoint(broken, cache_dir=cache)
    message = str(info.value)
    assert "pytorch_model-00002-of-00002.bin" in message and "truncated or corrupt" in message
    assert "Re-download" in message
    assert not cache.exists() or not any(cache.iterdir())  # no half-written copy left behind

    torch.save({"model.norm.weight": torch.ones(2), "evil": datetime.timedelta(days=1)}, shard)  # not tensors only
    with pytest.raises(ModelNotFoundError, match="other than tensors"):
        AutoCompressor.from_checkpoint(broken, cache_dir=cache)

    shard.unlink()
    with pytest.raises(ModelNotFoundError, match="pytorch_model-00002-of-00002.bin.*missing"):
        AutoCompressor.from_checkpoint(broken, cache_dir=cache)

    (broken / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="config.json missing"):
        AutoCompressor.from_checkpoint(broken, cache_dir=cache)
    with pytest.raises(ModelNotFoundError, match="No AutoCompressor checkpoint"):
        AutoCompressor.from_checkpoint(tmp_path / "nowhere", cache_dir=cache)


def test_save_pretrained_round_trip(compressor, tmp_path):
    target = tmp_path / "saved"
    compressor.save_pretrained(target)
    names = [p.name for p in target.rglob("*") if p.is_file()]
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    config = json.loads((target / "lloco_compressor.json").read_text())
    assert config["mode"] == "autocompressor" and config["n_slots"] == SUMMARY_LENGTH
    assert config["segment_length"] == SEGMENT and config["accumulate"] is True
    assert config["base_model"] == compressor.backbone.identity
    loaded = load_compressor(target)
    assert isinstance(loaded, AutoCompressor)
    assert loaded.fingerprint == compressor.fingerprint
    texts = [TEXT, "Tide tables."]
    for a, b in zip(compressor.compress(texts), loaded.compress(texts)):
        assert torch.equal(a, b)
    # A second directory may point at the first one's decoder instead of copying it.
    loaded.save_pretrained(tmp_path / "light", decoder="reference")
    assert not (tmp_path / "light" / "decoder").exists()
    assert load_compressor(tmp_path / "light").fingerprint == compressor.fingerprint


def test_reader_generates_from_soft_prompt(compressor, tmp_path):
    store = SoftPromptStore.open(tmp_path / "storage", compressor)
    [prompt_id] = store.add([TEXT], compressor)
    reader = SoftPromptReader(compressor.backbone, store, compressor=compressor, max_new_tokens=4)
    messages = [{"role": "user", "content": f"{make_placeholder(prompt_id)}\nWho reads the tide tables?"}]
    prepared = reader.prepare(messages)
    assert prepared.soft_positions == compressor.num_positions(len(compressor.backbone.tokenize(TEXT)))
    stored = store.get(prompt_id).float()
    rows = prepared.inputs_embeds[0].float()
    found = [i for i in range(rows.shape[0] - stored.shape[0] + 1) if torch.equal(rows[i : i + stored.shape[0]], stored)]
    assert len(found) == 1  # the summaries are spliced in whole, once
    result = reader.generate(messages)
    assert 1 <= result.new_tokens <= 4
    # The answer is the greedy continuation of exactly these embeddings (summaries spliced in).
    with torch.inference_mode():
        out = compressor.backbone.base_model.generate(**reader.generate_kwargs(prepared, 4))
    assert result.text == compressor.backbone.tokenizer.decode(out[0], skip_special_tokens=True).strip()
    assert result.prompt.soft_positions == prepared.soft_positions


def test_reader_adapter_is_not_saved_into_decoder(checkpoint, tmp_path):
    from peft import LoraConfig

    fresh = AutoCompressor.from_checkpoint(checkpoint, cache_dir=tmp_path / "cache", segment_length=SEGMENT)
    before = fresh.compress([TEXT])[0]
    fresh.backbone.add_adapter(READER_ADAPTER, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    assert fresh.reader_adapter == READER_ADAPTER
    assert torch.equal(fresh.compress([TEXT])[0], before)  # compression ignores the reader LoRA
    fresh.save_pretrained(tmp_path / "saved")
    from safetensors import safe_open

    [weights] = (tmp_path / "saved" / "decoder").glob("*.safetensors")
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
    assert not any("lora" in k or "base_layer" in k for k in keys)
    assert torch.equal(load_compressor(tmp_path / "saved").compress([TEXT])[0], before)


def test_without_accumulation_only_the_last_summary_is_kept(compressor):
    rmt = AutoCompressor(compressor.backbone, AutoCompressorConfig(n_slots=SUMMARY_LENGTH, segment_length=SEGMENT,
                                                                   accumulate=False),
                         summary_embeddings=compressor.embed_summary.weight)
    ids = compressor.backbone.tokenize(TEXT)
    segments = [ids[i : i + SEGMENT] for i in range(0, 3 * SEGMENT, SEGMENT)]
    with torch.inference_mode():
        [last] = rmt.summarize([segments])
        [accumulated] = compressor.summarize([segments])
    assert last.shape == (SUMMARY_LENGTH, HIDDEN) and rmt.num_positions(len(ids)) == SUMMARY_LENGTH
    # Segments 1 and 2 are identical in both modes; segment 3 saw only segment 2's summary here.
    assert not torch.allclose(last.float(), accumulated[-SUMMARY_LENGTH:].float(), atol=1e-2)
    assert rmt.fingerprint != compressor.fingerprint


def test_load_compressor_honours_backbone_and_decoder(compressor, tmp_path):
    from lloco_index.errors import StoreMismatchError
    from tiny_models import tiny_backbone

    directory = compressor.source_dir
    expected = load_compressor(directory).fingerprint
    # The decoder already loaded is reused rather than loaded a second time.
    reused = load_compressor(directory, backbone=compressor.backbone)
    assert reused.backbone is compressor.backbone and reused.fingerprint == expected
    # decoder= reads the decoder from another directory holding the same weights.
    moved = tmp_path / "elsewhere"
    shutil.copytree(directory / "decoder", moved)
    from_moved = load_compressor(directory, decoder=moved)
    assert from_moved.backbone.source_path == str(moved.resolve())
    assert from_moved.fingerprint == expected
    # Another decoder is refused, not silently replaced by the recorded one.
    with pytest.raises(StoreMismatchError, match="was saved with decoder"):
        load_compressor(directory, backbone=tiny_backbone())
    with pytest.raises(ModelNotFoundError, match="has no decoder"):
        load_compressor(directory, decoder=tmp_path / "missing")


def test_decoder_loads_on_its_device_and_leaves_the_cache_alone(compressor, monkeypatch):
    from lloco_index.backbone import Backbone

    monkeypatch.delenv("LLOCO_DEVICE", raising=False)
    directory = compressor.source_dir
    on_meta = AutoCompressor.from_directory(directory, device="meta")
    assert on_meta.backbone.device.type == "meta" and on_meta.embed_summary.weight.device.type == "meta"
    # The CPU copy cached for the same directory is still on the CPU.
    assert Backbone.load(directory / "decoder").device.type == "cpu"
    assert compressor.backbone.device.type == "cpu"


def test_device_default_follows_lloco_device(compressor, monkeypatch):
    monkeypatch.setenv("LLOCO_DEVICE", "meta")
    loaded = AutoCompressor.from_directory(compressor.source_dir)
    assert loaded.backbone.device.type == "meta"
    monkeypatch.setenv("LLOCO_DEVICE", "cpu")
    assert AutoCompressor.from_directory(compressor.source_dir).backbone.device.type == "cpu"
