"""GPU path choices that can be checked on any machine, and the ones that need a GPU (skipped visibly)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lloco_index.gpu import faiss_gpu_count, to_gpu_if_available
from lloco_index.models import select_device, select_dtype


def test_cpu_defaults_unchanged(monkeypatch):
    monkeypatch.delenv("LLOCO_DEVICE", raising=False)
    if not torch.cuda.is_available():
        assert select_device() == torch.device("cpu")
    assert select_dtype("cpu") == torch.float32  # CPU: float32 weights + bf16 autocast, as before
    assert select_dtype("cpu", torch.bfloat16) == torch.bfloat16
    monkeypatch.setenv("LLOCO_DEVICE", "cpu")
    assert select_device() == torch.device("cpu")
    assert select_device("cuda:1") == torch.device("cuda:1")


def test_faiss_index_without_gpu_is_unchanged():
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexFlatIP(8)
    index.add(np.eye(8, dtype="float32"))
    moved = to_gpu_if_available(index)
    if faiss_gpu_count() == 0:
        assert moved is index
    scores, ids = moved.search(np.eye(8, dtype="float32")[:2], 1)
    assert ids[:, 0].tolist() == [0, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_gpu_defaults_are_bf16(monkeypatch):
    monkeypatch.delenv("LLOCO_DEVICE", raising=False)
    assert select_device().type == "cuda"
    from lloco_index.backbone import Backbone

    weights = next(Backbone.load().base_model.parameters())
    # bf16 from Ampere (compute capability 8) on, fp16 before it.
    assert weights.device.type == "cuda"
    assert weights.dtype == (torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16)
