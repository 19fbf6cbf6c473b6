"""Core: placeholders, chunking, compressors, the soft-prompt store and the reader (tiny models)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lloco_index.chunking import chunk_text
from lloco_index.compressors import ICAECompressor, ICAEConfig, TokenEmbeddingCompressor, load_compressor
from lloco_index.errors import (
    ContextBudgetError,
    CorruptStoreError,
    EmptyDocumentError,
    StoreMismatchError,
    UnknownPlaceholderError,
)
from lloco_index.generation import SoftPromptReader, SoftPromptRef, find_ids, make_placeholder, split_prompt
from lloco_index.precision import generation_autocast
from lloco_index.store import SoftPromptStore

from helpers import CountingCompressor
from helpers import greedy_plain as _greedy_plain

TEXT = ("The lighthouse at Alexandria was built around 280 BC. It stood for centuries. "
        "Later towers used oil lamps and mirrors to throw light far out to sea. ") * 6


def small_icae(backbone, pooling="mean", n_slots=4, segment_length=16):
    return ICAECompressor(backbone, ICAEConfig(n_slots=n_slots, segment_length=segment_length, pooling=pooling, lora_r=4, lora_alpha=8))


# ------------------------------------------------------------------ placeholders
def test_split_prompt_roundtrip():
    text = f"A {make_placeholder('ab12')} and {make_placeholder('cd_34')} end"
    pieces = split_prompt(text)
    assert pieces == ["A ", "ab12", " and ", "cd_34", " end"]
    assert [type(p) for p in pieces].count(SoftPromptRef) == 2
    assert find_ids(text) == ["ab12", "cd_34"]
    assert split_prompt("<|lloco:|> plain") == ["<|lloco:|> plain"]


# ---------------------------------------------------------------------- chunking
def test_chunks_cover_text_within_limit(backbone):
    chunks = chunk_text(TEXT, backbone.tokenizer, 24)
    assert "".join(c.text for c in chunks) == TEXT
    assert all(0 < c.n_tokens <= 24 for c in chunks)
    assert all(len(backbone.tokenize(c.text)) == c.n_tokens for c in chunks)
    # sentence ends are preferred when one lies in the last quarter of the window
    assert sum(c.text.rstrip().endswith(".") for c in chunks[:-1]) >= len(chunks) // 2


@pytest.mark.parametrize("text", ["x", "héllo 🌍 ünïcödé ∑∫ — 中文", "\u200b\u00a0word"])
def test_chunking_odd_inputs(backbone, text):
    chunks = chunk_text(text, backbone.tokenizer, 4)
    assert "".join(c.text for c in chunks) == text
    assert all(c.n_tokens <= 4 for c in chunks)


def test_chunking_empty_is_empty(backbone):
    assert chunk_text("   \n\t ", backbone.tokenizer, 16) == []


# ------------------------------------------------------------------- compressors
@pytest.mark.parametrize("pooling", ["memory", "mean"])
def test_icae_shapes_and_positions(backbone, pooling):
    comp = small_icae(backbone, pooling)
    short, long = "One short sentence.", TEXT
    outs = comp.compress([short, long])
    n_short = len(backbone.tokenize(short))
    n_long = len(backbone.tokenize(long))
    assert outs[0].shape == (comp.num_positions(n_short), 64)
    assert outs[1].shape == (comp.num_positions(n_long), 64)
    assert outs[1].dtype == torch.bfloat16
    if pooling == "memory":
        assert comp.num_positions(n_long) == 4 * -(-n_long // 16)
    else:
        assert comp.num_positions(16) == 4 and comp.num_positions(5) == 2


def test_batching_does_not_change_vectors(backbone):
    comp = small_icae(backbone, "memory")
    texts = ["alpha beta gamma", TEXT[:100], "a much longer text " * 3]
    together = comp.compress(texts, batch_size=3)
    alone = [comp.compress([t], batch_size=1)[0] for t in texts]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.05)


def test_empty_text_is_refused(backbone):
    comp = small_icae(backbone)
    with pytest.raises(EmptyDocumentError, match="empty"):
        comp.compress(["  \n "])
    assert comp.compress(["x"])[0].shape[0] == 1  # a 1-token text is fine


def test_save_load_roundtrip_and_fingerprint(backbone, tmp_path):
    comp = small_icae(backbone, "memory")
    with torch.no_grad():
        comp.head.memory.add_(0.5)
    comp.invalidate_fingerprint()
    comp.save_pretrained(tmp_path / "c")
    config = json.loads((tmp_path / "c" / "lloco_compressor.json").read_text())
    assert config["mode"] == "icae" and config["base_model"] == "tiny-test" and config["n_slots"] == 4
    other = tiny_backbone_like(backbone)
    loaded = load_compressor(tmp_path / "c", backbone=other)
    assert loaded.fingerprint == comp.fingerprint
    torch.testing.assert_close(loaded.compress([TEXT])[0], comp.compress([TEXT])[0])
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / "c").iterdir())  # no pickle


def tiny_backbone_like(backbone):
    from lloco_index.backbone import Backbone

    from tiny_models import tiny_llama

    return Backbone(tiny_llama(0), backbone.tokenizer, backbone.identity)


def _perturb_lora(backbone, adapter):
    with torch.no_grad():
        for name, p in backbone.peft_model.named_parameters():
            if f".{adapter}." in name and "lora_B" in name:
                p.add_(0.05)


def test_icae_compressors_on_one_backbone_keep_their_own_adapters(backbone, tmp_path):
    import gc

    from peft import LoraConfig

    first, second = small_icae(backbone), small_icae(backbone, pooling="memory")
    assert (first.encoder_adapter, first.reader_adapter_name) == ("lloco_compressor", "lloco_reader")
    assert (second.encoder_adapter, second.reader_adapter_name) == ("lloco_enc_0002", "lloco_rdr_0002")
    before = second.compress([TEXT])[0]
    first_before = first.compress([TEXT])[0]
    _perturb_lora(backbone, first.encoder_adapter)
    first.invalidate_fingerprint()
    assert not torch.allclose(first.compress([TEXT])[0], first_before)
    assert torch.equal(second.compress([TEXT])[0], before)  # untouched by the first compressor's training

    # A reader belongs to its compressor alone, and saved weights do not depend on the adapter names.
    backbone.add_adapter(second.reader_adapter_name, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=False))
    _perturb_lora(backbone, second.encoder_adapter)
    second.invalidate_fingerprint()
    assert first.reader_adapter is None and second.reader_adapter == "lloco_rdr_0002"
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    for saved, directory in ((first, "first"), (second, "second")):
        loaded = load_compressor(tmp_path / directory, backbone=tiny_backbone_like(backbone))
        assert loaded.encoder_adapter == "lloco_compressor" and loaded.fingerprint == saved.fingerprint
        torch.testing.assert_close(loaded.compress([TEXT])[0], saved.compress([TEXT])[0])
    reloaded = load_compressor(tmp_path / "second", backbone=tiny_backbone_like(backbone))
    assert reloaded.reader_adapter == "lloco_reader"
    reader_weights = backbone.adapter_state_dict("lloco_rdr_0002")
    for key, value in reloaded.backbone.adapter_state_dict("lloco_reader").items():
        torch.testing.assert_close(value, reader_weights[key])

    # The name of a compressor that is gone is reused, with fresh weights rather than the old ones.
    fingerprint = first.fingerprint
    del first, saved, loaded
    gc.collect()
    third = small_icae(backbone)
    assert third.encoder_adapter == "lloco_compressor" and third.fingerprint != fingerprint
    assert all(not v.any() for k, v in backbone.adapter_state_dict("lloco_compressor").items() if "lora_B" in k)


def test_compressor_for_other_base_model_is_refused(backbone, tmp_path):
    from tiny_models import tiny_backbone

    small_icae(backbone).save_pretrained(tmp_path / "c")
    with pytest.raises(StoreMismatchError, match="base model 'tiny-test'"):
        load_compressor(tmp_path / "c", backbone=tiny_backbone(identity="another-model"))


def test_corrupt_compressor_weights(backbone, tmp_path):
    from lloco_index.errors import ModelNotFoundError

    small_icae(backbone).save_pretrained(tmp_path / "c")
    (tmp_path / "c" / "compressor.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelNotFoundError, match="corrupt or truncated"):
        load_compressor(tmp_path / "c", backbone=tiny_backbone_like(backbone))
    with pytest.raises(ModelNotFoundError, match="No compressor"):
        load_compressor(tmp_path / "missing", backbone=backbone)


# ------------------------------------------------------------------------- store
def test_store_content_hash_never_recomputes(backbone, tmp_path):
    comp = CountingCompressor(small_icae(backbone))
    store = SoftPromptStore.open(tmp_path, comp)
    ids = store.add(["a b c", "d e f", "a b c"], comp)
    assert ids[0] == ids[2] and len(store) == 2 and comp.calls == ["a b c", "d e f"]
    reopened = SoftPromptStore.open(tmp_path, comp)
    assert reopened.add(["d e f", "g h"], comp)[0] == ids[1]
    assert comp.calls[-1:] == ["g h"]
    torch.testing.assert_close(reopened.get(ids[0]), store.get(ids[0]))
    assert reopened.num_positions(ids[0]) == store.get(ids[0]).shape[0]


def test_store_refuses_other_compressor(backbone, tmp_path):
    comp = small_icae(backbone)
    SoftPromptStore.open(tmp_path, comp).add(["x y"], comp)
    other = TokenEmbeddingCompressor(backbone)
    with pytest.raises(StoreMismatchError) as err:
        SoftPromptStore.open(tmp_path, other)
    assert "mode icae" in str(err.value) and "token_embedding" in str(err.value) and "new persist_dir" in str(err.value)


def test_unknown_id_is_a_clear_error(backbone, tmp_path):
    store = SoftPromptStore.open(tmp_path, small_icae(backbone))
    with pytest.raises(UnknownPlaceholderError, match="Unknown soft-prompt id 'nope'"):
        store.get("nope")


def test_crash_during_shard_write_keeps_previous_state(backbone, tmp_path, monkeypatch):
    comp = small_icae(backbone)
    store = SoftPromptStore.open(tmp_path, comp)
    first = store.add(["first chunk"], comp)
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith(".safetensors"):
            raise KeyboardInterrupt("killed mid-write")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.add(["second chunk"], comp)
    monkeypatch.setattr(os, "replace", real_replace)
    reopened = SoftPromptStore.open(tmp_path, comp)
    assert reopened.ids() == first
    assert not list((tmp_path / "lloco_store" / "shards").glob("*.tmp"))  # temp file cleaned up
    assert len(reopened.add(["second chunk"], comp)) == 1 and len(reopened) == 2  # resumes


def test_crash_between_shard_and_index_adopts_shard(backbone, tmp_path, monkeypatch):
    comp = small_icae(backbone)
    store = SoftPromptStore.open(tmp_path, comp)
    monkeypatch.setattr(SoftPromptStore, "_write_index", lambda self: None)
    ids = store.add(["orphan chunk"], comp)
    monkeypatch.undo()
    reopened = SoftPromptStore.open(tmp_path, comp)
    assert reopened.ids() == ids  # the shard written before the crash is not lost


def test_corrupt_shard_names_file_and_fix_others_survive(backbone, tmp_path):
    comp = small_icae(backbone)
    store = SoftPromptStore.open(tmp_path, comp)
    a = store.add(["chunk a"], comp)[0]
    b = store.add(["chunk b"], comp)[0]
    shard_b = tmp_path / "lloco_store" / "shards" / store._index[b]["shard"]
    shard_b.write_bytes(shard_b.read_bytes()[:40])  # truncated
    reopened = SoftPromptStore.open(tmp_path, comp)
    assert reopened.get(a).shape[0] > 0
    with pytest.raises(CorruptStoreError, match="truncated or corrupt.*delete this file"):
        reopened.get(b)


def test_corrupt_store_json(backbone, tmp_path):
    comp = small_icae(backbone)
    SoftPromptStore.open(tmp_path, comp)
    (tmp_path / "lloco_store" / "store.json").write_text("{not json")
    with pytest.raises(CorruptStoreError, match="store.json is corrupt"):
        SoftPromptStore.open(tmp_path, comp)


def test_in_memory_store_persists(backbone, tmp_path):
    comp = small_icae(backbone)
    store = SoftPromptStore.for_compressor(comp)
    ids = store.add(["in memory"], comp)
    store.persist(tmp_path)
    torch.testing.assert_close(SoftPromptStore.open(tmp_path, comp).get(ids[0]), store.get(ids[0]))


# ------------------------------------------------------------------------ reader
def test_identity_compressor_matches_plain_model(backbone, tmp_path):
    comp = TokenEmbeddingCompressor(backbone)
    store = SoftPromptStore.open(tmp_path, comp)
    chunks = ["The tower was finished in 1889.", "Its designer was Gustave Eiffel."]
    ids = store.add(chunks, comp)
    reader = SoftPromptReader(backbone, store, compressor=comp, max_new_tokens=12)
    content = "Context:\n" + "\n".join(make_placeholder(i) for i in ids) + "\nQuestion: who designed it?"
    result = reader.generate([{"role": "user", "content": content}])
    plain_text = reader.render([{"role": "user", "content": "Context:\n" + "\n".join(chunks) + "\nQuestion: who designed it?"}])
    assert result.text == _greedy_plain(backbone, plain_text, 12)
    assert result.prompt.soft_positions == sum(len(backbone.tokenize(c)) for c in chunks)
    assert "".join(reader.stream([{"role": "user", "content": content}])) .strip() == result.text


def test_reader_errors(backbone, tmp_path):
    comp = small_icae(backbone)
    store = SoftPromptStore.open(tmp_path, comp)
    reader = SoftPromptReader(backbone, store, compressor=comp, max_new_tokens=4)
    with pytest.raises(UnknownPlaceholderError, match="deadbeef"):
        reader.generate([{"role": "user", "content": make_placeholder("deadbeef")}])
    with pytest.raises(ContextBudgetError, match="positions"):
        reader.generate([{"role": "user", "content": "word " * 3000}])


def test_option_scores_read_the_prompt_once_with_the_same_numbers(backbone):
    """The KV-cached scorer gives what a full forward pass over prompt + option gives, option by option."""
    reader = SoftPromptReader(backbone, None, adapter=None)
    messages = [{"role": "user", "content": "Which colour is the sky? (A) blue (B) red"}]
    options = ["(A) blue", "(B) red", "(C) a much longer option text"]
    prepared = reader.prepare(messages)
    table = backbone.embedding_table()
    expected = []
    with torch.inference_mode(), backbone.using(None) as model, generation_autocast(backbone.device):
        for option in options:  # the uncached reference: re-read the whole prompt for every option
            ids = torch.tensor(reader.text_ids(option))
            embeds = torch.cat([prepared.inputs_embeds[0], table(ids)], 0).unsqueeze(0)
            logits = model(inputs_embeds=embeds).logits[0, prepared.positions - 1 : -1].float()
            expected.append(float(torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).mean()))
    cached = reader.score_prepared_options(prepared, options, adapter=None)
    assert cached == pytest.approx(expected, abs=1e-4)
    assert reader.score_options(messages, options, adapter=None) == pytest.approx(cached, abs=1e-6)
    assert reader.score_prepared_options(prepared, ["(A) blue", ""], adapter=None)[1] == float("-inf")


def test_adapter_selection_changes_output(backbone, tmp_path):
    from peft import LoraConfig

    comp = small_icae(backbone)
    backbone.add_adapter("domain", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    reader = SoftPromptReader(backbone, None, compressor=comp, max_new_tokens=1)
    msgs = [{"role": "user", "content": "Hello there"}]
    emb = reader.prepare(msgs).inputs_embeds
    with torch.no_grad(), backbone.using(None) as m:
        base = m(inputs_embeds=emb).logits
    with torch.no_grad(), backbone.using("domain") as m:
        tuned = m(inputs_embeds=emb).logits
    with torch.no_grad(), backbone.using(None) as m:
        again = m(inputs_embeds=emb).logits
    assert not torch.allclose(base, tuned) and torch.equal(base, again)
    with pytest.raises(KeyError, match="not loaded"):
        reader.generate(msgs, adapter="missing")


def test_delete_adapter_frees_the_name(backbone):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    backbone.add_adapter("keep", config)
    backbone.add_adapter("drop", config)
    backbone.delete_adapter("drop")
    assert backbone.adapter_names == ["keep"]
    assert not any(".drop." in n for n, _ in backbone.peft_model.named_parameters())
    with pytest.raises(KeyError, match="not loaded"):
        backbone.delete_adapter("drop")
    backbone.add_adapter("drop", config)  # the name can be used again
    assert set(backbone.adapter_names) == {"keep", "drop"}


def test_huge_input_is_flushed_in_parts_and_resumes(backbone, tmp_path, monkeypatch):
    """A corpus too big for one batch is written shard by shard; a crash keeps what was flushed."""
    comp = CountingCompressor(small_icae(backbone))
    store = SoftPromptStore.open(tmp_path, comp)
    texts = [f"chunk number {i} of a very long document." for i in range(10)]
    real = comp.inner.compress
    calls = {"n": 0}

    def flaky(batch, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("out of memory in the third part")
        return real(batch, **kwargs)

    monkeypatch.setattr(comp.inner, "compress", flaky)
    with pytest.raises(MemoryError):
        store.add(texts, comp, flush_every=4)
    assert len(SoftPromptStore.open(tmp_path, comp)) == 8  # two parts of 4 survived
    monkeypatch.setattr(comp.inner, "compress", real)
    comp.calls.clear()
    SoftPromptStore.open(tmp_path, comp).add(texts, comp, flush_every=4)
    assert comp.calls == texts[8:]  # resumed: only the missing chunks were compressed


def test_missing_model_directory_is_a_clear_error(tmp_path):
    from lloco_index.errors import ModelNotFoundError
    from lloco_index.models import load_decoder

    with pytest.raises(ModelNotFoundError, match="config.json missing"):
        load_decoder(tmp_path / "no-such-model")
