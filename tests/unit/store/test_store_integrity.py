"""The soft-prompt store under damage: deleted, flipped and foreign shards, a lost store.json, interruptions."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lloco_index.compressors import ICAECompressor, ICAEConfig, TokenEmbeddingCompressor
from lloco_index.errors import CorruptStoreError, StoreMismatchError
from lloco_index.store import SoftPromptStore

from helpers import CountingCompressor

TEXTS = [f"chunk number {i}: the lighthouse keeper wrote {i * 7} lines in the log." for i in range(10)]


@pytest.fixture
def comp(backbone):
    return ICAECompressor(backbone, ICAEConfig(n_slots=4, segment_length=16, pooling="mean", lora_r=4, lora_alpha=8))


def shards(tmp_path):
    return sorted((tmp_path / "lloco_store" / "shards").glob("*.safetensors"))


def test_deleted_shards_are_recomputed_by_the_rerun(comp, tmp_path):
    store = SoftPromptStore.open(tmp_path, comp)
    ids = store.add(TEXTS, comp)
    before = {i: store.get(i).clone() for i in ids}
    for f in shards(tmp_path):
        f.unlink()
    counting = CountingCompressor(comp)
    reopened = SoftPromptStore.open(tmp_path, counting)
    assert len(reopened) == 0  # nothing claims to be stored that is not
    assert reopened.add(TEXTS, counting) == ids
    assert counting.calls == TEXTS  # all recomputed
    again = SoftPromptStore.open(tmp_path, comp)
    for i in ids:
        torch.testing.assert_close(again.get(i), before[i])


def test_one_deleted_shard_recomputes_only_its_chunks(comp, tmp_path):
    store = SoftPromptStore.open(tmp_path, comp)
    store.add(TEXTS[:4], comp)
    store.add(TEXTS[4:], comp)
    newest = max(shards(tmp_path), key=lambda f: len(json.loads(f.read_bytes()[8:8 + int.from_bytes(f.read_bytes()[:8], "little")])))
    held = sum(1 for e in store._index.values() if e["shard"] == newest.name)
    newest.unlink()
    counting = CountingCompressor(comp)
    SoftPromptStore.open(tmp_path, counting).add(TEXTS, counting)
    assert len(counting.calls) == held


def test_flipped_bytes_are_detected_and_the_rerun_repairs(comp, tmp_path, caplog):
    store = SoftPromptStore.open(tmp_path, comp)
    ids = store.add(TEXTS, comp)
    good = {i: store.get(i).clone() for i in ids}
    [shard] = shards(tmp_path)
    raw = bytearray(shard.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    for pos in range(header_end, len(raw), 997):  # the data section: the header still parses
        raw[pos] ^= 0xFF
    shard.write_bytes(bytes(raw))
    damaged = SoftPromptStore.open(tmp_path, comp)
    failures = 0
    for i in ids:
        try:
            damaged.get(i)
        except CorruptStoreError as exc:
            assert "does not match its recorded sha256" in str(exc) and "delete this file" in str(exc)
            failures += 1
    assert failures >= 3  # every entry that a flipped byte landed in
    counting = CountingCompressor(comp)
    with caplog.at_level(logging.WARNING, logger="lloco_index.store"):
        SoftPromptStore.open(tmp_path, counting).add(TEXTS, counting)
    assert len(counting.calls) == failures and "recomputed" in caplog.text
    repaired = SoftPromptStore.open(tmp_path, comp)
    for i in ids:
        torch.testing.assert_close(repaired.get(i), good[i])


def test_truncated_shard_is_recomputed_by_the_rerun(comp, tmp_path):
    store = SoftPromptStore.open(tmp_path, comp)
    store.add(TEXTS, comp)
    [shard] = shards(tmp_path)
    shard.write_bytes(shard.read_bytes()[:40])
    counting = CountingCompressor(comp)
    SoftPromptStore.open(tmp_path, counting).add(TEXTS, counting)
    assert counting.calls == TEXTS


def test_shard_of_another_compressor_is_refused(comp, backbone, tmp_path):
    SoftPromptStore.open(tmp_path, comp).add(TEXTS[:2], comp)
    other = TokenEmbeddingCompressor(backbone)
    SoftPromptStore.open(tmp_path / "other", other).add(TEXTS[5:], other)
    [foreign] = shards(tmp_path / "other")
    (tmp_path / "lloco_store" / "shards" / foreign.name).write_bytes(foreign.read_bytes())
    with pytest.raises(StoreMismatchError, match=r"holds soft prompts of compressor token_embedding-.*move it out of shards/"):
        SoftPromptStore.open(tmp_path, comp)


def test_missing_store_json_keeps_the_index(comp, tmp_path):
    store = SoftPromptStore.open(tmp_path, comp)
    ids = store.add(TEXTS[:3], comp)
    (tmp_path / "lloco_store" / "store.json").unlink()
    with pytest.raises(CorruptStoreError, match="left untouched"):
        SoftPromptStore.open(tmp_path)
    assert set(json.loads((tmp_path / "lloco_store" / "index.json").read_text())) == set(ids)
    reopened = SoftPromptStore.open(tmp_path, comp)  # the compressor that wrote it restores store.json
    assert reopened.ids() == sorted(ids) and SoftPromptStore.open(tmp_path).ids() == sorted(ids)


def test_missing_store_json_with_another_compressor_is_refused(comp, backbone, tmp_path):
    SoftPromptStore.open(tmp_path, comp).add(TEXTS[:3], comp)
    (tmp_path / "lloco_store" / "store.json").unlink()
    with pytest.raises(StoreMismatchError):
        SoftPromptStore.open(tmp_path, TokenEmbeddingCompressor(backbone))
    assert not (tmp_path / "lloco_store" / "store.json").exists()


def test_finished_chunks_reach_disk_within_seconds(comp, tmp_path):
    """Flushing by time: a kill loses at most one flush interval, however small the corpus."""
    on_disk = []
    counting = CountingCompressor(comp, on_call=lambda n: on_disk.append(len(SoftPromptStore.open(tmp_path))))
    SoftPromptStore.open(tmp_path, comp).add(TEXTS, counting, batch_size=2, flush_seconds=0.0)
    assert on_disk == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, MemoryError])
def test_interruption_keeps_every_finished_chunk(comp, tmp_path, exc):
    counting = CountingCompressor(comp, fail_on_call=4, exc=exc)
    with pytest.raises(exc):
        SoftPromptStore.open(tmp_path, comp).add(TEXTS, counting, batch_size=2)
    assert len(SoftPromptStore.open(tmp_path, comp)) == 6
    rerun = CountingCompressor(comp)
    SoftPromptStore.open(tmp_path, comp).add(TEXTS, rerun)
    assert rerun.calls == TEXTS[6:]
