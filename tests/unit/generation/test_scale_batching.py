"""Batched generation on the HF backend: same greedy answers as one at a time, correct masks and positions.

Tiny random LLaMA (hidden 64, 2 layers) on the SmolLM2 tokenizer; the
identity compressor makes soft prompts of different lengths, so rows of a
batch really are padded differently.

The model here differs from ``tiny_models.tiny_backbone`` on purpose:
- untied, larger-variance weights: the tied tiny model answers every prompt
  with the same newline token, which would make "same answers" vacuous;
- float64: the reader runs under bf16 autocast, and a random model's
  next-token distribution is nearly flat, so bf16 rounding differences
  between batch shapes flip near-ties after a few tokens. Autocast leaves
  float64 alone, so this compares the batching logic exactly. (On SmolLM2 in
  bf16 the agreement rate is measured by benchmarks/batching.py.)
"""

from __future__ import annotations

import asyncio
import functools

import pytest
import torch
from langchain_core.messages import HumanMessage
from llama_index.core.base.llms.types import ChatMessage, MessageRole

from lloco_index.backbone import Backbone
from lloco_index.compressors import TokenEmbeddingCompressor
from lloco_index.errors import UnknownPlaceholderError
from lloco_index.generation import SoftPromptReader, make_placeholder
from lloco_index.serving.batching import BatchingQueue, generate_prepared_batch, left_pad
from lloco_index.store import SoftPromptStore
from tiny_models import smollm2_tokenizer, tiny_llama

CHUNKS = [
    "The tower was finished in 1889.",
    "Its designer was Gustave Eiffel, an engineer from Dijon who also built railway bridges across France.",
    "Bees make honey.",
    "Lighthouses once burned oil; later ones used electric lamps and Fresnel lenses to reach far out to sea.",
]


def varied_backbone(seed: int = 0) -> Backbone:
    model = tiny_llama(seed, tie_word_embeddings=False, initializer_range=0.2).double()
    return Backbone(model, smollm2_tokenizer(), f"tiny-varied-{seed}")


@functools.lru_cache(maxsize=None)
def _shared_backbone(seed: int) -> Backbone:
    return varied_backbone(seed)  # building one takes seconds on a busy CPU: share it between tests


def make_reader(backbone: Backbone) -> SoftPromptReader:
    comp = TokenEmbeddingCompressor(backbone)
    store = SoftPromptStore(comp.fingerprint)
    ids = [store.make_id(c) for c in CHUNKS]
    store.put(dict(zip(ids, comp.compress(CHUNKS))))
    reader = SoftPromptReader(backbone, store, compressor=comp, max_new_tokens=8)
    reader.ids = ids  # for the tests below
    return reader


@pytest.fixture
def reader():
    return make_reader(_shared_backbone(0))


