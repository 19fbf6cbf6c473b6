"""Data-parallel compression with Ray Data, into the same content-addressed soft-prompt store.

A corpus too large for one process is compressed by a pool of worker
actors, each holding ONE compressor (one model load per worker, not per
batch): ``Dataset.map_batches(_CompressWorker, ...)`` with an actor pool of
``num_workers``. Workers write shards straight into the store (a local
directory every worker can reach, or object storage through an fsspec URL)
and never touch ``index.json``, so they cannot race on it; the driver adopts
the new shards into the index at the end.

Resumable: chunk ids are content hashes, and the driver skips every id the
store already holds, including those in shards left by a run that was
killed before it could update the index (opening the store adopts them).
Re-running the same call after a crash computes only what is missing.

>>> from lloco_index.distributed import compress_with_ray, CompressorSpec
>>> ray.init()                                      # or ray.init(address="auto") on a cluster
>>> spec = CompressorSpec("runs/compressor")        # each worker loads the compressor from this directory
>>> result = compress_with_ray(chunks, "s3://bucket/index", spec, num_workers=8, num_gpus_per_worker=1)
>>> result.computed, result.skipped, result.ids[:2]

Needs the ``distributed`` extra (``pip install 'lloco-index[distributed]'``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from ..store import SoftPromptStore, content_id


@dataclass
class CompressorSpec:
    """How a worker builds its compressor: a saved compressor directory (and decoder), or a factory.

    A directory is the usual choice (workers on other machines need a path
    they can read: shared disk, or a copy baked into the worker image). A
    ``factory`` must be picklable (a module-level function) and deterministic:
    every worker must build the same weights, or their fingerprints differ.
    """

    compressor_dir: Optional[Union[str, Path]] = None
    decoder: Optional[Union[str, Path]] = None  # local decoder dir for compressors of non-default decoders
    factory: Optional[Callable[[], Any]] = None
    device: Optional[str] = None  # None: "cuda" when the worker has a GPU, else "cpu"
    threads: Optional[int] = None  # torch threads per worker (default: its CPU share)

    def build(self):
        import torch

        from ..compressors import load_compressor

        if self.threads:
            torch.set_num_threads(self.threads)
        if self.factory is not None:
            compressor = self.factory()
        else:
            compressor = load_compressor(self.compressor_dir, decoder=self.decoder)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device != "cpu":
            # bf16 weights on GPU: half the memory and the tensor-core path; soft prompts are stored in the
            # compressor's storage dtype either way.
            compressor.backbone.base_model.to(device=device, dtype=torch.bfloat16)
        return compressor


@dataclass
class CompressorDescription:
    """What the driver needs to create or check the store, without loading the model itself."""

    fingerprint: str
    info: dict[str, Any]


def _describe(spec: CompressorSpec) -> CompressorDescription:
    compressor = spec.build()
    store = SoftPromptStore.for_compressor(compressor)
    return CompressorDescription(compressor.fingerprint, store.compressor_info)


class _CompressWorker:
    """One Ray actor: loads the compressor once, compresses batches, writes one shard per batch."""

    def __init__(self, spec: CompressorSpec, persist_dir: str, storage_options: Optional[dict[str, Any]]):
        self.compressor = spec.build()
        self.store = SoftPromptStore.open(persist_dir, storage_options=storage_options)
        self.store.check_compressor(self.compressor)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        ids = [str(i) for i in batch["id"]]
        texts = [str(t) for t in batch["text"]]
        start = time.perf_counter()
        prompts = self.compressor.compress(texts)
        # Shard only: the driver updates index.json once, so workers never overwrite each other's entries.
        shard = self.store.put(dict(zip(ids, prompts)), update_index=False)
        seconds = time.perf_counter() - start
        return {"id": ids, "shard": [shard or ""] * len(ids), "positions": [int(p.shape[0]) for p in prompts],
                "seconds": [seconds / max(len(ids), 1)] * len(ids)}


@dataclass
class RayCompressionResult:
    ids: list[str]  # one per input text, in order (content ids: equal texts share one)
    computed: int  # chunks compressed by this run
    skipped: int  # chunks already in the store (this or an earlier, possibly interrupted, run)
    seconds: float  # wall time of the distributed stage (model loads included)
    num_workers: int
    store: SoftPromptStore = field(repr=False)

    @property
    def chunks_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


def compress_with_ray(
    texts: Sequence[str],
    persist_dir: Union[str, Path],
    spec: CompressorSpec,
    *,
    num_workers: int = 2,
    batch_size: int = 16,
    num_cpus_per_worker: float = 1,
    num_gpus_per_worker: Optional[float] = None,
    quantization: Optional[str] = None,
    storage_options: Optional[dict[str, Any]] = None,
    description: Optional[CompressorDescription] = None,
) -> RayCompressionResult:
    """Compress ``texts`` into the store at ``persist_dir`` with ``num_workers`` Ray actors.

    ``persist_dir`` must be reachable by every worker (same machine, shared
    disk, or an fsspec URL). ``num_gpus_per_worker`` defaults to 1 when the
    Ray cluster has GPUs, else 0. ``description`` (fingerprint and store
    info) saves the one extra model load that otherwise runs in a Ray task.
    Uses the running Ray instance (``ray.init()`` first; one is started
    locally if none is).
    """
    try:
        import ray
    except ImportError as exc:
        raise ImportError("compress_with_ray needs Ray Data: pip install 'lloco-index[distributed]'") from exc

    if not ray.is_initialized():
        ray.init()
    if num_gpus_per_worker is None:
        num_gpus_per_worker = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    persist_dir = str(persist_dir)

    if description is None:
        # Where the workers run (a GPU node, say), not on the driver, which may have neither the memory nor the GPU.
        describe = ray.remote(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker)(_describe)
        description = ray.get(describe.remote(spec))
    store = _open_or_create(persist_dir, description, quantization, storage_options)

    ids = [content_id(description.fingerprint, t) for t in texts]
    todo: dict[str, str] = {}
    for prompt_id, text in zip(ids, texts):
        if prompt_id not in store and prompt_id not in todo:
            todo[prompt_id] = text
    unique = len(set(ids))
    start = time.perf_counter()
    if todo:
        # Blocks made on the driver (no task): enough for every worker to get batches. A repartition() here
        # would need CPUs of its own, and deadlocks when the actor pool holds every CPU (as on a 2-CPU node).
        dataset = ray.data.from_items([{"id": k, "text": v} for k, v in todo.items()],
                                      override_num_blocks=max(1, min(len(todo), num_workers * 4)))
        out = dataset.map_batches(
            _CompressWorker,
            fn_constructor_kwargs={"spec": spec, "persist_dir": persist_dir, "storage_options": storage_options},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_workers),
            num_cpus=num_cpus_per_worker,
            num_gpus=num_gpus_per_worker,
        )
        rows = out.take_all()
        missing = set(todo) - {r["id"] for r in rows}
        if missing:
            raise RuntimeError(f"{len(missing)} chunks came back without a soft prompt; run again to resume.")
    seconds = time.perf_counter() - start
    store.adopt_shards()  # one index update, by the driver only
    return RayCompressionResult(ids=ids, computed=len(todo), skipped=unique - len(todo), seconds=seconds,
                                num_workers=num_workers, store=store)


def _open_or_create(persist_dir: str, description: CompressorDescription, quantization: Optional[str],
                    storage_options: Optional[dict[str, Any]]) -> SoftPromptStore:
    from ..errors import StoreMismatchError
    from ..storage.backends import backend_for

    backend = backend_for(SoftPromptStore.store_dir(persist_dir), **(storage_options or {}))
    if not backend.exists("store.json"):
        # What SoftPromptStore.open(persist_dir, compressor) does, from the description instead of a loaded model.
        store = SoftPromptStore(description.fingerprint, compressor_info=description.info, backend=backend,
                                quantization=quantization)
        store._write_meta()
        store._write_index()
        return store
    store = SoftPromptStore.open(persist_dir, quantization=quantization, storage_options=storage_options)
    if store.fingerprint != description.fingerprint:
        raise StoreMismatchError(
            f"The soft-prompt store at '{store.location}' was written by compressor {store.fingerprint}, but the "
            f"workers' compressor is {description.fingerprint}. Compress into a new persist_dir."
        )
    return store
