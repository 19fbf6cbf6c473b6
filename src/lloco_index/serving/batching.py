"""Batched greedy generation on the Hugging Face backend, and a queue that forms batches.

One decoder step costs about the same for 1 or 8 sequences on a small model
(the weights are read once per step either way), so answering several
queries in one ``generate`` call multiplies throughput. Prompts of different
lengths are LEFT-padded, so that every row's last prompt position is the
last column and new tokens are appended in lock-step:

    row 0:  [pad pad e0 e1 e2 e3]  attention_mask [0 0 1 1 1 1]  positions [0 0 0 1 2 3]
    row 1:  [f0  f1  f2 f3 f4 f5]  attention_mask [1 1 1 1 1 1]  positions [0 1 2 3 4 5]

Pad columns are masked out of attention, and each row's positions count
only its real inputs (``cumsum(mask) - 1``), so each row sees exactly what
it would see alone.

>>> from lloco_index.serving.batching import generate_prepared_batch
>>> results = reader.generate_batch([msgs_a, msgs_b, msgs_c], adapter=None, max_new_tokens=32)
>>> queue = BatchingQueue(reader, max_batch_size=8)          # coalesce concurrent callers
>>> result = await queue.agenerate(msgs_a)                    # or queue.generate(msgs_a) from threads
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue as queue_module
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from .. import defaults
from ..precision import generation_autocast
from ..prompt_types import GenerationResult, Message, PreparedPrompt

if TYPE_CHECKING:  # pragma: no cover - the reader calls into this module; only its type is named here
    from ..generation import SoftPromptReader

DEFAULT_MAX_BATCH_SIZE = defaults.DEFAULT_MAX_BATCH_SIZE


def left_pad(prepared: Sequence["PreparedPrompt"]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack prompts of different lengths: ``(inputs_embeds, attention_mask, position_ids)``, left-padded.

    Pad columns hold zero vectors; they are never attended to, so their value
    does not matter, but zeros keep them finite.
    """
    if not prepared:
        raise ValueError("left_pad needs at least one prompt")
    first = prepared[0].inputs_embeds
    width = max(p.inputs_embeds.shape[1] for p in prepared)
    embeds = first.new_zeros((len(prepared), width, first.shape[-1]))
    mask = torch.zeros((len(prepared), width), dtype=torch.long, device=first.device)
    for row, p in enumerate(prepared):
        n = p.inputs_embeds.shape[1]
        embeds[row, width - n :] = p.inputs_embeds[0]
        mask[row, width - n :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return embeds, mask, positions


class _PerRowLimit:
    """A stopping criterion that ends each row after its own ``max_new_tokens``.

    Requests with different limits share one batch; a finished row only
    receives pad tokens afterwards, and the batch ends when every row is done.
    """

    def __init__(self, limits: Sequence[int], device: torch.device):
        self.limits = torch.tensor(list(limits), dtype=torch.long, device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        # With inputs_embeds, generate()'s input_ids hold only the new tokens (no prompt ids).
        return input_ids.shape[1] >= self.limits


def generate_prepared_batch(
    reader: "SoftPromptReader",
    prepared: Sequence["PreparedPrompt"],
    *,
    adapter: Optional[str],
    max_new_tokens: Sequence[int],
) -> list["GenerationResult"]:
    """Greedy-decode already prepared prompts in ONE ``generate`` call (same adapter for all rows).

    ``adapter`` is the resolved adapter name (or ``None``). Each row stops at
    its own ``max_new_tokens`` or at EOS; the texts equal what
    :meth:`SoftPromptReader.generate` gives for each prompt alone (up to
    bf16 rounding differences between batch shapes, which do not change
    greedy answers in practice; the tests check equality).
    """
    from transformers import StoppingCriteriaList

    start = time.perf_counter()
    limits = [int(n) for n in max_new_tokens]
    embeds, mask, positions = left_pad(prepared)
    kwargs = reader.generate_kwargs(prepared[0], max(limits))  # the reader's own greedy/eos/pad settings
    kwargs.update(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max(limits))
    # generate() derives the same position ids from the left-padded mask (cumsum - 1) and extends them per
    # step; passing them explicitly is not portable across transformers 4.56-5.x (4.x would not extend them).
    criteria = StoppingCriteriaList([_PerRowLimit(limits, embeds.device)])
    with torch.inference_mode(), reader.backbone.using(adapter) as model, generation_autocast(reader.backbone.device):
        out = model.generate(**kwargs, stopping_criteria=criteria)
    elapsed = time.perf_counter() - start
    eos = kwargs.get("eos_token_id") or []
    eos_set = set(eos if isinstance(eos, (list, tuple)) else [eos])
    tok = reader.backbone.tokenizer
    results = []
    for row, p in enumerate(prepared):
        new = out[row, : limits[row]].tolist()
        # Up to and including the first EOS, as generate() returns for one prompt; later columns are padding.
        for i, token in enumerate(new):
            if token in eos_set:
                new = new[: i + 1]
                break
        text = tok.decode(new, skip_special_tokens=True)
        results.append(GenerationResult(text=text.strip(), prompt=p, new_tokens=len(new), total_s=elapsed))
    return results


def generate_batch(
    reader: "SoftPromptReader",
    messages_list: Sequence[Sequence["Message"]],
    *,
    adapter: Optional[str],
    max_new_tokens: Optional[int] = None,
    batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    progress: Union[bool, str] = False,
) -> list["GenerationResult"]:
    """Answer many message lists; prompts are sorted by length into sub-batches of ``batch_size``.

    Sorting keeps rows of similar length together, so little compute goes to
    padding. Results come back in input order. Errors of any prompt (unknown
    placeholder, context budget) raise before anything is generated.
    ``progress`` shows a bar per answer (a string names it).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    limit = max_new_tokens or reader.max_new_tokens
    resolved = reader.resolve_adapter(adapter)
    prepared = [reader.prepare(m, max_new_tokens=limit) for m in messages_list]
    order = sorted(range(len(prepared)), key=lambda i: prepared[i].positions)
    results: list[Optional["GenerationResult"]] = [None] * len(prepared)
    desc = progress if isinstance(progress, str) else "answering"
    with tqdm(total=len(order), desc=desc, unit="answer", disable=not progress) as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = generate_prepared_batch(reader, [prepared[i] for i in idx], adapter=resolved,
                                            max_new_tokens=[limit] * len(idx))
            for i, r in zip(idx, batch):
                results[i] = r
            bar.update(len(idx))
    return results  # type: ignore[return-value]


@dataclass
class _Request:
    messages: Sequence["Message"]
    adapter: Optional[str]  # resolved
    max_new_tokens: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    prepared: Optional["PreparedPrompt"] = None


class BatchingQueue:
    """Coalesce concurrent generation requests into batched ``generate`` calls.

    Callers in any thread or event loop submit a request; one worker thread
    takes the first waiting request, waits at most ``max_wait_s`` for more
    (up to ``max_batch_size``), groups them by adapter and answers each group
    with one batched call. A request whose prompt is invalid fails alone.

    >>> q = BatchingQueue(reader, max_batch_size=8, max_wait_s=0.005)
    >>> answers = await asyncio.gather(*(q.agenerate(m) for m in many_messages))
    >>> q.generate(messages)          # blocking, from any thread (LangChain's batch() thread pool)
    >>> q.close()
    """

    def __init__(self, reader: "SoftPromptReader", *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_wait_s: float = 0.005, idle_exit_s: float = 10.0):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.reader = reader
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        # The worker thread ends after this long without requests and is restarted by the next one, so an
        # idle queue holds no thread (and no thread keeps the model alive after its owner is dropped).
        self.idle_exit_s = idle_exit_s
        self.batches_run = 0  # observability: how many generate() calls answered the requests
        self._queue: "queue_module.Queue[Optional[_Request]]" = queue_module.Queue()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    # -------------------------------------------------------------- submit
    def submit(self, messages: Sequence["Message"], *, adapter: Optional[str] = "auto",
               max_new_tokens: Optional[int] = None) -> concurrent.futures.Future:
        """Queue one request; the future resolves to a :class:`GenerationResult`."""
        if self._closed:
            raise RuntimeError("BatchingQueue is closed")
        request = _Request(list(messages), self.reader.resolve_adapter(adapter),
                           int(max_new_tokens or self.reader.max_new_tokens))
        with self._lock:  # paired with the worker's idle exit: a queued request always has a live worker
            self._queue.put(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lloco-batching", daemon=True)
                self._thread.start()
        return request.future

    def generate(self, messages: Sequence["Message"], **kwargs) -> "GenerationResult":
        """Blocking submit-and-wait (use from worker threads; concurrent callers share batches)."""
        return self.submit(messages, **kwargs).result()

    async def agenerate(self, messages: Sequence["Message"], **kwargs) -> "GenerationResult":
        """Awaitable submit: the event loop stays free while the batch runs in the worker thread."""
        return await asyncio.wrap_future(self.submit(messages, **kwargs))

    def close(self) -> None:
        """Stop the worker after the queued requests are answered."""
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join()

    # -------------------------------------------------------------- worker
    def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=max(timeout, 0)) if timeout > 0 else self._queue.get_nowait()
            except queue_module.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                first = self._queue.get(timeout=self.idle_exit_s)
            except queue_module.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            if first is None:
                break
            batch, stop = self._collect(first)
            ready: list[_Request] = []
            for request in batch:
                if not request.future.set_running_or_notify_cancel():
                    continue
                try:
                    request.prepared = self.reader.prepare(request.messages, max_new_tokens=request.max_new_tokens)
                    ready.append(request)
                except BaseException as exc:  # this request's own error (unknown id, budget): it fails alone
                    request.future.set_exception(exc)
            groups: dict[Optional[str], list[_Request]] = {}
            for request in ready:
                groups.setdefault(request.adapter, []).append(request)
            for adapter, group in groups.items():
                group.sort(key=lambda r: r.prepared.positions)
                try:
                    results = generate_prepared_batch(self.reader, [r.prepared for r in group], adapter=adapter,
                                                      max_new_tokens=[r.max_new_tokens for r in group])
                    self.batches_run += 1
                except BaseException as exc:  # e.g. an adapter that is not loaded: the whole group fails
                    for r in group:
                        r.future.set_exception(exc)
                    continue
                for r, result in zip(group, results):
                    r.future.set_result(result)
