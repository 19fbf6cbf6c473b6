"""The soft-prompt store behind a storage backend: local directory, fsspec URLs, int8 storage."""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from lloco_index.compressors import ICAECompressor, ICAEConfig, TokenEmbeddingCompressor
from lloco_index.errors import CorruptStoreError, StoreMismatchError, UnknownPlaceholderError
from lloco_index.storage import FsspecBackend, LocalDirectoryBackend, StorageBackend, backend_for
from lloco_index.storage.quantization import INT8_ROWWISE, dequantize_rows, quantize_rows
from lloco_index.store import SoftPromptStore

from helpers import CountingCompressor

fsspec = pytest.importorskip("fsspec", reason="fsspec (extra 'remote') is not installed")

CHUNKS = ["The lighthouse at Alexandria was built around 280 BC.", "Bees make honey from nectar.", "Bicycles have two wheels."]


def small_icae(backbone):
    return ICAECompressor(backbone, ICAEConfig(n_slots=4, segment_length=16, pooling="mean", lora_r=4, lora_alpha=8))


@pytest.fixture(params=["local", "file_url", "memory_url"])
def location(request, tmp_path):
    """A persist_dir: a plain directory, a file:// URL, or an in-memory fsspec bucket."""
    if request.param == "local":
        return tmp_path / "idx"
    if request.param == "file_url":
        return f"file://{tmp_path}/idx"
    return f"memory://bucket-{uuid.uuid4().hex}/idx"


# ------------------------------------------------------------------ backends
@pytest.mark.parametrize("kind", ["local", "file", "memory"])
def test_backend_protocol(kind, tmp_path):
    backend = {
        "local": lambda: LocalDirectoryBackend(tmp_path / "b"),
        "file": lambda: FsspecBackend(f"file://{tmp_path}/b"),
        "memory": lambda: FsspecBackend(f"memory://b-{uuid.uuid4().hex}/root"),
    }[kind]()
    assert isinstance(backend, StorageBackend)
    assert backend.list("shards/") == [] and not backend.exists("store.json")
    backend.write_atomic("store.json", b"{}")
    backend.write_atomic("shards/a.safetensors", b"0123456789")
    backend.write_atomic("shards/a.safetensors", b"abcdefghij")  # replace
    assert backend.read("shards/a.safetensors") == b"abcdefghij"
    assert backend.read_range("shards/a.safetensors", 2, 5) == b"cde"
    assert backend.size("shards/a.safetensors") == 10
    assert backend.list("shards/") == ["shards/a.safetensors"]
    assert backend.list() == ["shards/a.safetensors", "store.json"]
    backend.delete("shards/a.safetensors")
    assert not backend.exists("shards/a.safetensors")
    with pytest.raises(FileNotFoundError):
        backend.read("missing.json")
    assert (backend.local_path("x") is not None) == (kind == "local")


