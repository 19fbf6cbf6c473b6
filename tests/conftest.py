"""Shared fixtures. Tiny random models keep unit tests fast; `integration` tests load the real SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lloco_index import defaults

from tiny_models import tiny_backbone


@pytest.fixture
def backbone():
    return tiny_backbone()


@pytest.fixture(scope="session")
def smollm2():
    from lloco_index.backbone import Backbone

    return Backbone.load()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = defaults.data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set {defaults.DATA_DIR_ENV})")
    return path


@pytest.fixture(autouse=True)
def _threads():
    import torch

    torch.set_num_threads(int(os.environ.get("LLOCO_TEST_THREADS", "2")))
    yield


@pytest.fixture
def one_thread(_threads):
    """One torch thread, for modules on tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny matmuls gain nothing from a second thread, and on a busy machine it only spin-waits for a core.
    Set after ``_threads``, which every test runs first."""
    import torch

    torch.set_num_threads(1)
    yield