def _requests(reader) -> list[list[dict]]:
    msgs = [[{"role": "user", "content": f"Context: {make_placeholder(i)}\nQuestion: what is said? " + "Please. " * k}]
            for k, i in enumerate(reader.ids)]
    msgs.append([{"role": "user", "content": "Hello"}])
    msgs.append([{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": "Context: " + " ".join(make_placeholder(i) for i in reader.ids) + "\nQ: all?"}])
    return msgs


def test_left_pad_masks_and_positions(reader):
    prepared = [reader.prepare(m) for m in _requests(reader)[:3]]
    embeds, mask, positions = left_pad(prepared)
    width = max(p.positions for p in prepared)
    assert embeds.shape == (3, width, 64)
    for row, p in enumerate(prepared):
        pad = width - p.positions
        assert mask[row, :pad].sum() == 0 and mask[row, pad:].all()
        assert torch.equal(embeds[row, pad:], p.inputs_embeds[0])
        assert torch.equal(positions[row, pad:], torch.arange(p.positions))


@pytest.mark.parametrize("seed", [0, 1])
def test_generate_batch_equals_one_by_one(seed):
    reader = make_reader(_shared_backbone(seed))
    msgs = _requests(reader)
    single = [reader.generate(m) for m in msgs]
    batched = reader.generate_batch(msgs, batch_size=4)  # two sub-batches, each padded
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.new_tokens for r in batched] == [r.new_tokens for r in single]
    assert [r.prompt.positions for r in batched] == [r.prompt.positions for r in single]
    assert any(r.text for r in single)  # a real comparison, not of empty strings
    assert [r.text for r in reader.batch(msgs[:2])] == [r.text for r in single[:2]]


def test_generate_batch_progress_bar_counts_answers(reader, capsys):
    msgs = _requests(reader)
    quiet = reader.generate_batch(msgs, batch_size=4)
    assert "eval soft" not in capsys.readouterr().err
    shown = reader.generate_batch(msgs, batch_size=4, progress="eval soft")
    err = capsys.readouterr().err
    assert "eval soft" in err and f"{len(msgs)}/{len(msgs)}" in err  # the bar reached every answer
    assert [r.text for r in shown] == [r.text for r in quiet]


def test_comparison_detects_a_wrong_mask(reader, monkeypatch):
    """Control: with pad columns attended to, answers change, so the equality above means something."""
    import lloco_index.serving.batching as batching

    real = batching.left_pad

    def unmasked(prepared):
        embeds, mask, positions = real(prepared)
        return embeds, torch.ones_like(mask), positions

    msgs = _requests(reader)
    single = [reader.generate(m).text for m in msgs]
    monkeypatch.setattr(batching, "left_pad", unmasked)
    assert [r.text for r in reader.generate_batch(msgs, batch_size=len(msgs))] != single


def test_generate_passes_positions_from_the_mask(reader):
    """The prefill forward sees left-padded mask and per-row positions that count real inputs only."""
    msgs = _requests(reader)[:3]
    seen: list[dict] = []

    def hook(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None and not seen:
            seen.append({k: kwargs.get(k) for k in ("attention_mask", "position_ids", "inputs_embeds")})

    handle = reader.backbone.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        reader.generate_batch(msgs, batch_size=3, max_new_tokens=2)
    finally:
        handle.remove()
    prefill = seen[0]
    mask, positions = prefill["attention_mask"], prefill["position_ids"]
    lengths = sorted(reader.prepare(m).positions for m in msgs)  # generate_batch sorts rows by length
    for row, n in enumerate(lengths):
        pad = mask.shape[1] - n
        assert mask[row, :pad].sum() == 0 and mask[row, pad:].all()
        assert torch.equal(positions[row, pad:].cpu(), torch.arange(n))


def test_per_row_limits_and_adapter():
    from peft import LoraConfig

    reader = make_reader(varied_backbone(2))  # its own model: the adapter must not leak into other tests
    backbone = reader.backbone
    backbone.add_adapter("domain", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    msgs = _requests(reader)[:3]
    limits = [3, 8, 5]
    prepared = [reader.prepare(m) for m in msgs]
    batched = generate_prepared_batch(reader, prepared, adapter="domain", max_new_tokens=limits)
    single = [reader.generate(m, adapter="domain", max_new_tokens=n) for m, n in zip(msgs, limits)]
    assert [r.text for r in batched] == [r.text for r in single]
    assert all(r.new_tokens <= n for r, n in zip(batched, limits))
    plain = reader.generate_batch(msgs, adapter=None)
    assert [r.text for r in plain] == [reader.generate(m, adapter=None).text for m in msgs]


async def test_queue_coalesces_async_callers_and_isolates_errors(reader):
    msgs = _requests(reader)
    single = [reader.generate(m).text for m in msgs]
    queue = BatchingQueue(reader, max_batch_size=8, max_wait_s=0.05)
    try:
        bad = [{"role": "user", "content": make_placeholder("deadbeef")}]
        results = await asyncio.gather(*(queue.agenerate(m) for m in msgs + [bad]), return_exceptions=True)
        assert [r.text for r in results[:-1]] == single
        assert isinstance(results[-1], UnknownPlaceholderError)
        assert queue.batches_run < len(msgs)  # shared batches, not one call per request
        # Threads (LangChain's batch() pool) share batches too.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda m: queue.generate(m).text, msgs)) == single
    finally:
        queue.close()


def test_queue_worker_restarts_after_idle(reader):
    queue = BatchingQueue(reader, max_batch_size=4, max_wait_s=0.0, idle_exit_s=0.05)
    msgs = _requests(reader)[:2]
    first = queue.generate(msgs[0], max_new_tokens=2).text
    import time

    deadline = time.monotonic() + 5
    while queue._thread is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert queue._thread is None  # idle: no thread holds the model
    assert queue.generate(msgs[0], max_new_tokens=2).text == first
    queue.close()


async def test_llamaindex_llm_async_batches(reader):
    from lloco_index.llamaindex import LLoCOLLM

    # Prompts built from the store's own ids, not from a retriever.
    llm = LLoCOLLM(reader.compressor, reader.store, max_new_tokens=8, max_batch_size=8, resolve_placeholders="any")
    prompts = [m[-1]["content"] for m in _requests(reader)[:4]]
    expected = [llm.complete(p).text for p in prompts]
    got = await asyncio.gather(*(llm.acomplete(p) for p in prompts))
    assert [r.text for r in got] == expected
    assert llm._batcher.batches_run < len(prompts)
    chat = await llm.achat([ChatMessage(role=MessageRole.USER, content=prompts[0])])
    assert chat.message.content == expected[0]


async def test_langchain_batch_and_abatch(reader):
    from lloco_index.langchain import ChatLLoCO

    # Prompts built from the store's own ids, not from a retriever.
    llm = ChatLLoCO(compressor=reader.compressor, store=reader.store, max_tokens=8, max_batch_size=8,
                    resolve_placeholders="any")
    inputs = [[HumanMessage(m[-1]["content"])] for m in _requests(reader)[:4]]
    expected = [ChatLLoCO(compressor=reader.compressor, store=reader.store, max_tokens=8,
                          resolve_placeholders="any").invoke(i).content for i in inputs]
    assert [m.content for m in await llm.abatch(inputs)] == expected
    assert [m.content for m in llm.batch(inputs, config={"max_concurrency": 4})] == expected
    assert llm._batcher.batches_run < 2 * len(inputs)
    out = (await llm.abatch(inputs[:1]))[0]
    assert out.usage_metadata["input_tokens"] > 0 and out.response_metadata["lloco"]["soft_prompt_ids"]


async def test_async_calls_batch_at_the_default_settings(reader):
    """`asyncio.gather` of 3 queries shares batches without any batching option, with the same answers as one
    call at a time; a reader that batches itself (vLLM) is handed each call as it comes."""
    from lloco_index.langchain import ChatLLoCO
    from lloco_index.llamaindex import LLoCOLLM

    llm = LLoCOLLM(reader.compressor, reader.store, max_new_tokens=8, resolve_placeholders="any")
    prompts = [m[-1]["content"] for m in _requests(reader)[:3]]
    expected = [llm.complete(p).text for p in prompts]
    got = await asyncio.gather(*(llm.acomplete(p) for p in prompts))
    assert [r.text for r in got] == expected
    assert llm._batcher is not None and llm._batcher.batches_run < len(prompts)

    chat = ChatLLoCO(compressor=reader.compressor, store=reader.store, max_tokens=8, resolve_placeholders="any")
    inputs = [[HumanMessage(p)] for p in prompts]
    assert [m.content for m in await chat.abatch(inputs)] == expected
    assert chat._batcher is not None and chat._batcher.batches_run < len(prompts)

    class SelfBatchingReader(SoftPromptReader):
        queue_batching = False

    own = LLoCOLLM(reader.compressor, reader.store, max_new_tokens=8, resolve_placeholders="any")
    own._reader = SelfBatchingReader(reader.backbone, reader.store, compressor=reader.compressor, max_new_tokens=8)
    got = await asyncio.gather(*(own.acomplete(p) for p in prompts))
    assert [r.text for r in got] == expected and own._batcher is None
