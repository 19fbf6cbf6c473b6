"""Shared helpers for the LangChain tests: a tiny random LLaMA on the SmolLM2 tokenizer.

Plain functions cached per process (not pytest fixtures) because the
langchain-tests standard suites read their model parameters from class
properties, which cannot request fixtures. Import them from test modules.

Unlike ``tiny_models.tiny_llama`` the output head is untied, so that special
and whitespace-only tokens can be made ungeneratable (the standard suites
require non-empty answers) without touching the input embeddings.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

import torch

from tiny_models import smollm2_tokenizer, tiny_llama

CORPUS = [
    ("The Eiffel Tower was completed in 1889 for the World's Fair in Paris. It is 330 metres tall and was "
     "designed by the engineering company of Gustave Eiffel. ") * 3,
    "Mount Fuji is the highest mountain in Japan, at 3,776 metres. It is an active volcano that last erupted in 1707.",
    "The Great Wall of China is a series of fortifications built over many centuries to protect Chinese states.",
    "Photosynthesis converts light energy into chemical energy; plants store it as sugars made from water and CO2.",
    "The Amazon river carries more water than any other river and flows through Brazil, Peru and Colombia.",
    "Alan Turing proposed a test for machine intelligence in 1950 and worked on breaking the Enigma cipher.",
]
METADATAS = [{"source": f"doc{i}.txt"} for i in range(len(CORPUS))]


@functools.lru_cache(maxsize=None)
def _never_generate_ids() -> tuple[int, ...]:
    # Specials and whitespace-only tokens: a random model that picked one of them would answer "" (stripped),
    # and the standard suites require non-empty answers.
    tokenizer = smollm2_tokenizer()
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    return tuple(i for i, t in enumerate(vocab) if i in special or not tokenizer.convert_tokens_to_string([t]).strip())


def make_tiny_backbone(seed: int = 0, identity: str = "tiny-test"):
    """A 2-layer, 64-wide random LLaMA wrapped as a Backbone (fast enough for many generations)."""
    from lloco_index.backbone import Backbone

    tokenizer = smollm2_tokenizer()
    model = tiny_llama(seed, tie_word_embeddings=False)
    with torch.no_grad():
        # Zero logits for these tokens: the rest (random, ~N(0, 0.16)) always has a positive maximum.
        model.lm_head.weight[list(_never_generate_ids())] = 0.0
    return Backbone(model, tokenizer, identity=identity)


@functools.lru_cache(maxsize=None)
def tiny_backbone():
    return make_tiny_backbone()


@functools.lru_cache(maxsize=None)
def tiny_compressor():
    """Identity compressor on the tiny backbone, 64-token segments (so the first document makes several chunks)."""
    from lloco_index.compressors import TokenEmbeddingCompressor, TokenEmbeddingConfig

    return TokenEmbeddingCompressor(tiny_backbone(), TokenEmbeddingConfig(segment_length=64))


@functools.lru_cache(maxsize=None)
def tiny_chunk_index():
    """The CORPUS compressed and indexed in memory (shared, read-only: tests must not add to it)."""
    from lloco_index.langchain import ChunkIndex

    index = ChunkIndex.create(tiny_compressor())
    index.add_texts([t for t in CORPUS], METADATAS)
    return index


def scratch_dir(prefix: str = "lloco-lc-") -> str:
    """A temporary directory removed at exit (for class-level setups where tmp_path is unavailable)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def mark_async_tests(cls: type) -> type:
    """Class decorator: give the inherited ``async def`` standard tests the ``asyncio`` mark.

    pytest-asyncio runs in strict mode unless the project sets ``asyncio_mode = "auto"``; the
    langchain-tests suites do not mark their async tests. Marking stores the mark on the inherited
    function object itself, so the suites' "no overridden standard tests" check still sees the
    original functions. Harmless (a no-op) once ``asyncio_mode = "auto"`` is configured.
    """
    import inspect

    import pytest

    for name in dir(cls):
        function = getattr(cls, name)
        if name.startswith("test_") and inspect.iscoroutinefunction(function):
            marks = getattr(function, "pytestmark", [])
            if not any(mark.name == "asyncio" for mark in marks):
                pytest.mark.asyncio(function)
    return cls