def test_file_url_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the old bytes and no temp file in listings."""
    backend = FsspecBackend(f"file://{tmp_path}/b")
    backend.write_atomic("index.json", b"old")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(backend.fs, "mv", crash)
    with pytest.raises(KeyboardInterrupt):
        backend.write_atomic("index.json", b"new")
    monkeypatch.undo()
    assert backend.read("index.json") == b"old" and backend.list() == ["index.json"]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["index.json"]


def test_backend_for_picks_by_location(tmp_path):
    assert isinstance(backend_for(tmp_path), LocalDirectoryBackend)
    assert isinstance(backend_for(str(tmp_path)), LocalDirectoryBackend)
    assert isinstance(backend_for("memory://x/y"), FsspecBackend)
    ready = LocalDirectoryBackend(tmp_path)
    assert backend_for(ready) is ready


# --------------------------------------------------------------------- store
def test_store_on_any_backend(backbone, location):
    comp = CountingCompressor(small_icae(backbone))
    store = SoftPromptStore.open(location, comp)
    ids = store.add(CHUNKS, comp)
    reopened = SoftPromptStore.open(location, comp)
    assert reopened.ids() == sorted(ids)
    for i in ids:
        torch.testing.assert_close(reopened.get(i), store.get(i), rtol=0, atol=0)
        assert reopened.num_positions(i) == store.get(i).shape[0]
    reopened.add(CHUNKS + ["A new chunk about volcanoes."], comp)
    assert comp.calls == CHUNKS + ["A new chunk about volcanoes."]  # stored chunks are never recomputed
    with pytest.raises(UnknownPlaceholderError, match=str(reopened.location).split("://")[-1][:20]):
        reopened.get("0" * 24)
    with pytest.raises(StoreMismatchError, match="token_embedding"):
        SoftPromptStore.open(location, TokenEmbeddingCompressor(backbone))
    assert reopened.storage_bytes() > 0


def test_file_url_and_directory_are_the_same_store(backbone, tmp_path):
    comp = small_icae(backbone)
    ids = SoftPromptStore.open(f"file://{tmp_path}", comp).add(CHUNKS, comp)
    local = SoftPromptStore.open(tmp_path, comp)  # memory-mapped reads of what fsspec wrote
    remote = SoftPromptStore.open(f"file://{tmp_path}", comp)  # ranged reads
    assert local.path is not None and remote.path is None
    for i in ids:
        assert torch.equal(local.get(i), remote.get(i))


def test_shards_written_without_index_are_adopted(backbone, location):
    """Data-parallel writers only write shards; the owner adopts them."""
    comp = small_icae(backbone)
    owner = SoftPromptStore.open(location, comp)
    worker = SoftPromptStore.open(location, comp)
    ids = [worker.make_id(t) for t in CHUNKS]
    worker.put(dict(zip(ids, comp.compress(CHUNKS))), update_index=False)
    assert len(SoftPromptStore.open(location, comp)) == 3  # opening adopts
    assert owner.adopt_shards() == 3 and sorted(owner.ids()) == sorted(ids)


def test_corrupt_remote_shard_is_named(backbone):
    comp = small_icae(backbone)
    url = f"memory://bucket-{uuid.uuid4().hex}/idx"
    store = SoftPromptStore.open(url, comp)
    a = store.add(["chunk a"], comp)[0]
    b = store.add(["chunk b"], comp)[0]
    backend = store.backend
    name = f"shards/{store._index[b]['shard']}"
    backend.write_atomic(name, backend.read(name)[:40])
    reopened = SoftPromptStore.open(url, comp)
    assert reopened.get(a).shape[0] > 0
    with pytest.raises(CorruptStoreError, match="truncated or corrupt.*delete this file"):
        reopened.get(b)


def test_persist_local_store_to_object_storage(backbone, tmp_path):
    comp = small_icae(backbone)
    memory = SoftPromptStore.for_compressor(comp)
    ids = memory.add(CHUNKS, comp)
    memory.persist(tmp_path)
    url = f"memory://bucket-{uuid.uuid4().hex}/idx"
    SoftPromptStore.open(tmp_path, comp).persist(url)
    remote = SoftPromptStore.open(url, comp)
    for i in ids:
        assert torch.equal(remote.get(i), memory.get(i))


# ---------------------------------------------------------------------- int8
def test_quantize_rows_error_bound():
    torch.manual_seed(0)
    x = torch.randn(32, 576) * torch.logspace(-2, 2, 32)[:, None]  # rows of very different norms
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8 and s.shape == (32,)
    y = dequantize_rows(q, s)
    assert ((y - x).abs() <= s[:, None] / 2 + 1e-6).all()
    assert torch.equal(dequantize_rows(*quantize_rows(torch.zeros(2, 4))), torch.zeros(2, 4))


def test_int8_store(backbone, location):
    comp = small_icae(backbone)
    plain = SoftPromptStore.for_compressor(comp)
    ids = plain.add(CHUNKS, comp)
    store = SoftPromptStore.open(location, comp, quantization=INT8_ROWWISE)
    assert store.add(CHUNKS, comp) == ids  # same content ids with or without int8
    meta = json.loads(store.backend.read("store.json"))
    assert meta["quantization"] == INT8_ROWWISE
    reopened = SoftPromptStore.open(location, comp)  # the scheme comes from store.json
    assert reopened.quantization == INT8_ROWWISE
    for i in ids:
        original, back = plain.get(i), reopened.get(i)
        assert back.dtype == original.dtype == torch.bfloat16 and back.shape == original.shape
        scale = original.float().abs().amax(1, keepdim=True) / 127
        # int8 rounding (<= scale/2) plus bf16 rounding of the result
        assert ((back.float() - original.float()).abs() <= scale / 2 + original.float().abs() / 128 + 1e-6).all()
    unquantized = SoftPromptStore.for_compressor(comp)
    unquantized.add(CHUNKS[:1], comp)
    with pytest.raises(StoreMismatchError, match="stores int8-absmax-row.*unquantized"):
        unquantized.persist(location)  # never mix encodings in one store
    with pytest.raises(ValueError, match="Unknown soft-prompt quantization"):
        SoftPromptStore.open(location, comp, quantization="int4")


def test_open_cannot_switch_an_existing_store_to_int8(backbone, tmp_path):
    comp = small_icae(backbone)
    SoftPromptStore.open(tmp_path, comp).add(CHUNKS[:1], comp)
    with pytest.raises(StoreMismatchError, match="unquantized"):
        SoftPromptStore.open(tmp_path, comp, quantization=INT8_ROWWISE)


def test_int8_halves_bf16_and_quarters_float32_bytes(backbone, tmp_path):
    for comp, expect in [(small_icae(backbone), 0.65), (TokenEmbeddingCompressor(backbone), 0.4)]:
        sizes = {}
        for scheme in (None, INT8_ROWWISE):
            store = SoftPromptStore.open(tmp_path / f"{comp.config.mode}-{scheme}", comp, quantization=scheme)
            store.add([" ".join(CHUNKS * 8)], comp)
            sizes[scheme] = store.storage_bytes()
        # hidden=64 here, so the 4-byte scale per row and the safetensors header weigh more than at 576
        assert sizes[INT8_ROWWISE] < expect * sizes[None], (comp.config.mode, sizes)


def test_in_memory_int8_store_matches_persisted(backbone, tmp_path):
    comp = small_icae(backbone)
    memory = SoftPromptStore.for_compressor(comp, quantization=INT8_ROWWISE)
    ids = memory.add(CHUNKS, comp)
    memory.persist(tmp_path)
    disk = SoftPromptStore.open(tmp_path, comp)
    assert disk.quantization == INT8_ROWWISE
    for i in ids:
        assert torch.equal(disk.get(i), memory.get(i))
