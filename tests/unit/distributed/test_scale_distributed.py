"""Data-parallel compression with Ray Data on a local Ray instance (2 CPUs).

Skipped, with the reason shown, when Ray is not installed (extra ``distributed``).
"""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'lloco-index[distributed]'")

from lloco_index.backbone import Backbone  # noqa: E402
from lloco_index.compressors import ICAECompressor, ICAEConfig  # noqa: E402
from lloco_index.distributed import CompressorSpec, compress_with_ray  # noqa: E402
from lloco_index.store import SoftPromptStore  # noqa: E402
from tiny_models import smollm2_tokenizer, tiny_llama  # noqa: E402

TEXTS = [f"Chunk {i}: the {w} crossed the river at dawn and counted {i * 7} stones." for i, w in
         enumerate(["fox", "heron", "boat", "train", "cart", "child", "dog", "ferry", "kite", "bee", "ox", "owl"])]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def saved_compressor(tmp_path_factory):
    """A tiny decoder and an ICAE compressor saved to directories, as workers on a cluster would read them."""
    root = tmp_path_factory.mktemp("ray-models")
    decoder_dir, compressor_dir = root / "decoder", root / "compressor"
    tiny_llama().save_pretrained(decoder_dir)
    smollm2_tokenizer().save_pretrained(decoder_dir)
    backbone = Backbone.load(decoder_dir)  # identity derived from the directory, as the workers will derive it
    ICAECompressor(backbone, ICAEConfig(n_slots=4, segment_length=16, pooling="memory", lora_r=4, lora_alpha=8)
                   ).save_pretrained(compressor_dir)
    return CompressorSpec(compressor_dir=compressor_dir, decoder=decoder_dir, threads=1)


def test_ray_compression_matches_local_and_resumes(local_ray, saved_compressor, tmp_path):
    spec = saved_compressor
    persist = tmp_path / "index"
    first = compress_with_ray(TEXTS[:6], persist, spec, num_workers=2, batch_size=2)
    assert (first.computed, first.skipped) == (6, 0)

    local = spec.build()
    store = SoftPromptStore.open(persist, local)
    assert sorted(store.ids()) == sorted(set(first.ids))
    expected = local.compress(TEXTS[:6])
    for prompt_id, want in zip(first.ids, expected):
        torch.testing.assert_close(store.get(prompt_id), want, atol=2e-2, rtol=2e-2)  # bf16, other batch shapes

    # A run killed after its workers wrote shards but before the driver indexed them: shards are on disk only.
    orphan = SoftPromptStore.open(persist, local)
    orphan.put({orphan.make_id(t): p for t, p in zip(TEXTS[6:8], local.compress(TEXTS[6:8]))}, update_index=False)

    second = compress_with_ray(TEXTS + TEXTS[:2], persist, spec, num_workers=2, batch_size=2,
                               description=None)
    assert (second.computed, second.skipped) == (4, 8)  # only the 4 chunks nobody had written
    final = SoftPromptStore.open(persist, local)
    assert len(final) == 12 and second.ids[:12] == [final.make_id(t) for t in TEXTS]
    assert second.ids[12:] == second.ids[:2]  # repeated texts share their content id


def test_ray_compression_into_object_storage_url(local_ray, saved_compressor, tmp_path):
    """Workers write shards through fsspec; a file:// URL stands in for a bucket every worker can reach."""
    pytest.importorskip("fsspec")
    url = f"file://{tmp_path}/bucket/index"
    result = compress_with_ray(TEXTS[:4], url, saved_compressor, num_workers=2, batch_size=1, quantization="int8-absmax-row")
    assert result.computed == 4
    store = SoftPromptStore.open(url)
    assert store.quantization == "int8-absmax-row" and sorted(store.ids()) == sorted(result.ids)
    assert store.get(result.ids[0]).shape == (4 * -(-len(saved_compressor.build().backbone.tokenize(TEXTS[0])) // 16), 64)
