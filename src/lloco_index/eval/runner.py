"""The benchmark runner: every system on the same questions, side by side, resumable.

>>> from lloco_index.eval import run_benchmark
>>> summary = run_benchmark(suite="quick")                                   # a few minutes on a CPU
>>> summary = run_benchmark(suite="full", compressor_dir="runs/compressor", adapter="runs/reader")
>>> summary["table"]                                                          # docs/benchmarks/results-quick.md

Results go to ``<out_dir>/results-<tag>.jsonl`` (one JSON object per question and system, appended
as each finishes; a rerun skips what is there), ``results-<tag>.md`` and ``<tag>-*.png``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .. import defaults
from ..backbone import Backbone
from ..generation import AUTO, SoftPromptReader, make_placeholder
from ..store import SoftPromptStore
from . import datasets as ds
from .metrics import score_prediction
from .peers import LLMLinguaPeer, PeerUnavailable
from .retrieval import ChunkIndex, load_embedder
from ..selection import POLICIES, Candidate, SelectionConfig, expansion_scores, select
from .systems import (
    BASE_SYSTEMS, CHUNK_SEPARATOR, READER_SUFFIX, SYSTEM_CLOSED_BOOK, SYSTEM_FULL, SYSTEM_LLMLINGUA, SYSTEM_LLOCO,
    SYSTEM_RAG, PeakRSS, build_messages, fill_text_budget, option_texts, plan_full_context, timed_generate,
)

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]
ADAPTER_NAME = "bench_reader"
SHORT_ANSWER_TASKS = ("mc", "extractive", "needle")  # answers end at their first line break


# ------------------------------------------------------------------ suites
@dataclass
class SuiteSpec:
    """What a suite reads. ``None`` limits mean everything in the split."""

    squad: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    needle: Optional[dict] = None
    max_new_tokens: int = defaults.DEFAULT_MAX_NEW_TOKENS
    peer_max_examples: Optional[int] = None  # LLMLingua examples per dataset (it takes ~1 min a query on 2 cores)


SUITES: dict[str, SuiteSpec] = {
    # Minutes on a 2-core CPU: one short SQuAD document (its first ~1,000 words and their questions),
    # one QuALITY story and a 2 x 2 needle grid; LLMLingua on the first example of each set.
    "quick": SuiteSpec(
        squad=dict(max_documents=1, max_questions=3, max_document_words=1000),
        quality=dict(max_documents=1, max_questions=1),
        needle=dict(lengths=[512, 1024], depths=[0.25, 0.75]),
        max_new_tokens=32,
        peer_max_examples=1,
    ),
    # The real run: the test splits whole, needles from 1k to 32k tokens (past SmolLM2's 8k window).
    "full": SuiteSpec(
        squad=dict(max_documents=None, max_questions=10),
        quality=dict(max_documents=None, max_questions=None),
        needle=dict(lengths=[1024, 2048, 4096, 8192, 16384, 32768], depths=[0.0, 0.25, 0.5, 0.75, 1.0]),
        max_new_tokens=defaults.DEFAULT_MAX_NEW_TOKENS,
    ),
}


def load_suite(suite: Union[str, SuiteSpec], data_dir: Optional[PathLike], tokenizer,
               datasets: Optional[Sequence[str]] = None) -> list[ds.Benchmark]:
    spec = SUITES[suite] if isinstance(suite, str) else suite
    root = Path(data_dir) if data_dir is not None else defaults.data_dir()
    wanted = set(datasets) if datasets else {"squad", "quality", "needle"}
    out = []
    if "squad" in wanted and spec.squad is not None:
        out.append(ds.load_squad(root / "squad" / "test.json", **spec.squad))
    if "quality" in wanted and spec.quality is not None:
        out.append(ds.load_quality(root / "quality" / "test.jsonl", **spec.quality))
    if "needle" in wanted and spec.needle is not None:
        out.append(ds.needle_in_a_haystack(root / "needle" / "paul_graham_essays", tokenizer, **spec.needle))
    return out


# ------------------------------------------------------------ compressors
@dataclass
class CompressorEntry:
    label: str
    compressor: object
    note: str = ""

    @property
    def fingerprint(self) -> str:
        return self.compressor.fingerprint


def resolve_compressors(specs: Sequence[str], backbone: Backbone) -> list[CompressorEntry]:
    """Build compressors from specs: a directory, ``default`` (the shipped one), ``token_embedding``
    (the identity reference) or ``icae-untrained`` (fresh ICAE weights, seed 0: a control, not a result)."""
    from ..compressors import ICAECompressor, ICAEConfig, TokenEmbeddingCompressor, default_compressor, load_compressor

    entries: list[CompressorEntry] = []
    for spec in specs:
        if spec == "token_embedding":
            entries.append(CompressorEntry("token_embedding", TokenEmbeddingCompressor(backbone),
                                           "identity reference: soft prompt = the chunk's own token embeddings (1x)"))
            continue
        if spec == "icae-untrained":
            torch.manual_seed(0)  # reproducible fingerprint, so a resumed run finds its own results
            compressor = ICAECompressor(backbone, ICAEConfig())
            note = "UNTRAINED ICAE (random memory tokens, zero LoRA): a control; its answers are meaningless"
            label = "icae-untrained"
        elif spec == "default":
            compressor, notice = default_compressor(backbone)
            if notice is not None:
                if "token_embedding" in specs:  # the fallback is the identity reference itself: run it once
                    continue
                entries.append(CompressorEntry("token_embedding", compressor, notice))
                continue
            note = f"loaded from {defaults.default_compressor_dir()}"
            label = f"{compressor.config.mode}:{defaults.default_compressor_dir().name}"
        else:
            directory = Path(spec)
            compressor = load_compressor(directory, backbone=backbone)
            note = f"loaded from {directory}"
            label = f"{compressor.config.mode}:{directory.name}"
        entries.append(CompressorEntry(label, compressor, note))
    return entries


def default_compressor_specs(compressor_dir: Optional[PathLike]) -> tuple[list[str], str]:
    """The compressor under test plus the identity reference, and a note on which was chosen and why."""
    if compressor_dir is not None:
        return [str(compressor_dir), "token_embedding"], f"compressor from {compressor_dir}"
    # Without a shipped compressor, "default" resolves to the identity reference (default_compressor).
    return ["default", "token_embedding"], "the shipped default compressor"


# ---------------------------------------------------------------- results
class ResultLog:
    """Append-only JSONL of per-question and per-document records; the keys of done work survive restarts."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        self.records.append(json.loads(line))
                    except json.JSONDecodeError:
                        logger.warning("skipping a torn line in %s (an interrupted write)", path)
        self.answers = {self.key(r): r for r in self.records if r.get("type") == "question"}
        self.done = set(self.answers)
        self.documents = {(r["dataset"], r["document_id"], r["fingerprint"]): r for r in self.records if r.get("type") == "document"}

    @staticmethod
    def key(record: dict) -> tuple:
        # The fingerprint and adapter are part of the key: a retrained compressor is a new system.
        return (record["dataset"], record["example_id"], record["system"], record.get("fingerprint"), record.get("adapter_path"))

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)
        if record.get("type") == "question":
            self.done.add(self.key(record))
            self.answers[self.key(record)] = record
        elif record.get("type") == "document":
            self.documents[(record["dataset"], record["document_id"], record["fingerprint"])] = record


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processor": platform.processor()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["loadavg_1m_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    from ..models import select_device
    from ..precision import machine_block

    info.update(machine_block(select_device()))
    return info


# ----------------------------------------------------------------- runner
@dataclass
class _System:
    name: str
    kind: str
    entry: Optional[CompressorEntry] = None
    adapter: Optional[str] = None  # name of a loaded peft adapter (None: the compressor's own reader, if any)
    adapter_path: Optional[str] = None
    expand_top_k: int = 0  # lloco systems: retrieved chunks read as text (selective expansion); 0: soft only
    policy: str = defaults.DEFAULT_EXPANSION_POLICY  # hybrid systems: which chunks the selection expands
    top_k: Optional[int] = None  # rag systems: chunks retrieved (None: the run's top_k)
    cut_to: Optional["_System"] = None  # rag systems: read as many positions as this system did on the same question
    text_reader: Optional[CompressorEntry] = None  # text systems: read with this compressor's reader adapter

    def key(self, dataset: str, example_id: str) -> tuple:
        return (dataset, example_id, self.name, self.entry.fingerprint if self.entry else None, self.adapter_path)


def build_plan(systems: Sequence[str], entries: Sequence[CompressorEntry], *, expand_top_k: Sequence[int] = (),
               rag_top_k: Sequence[int] = (), rag_cut: bool = False, same_reader: bool = False,
               policies: Sequence[str] = ()) -> list[_System]:
    """The systems of a run, in the order they answer each question (no adapter systems: the caller adds those).

    ``policies`` are the expansion policies each ``hybrid<n>`` runs with (default: the package's one); with more
    than one, each hybrid is named ``hybrid<n>-<policy>``.

    ``rag_top_k`` adds text RAG on the best ``n`` chunks (``rag_top<n>``); ``rag_cut`` adds, for each hybrid, text
    RAG cut to the positions that hybrid read on the same question (``rag_cut<n>``, after the hybrids, whose
    answers it needs); ``same_reader`` makes every text system read with the reader adapter of the compressor
    under test (``entries[0]``), as the lloco systems do, so that the adapter is not what tells them apart.
    """
    for n in [*expand_top_k, *rag_top_k]:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"--expand-top-k and --rag-top-k take whole numbers >= 1, got {n!r}.")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"Unknown expansion policies {unknown}: use {', '.join(POLICIES)}.")
    policies = list(dict.fromkeys(policies)) or [defaults.DEFAULT_EXPANSION_POLICY]
    if rag_top_k and SYSTEM_RAG not in systems:
        raise ValueError("--rag-top-k adds text RAG systems: add rag to --systems.")
    if rag_cut and (SYSTEM_RAG not in systems or SYSTEM_LLOCO not in systems or not expand_top_k):
        raise ValueError("--rag-cut cuts text RAG to each hybrid's positions: it needs rag and lloco in --systems "
                         "and at least one --expand-top-k value.")
    reader = None
    if same_reader:
        reader = entries[0]
        if getattr(reader.compressor, "reader_adapter", None) is None:
            raise ValueError(f"--same-reader: compressor {reader.label} ships no reader adapter, so the text systems "
                             f"have none to share; drop --same-reader or pass a compressor directory with a reader/.")
    suffix = READER_SUFFIX if reader is not None else ""
    plan: list[_System] = []
    hybrids: dict[int, _System] = {}
    for name in systems:
        if name == SYSTEM_LLOCO:
            for entry in entries:
                plan.append(_System(f"lloco[{entry.label}]", SYSTEM_LLOCO, entry))
                for k in expand_top_k:
                    for policy in policies:
                        name = f"hybrid{k}" + (f"-{policy}" if len(policies) > 1 else "")
                        plan.append(_System(f"{name}[{entry.label}]", SYSTEM_LLOCO, entry, expand_top_k=k, policy=policy))
                        hybrids.setdefault(k, plan[-1])  # the compressor under test's hybrid (entries[0], first policy)
        elif name in (SYSTEM_CLOSED_BOOK, SYSTEM_FULL, SYSTEM_RAG):
            plan.append(_System(name + suffix, name, text_reader=reader))
            if name == SYSTEM_RAG:
                plan += [_System(f"rag_top{n}{suffix}", SYSTEM_RAG, top_k=n, text_reader=reader)
                         for n in rag_top_k]
        else:
            plan.append(_System(name, name))
    if rag_cut:
        plan += [_System(f"rag_cut{k}{suffix}", SYSTEM_RAG, cut_to=hybrid, text_reader=reader)
                 for k, hybrid in hybrids.items()]
    return plan


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_benchmark(
    suite: Union[str, SuiteSpec] = "quick",
    data_dir: Optional[PathLike] = None,
    out_dir: PathLike = "docs/benchmarks",
    compressor_dir: Optional[PathLike] = None,
    adapter: Optional[PathLike] = None,
    *,
    compressors: Optional[Sequence[str]] = None,
    systems: Optional[Sequence[str]] = None,
    datasets: Optional[Sequence[str]] = None,
    backbone: Optional[Backbone] = None,
    decoder: Optional[PathLike] = None,
    embedder=None,
    top_k: int = defaults.DEFAULT_TOP_K,
    max_new_tokens: Optional[int] = None,
    llmlingua_rate: Optional[float] = None,
    peer_max_examples: Optional[int] = -1,
    tag: Optional[str] = None,
    expand_top_k: Sequence[int] = (),
    rag_top_k: Sequence[int] = (),
    rag_cut: bool = False,
    same_reader: bool = False,
    policies: Sequence[str] = (),
    progress: bool = True,
    report: bool = True,
) -> dict:
    """Run ``suite`` for every system and write results, a markdown table and plots to ``out_dir``.

    Systems: ``closed_book``, ``full_context``, ``rag``, ``llmlingua`` (skipped, with the reason, when
    its environment is missing), ``lloco`` (one per compressor, no adapter) and, when ``adapter`` is
    a peft adapter directory, ``lloco+adapter`` for the compressor under test. RAG, LLMLingua and
    lloco share one retriever and ``top_k``; LLMLingua compresses the retrieved text to
    ``llmlingua_rate`` (default: the compressor under test's slots / segment length).
    ``peer_max_examples=-1`` takes the suite's own limit; ``None`` runs the peer everywhere.
    Each value ``n`` in ``expand_top_k`` adds ``hybrid<n>`` systems beside each lloco system: the same soft
    prompts with ``n`` chunks read as text, chosen by each of ``policies`` (:mod:`lloco_index.selection`). ``rag_top_k``,
    ``rag_cut`` and ``same_reader`` add and change the text systems as :func:`build_plan` says.
    Returns a summary dict with the output paths and the run's notes.
    """
    spec = SUITES[suite] if isinstance(suite, str) else suite
    tag = tag or (suite if isinstance(suite, str) else "custom")
    out_dir = Path(out_dir)
    max_new_tokens = max_new_tokens or spec.max_new_tokens
    peer_limit = spec.peer_max_examples if peer_max_examples == -1 else peer_max_examples
    systems = list(systems) if systems else list(BASE_SYSTEMS)
    unknown = set(systems) - set(BASE_SYSTEMS)
    if unknown:
        raise ValueError(f"Unknown systems {sorted(unknown)}; choose from {list(BASE_SYSTEMS)}.")

    backbone = backbone or Backbone.load(decoder)
    if compressors is None:
        compressors, compressor_note = default_compressor_specs(compressor_dir)
    else:
        compressor_note = f"compressors as asked: {list(compressors)}"
    entries = resolve_compressors(compressors, backbone)
    primary = entries[0]
    segment = primary.compressor.segment_length
    if any(e.compressor.segment_length != segment for e in entries):
        raise ValueError("All compressors in one run must share a segment length: one retriever serves them all.")
    rate = llmlingua_rate or primary.compressor.n_slots / segment
    if rate >= 1.0:
        rate = defaults.DEFAULT_N_SLOTS / defaults.DEFAULT_SEGMENT_LENGTH

    plan = build_plan(systems, entries, expand_top_k=expand_top_k, rag_top_k=rag_top_k, rag_cut=rag_cut,
                      same_reader=same_reader, policies=policies)
    if adapter is not None and SYSTEM_LLOCO in systems:
        adapter_entry = _adapter_entry(Path(adapter), entries)
        backbone.load_adapter(adapter, ADAPTER_NAME)
        extra = [_System(f"lloco+adapter[{adapter_entry.label}]", SYSTEM_LLOCO, adapter_entry, ADAPTER_NAME, str(adapter))]
        extra += [_System(f"hybrid{k}+adapter[{adapter_entry.label}]", SYSTEM_LLOCO, adapter_entry, ADAPTER_NAME,
                          str(adapter), expand_top_k=k) for k in expand_top_k]
        cuts = [i for i, s in enumerate(plan) if s.cut_to is not None]
        at = cuts[0] if cuts else len(plan)  # before the cut baselines, which come last
        plan[at:at] = extra

    benchmarks = load_suite(spec, data_dir, backbone.tokenizer, datasets)
    log = ResultLog(out_dir / f"results-{tag}.jsonl")
    notes = [compressor_note] + [n for b in benchmarks for n in b.notes]
    skipped: dict[str, str] = {}
    run_record = {
        "type": "run", "time": _now(), "suite": tag, "decoder": backbone.identity, "machine": machine_info(),
        "compressors": [{"label": e.label, "fingerprint": e.fingerprint, "mode": e.compressor.config.mode,
                         "n_slots": e.compressor.n_slots, "segment_length": e.compressor.segment_length, "note": e.note}
                        for e in entries],
        "adapter": str(adapter) if adapter else None, "systems": [s.name for s in plan], "top_k": top_k,
        "max_new_tokens": max_new_tokens, "llmlingua_rate": rate, "peer_max_examples": peer_limit,
        "context_window": backbone.context_window, "notes": notes,
        "text_reader": next((s.text_reader.label for s in plan if s.text_reader is not None), None),
    }

    readers = {None: SoftPromptReader(backbone, None, adapter=None, max_new_tokens=max_new_tokens)}
    embedder = embedder or load_embedder()
    peer: Optional[LLMLinguaPeer] = None
    if SYSTEM_LLMLINGUA in systems:
        try:
            peer = LLMLinguaPeer.start()
            run_record["llmlingua"] = peer.info
        except PeerUnavailable as exc:
            skipped[SYSTEM_LLMLINGUA] = str(exc)
            plan = [s for s in plan if s.kind != SYSTEM_LLMLINGUA]
            print(f"[lloco-index bench] skipping llmlingua: {exc}")
    run_record["skipped"] = skipped
    log.append(run_record)
    for note in notes:
        print(f"[lloco-index bench] {note}")

    total = sum(len(b.examples) for b in benchmarks) * len(plan)
    bar = tqdm(total=total, desc=f"bench {tag}", unit="answer", disable=not progress)
    try:
        for bench in benchmarks:
            peer_done = 0
            for doc_id, examples in bench.by_document().items():
                pending = [(ex, s) for ex in examples for s in plan if s.key(bench.name, ex.id) not in log.done]
                bar.update(len(examples) * len(plan) - len(pending))
                if not pending:
                    peer_done += len(examples)
                    continue
                document = bench.documents[doc_id]
                state = _DocumentState(bench, document, backbone, embedder, segment)
                for ex in examples:
                    for system in plan:
                        if system.key(bench.name, ex.id) in log.done:
                            continue
                        if system.kind == SYSTEM_LLMLINGUA and peer_limit is not None and peer_done >= peer_limit:
                            bar.update(1)
                            continue
                        record = _answer(system, bench, ex, state, readers, log, peer, top_k, max_new_tokens, rate)
                        log.append(record)
                        bar.update(1)
                    peer_done += 1
    finally:
        bar.close()
        if peer is not None:
            peer.close()
    summary = {"results": str(log.path), "notes": notes, "skipped": skipped, "systems": [s.name for s in plan]}
    if report:
        from .report import write_report

        summary.update(write_report(log.path, out_dir, tag))
    return summary


def _adapter_entry(path: Path, entries: list[CompressorEntry]) -> CompressorEntry:
    """The compressor an adapter was finetuned for (its metadata's fingerprint), else the one under test."""
    meta_path = path / defaults.ADAPTER_METADATA_NAME
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        wanted = meta.get("compressor_fingerprint") or meta.get("fingerprint")
        for entry in entries:
            if wanted and entry.fingerprint == wanted:
                return entry
        if wanted:
            raise ValueError(f"Adapter {path} was finetuned for compressor {wanted}, which is not in this run "
                             f"({[e.fingerprint for e in entries]}); pass its compressor with --compressor-dir.")
    return entries[0]


class _DocumentState:
    """Per-document, one-off work shared by all its questions: the chunk index and each compressor's soft prompts."""

    def __init__(self, bench: ds.Benchmark, document: ds.Document, backbone: Backbone, embedder, segment: int):
        self.bench = bench
        self.document = document
        self.backbone = backbone
        self.embedder = embedder
        self.segment = segment
        self._index: Optional[ChunkIndex] = None
        self._stores: dict[str, tuple[SoftPromptStore, list[str]]] = {}
        self._doc_tokens: Optional[int] = None

    @property
    def document_tokens(self) -> int:
        if self._doc_tokens is None:
            self._doc_tokens = len(self.backbone.tokenize(self.document.text))
        return self._doc_tokens

    @property
    def index(self) -> ChunkIndex:
        if self._index is None:
            self._index = ChunkIndex.build(self.document.text, self.backbone.tokenizer, chunk_tokens=self.segment, embedder=self.embedder)
        return self._index

    def soft_prompts(self, entry: CompressorEntry, log: ResultLog) -> tuple[SoftPromptStore, list[str]]:
        """Compress every chunk of the document once (timed: the one-off cost the break-even is about)."""
        if entry.label not in self._stores:
            chunks = self.index.chunks
            store = SoftPromptStore.for_compressor(entry.compressor)
            start = time.perf_counter()
            prompts = entry.compressor.compress(chunks)
            compress_s = time.perf_counter() - start
            ids = [store.make_id(c) for c in chunks]
            store.put(dict(zip(ids, prompts)))
            self._stores[entry.label] = (store, ids)
            key = (self.bench.name, self.document.id, entry.fingerprint)
            if key not in log.documents:
                log.append({
                    "type": "document", "dataset": self.bench.name, "document_id": self.document.id,
                    "compressor": entry.label, "fingerprint": entry.fingerprint, "chunks": len(chunks),
                    "source_tokens": self.document_tokens, "soft_positions": int(sum(p.shape[0] for p in prompts)),
                    "compress_s": compress_s, "index_s": self.index.build_s,
                    "store_bytes": int(sum(p.numel() * p.element_size() for p in prompts)), "time": _now(),
                })
        return self._stores[entry.label]


def _expand(index, question: str, top_k: int, system: _System, backbone, store, ids,
            reader=None) -> tuple[list[int], set[int]]:
    """The selection policy on one document's chunks: (chunks in reading order, the ones read as text)."""
    rows, scores = index.search_scored(question, top_k)
    candidates = [Candidate(id=ids[r], doc_id="document", chunk=r, score=s, soft_positions=store.num_positions(ids[r]),
                            text_positions=len(backbone.tokenize(index.chunks[r])), text=index.chunks[r])
                  for r, s in zip(rows, scores)]
    config = SelectionConfig(top_k=top_k, expand_top_k=system.expand_top_k, position_budget=None, policy=system.policy)
    ranking = expansion_scores(system.policy, question, candidates, reader=reader)
    picked = select(candidates, config, expansion_scores=ranking)
    return [p.candidate.chunk for p in picked], {p.candidate.chunk for p in picked if p.expanded}


def _answer(system: _System, bench: ds.Benchmark, ex: ds.Example, state: _DocumentState, readers: dict,
            log: ResultLog, peer: Optional[LLMLinguaPeer], top_k: int, max_new_tokens: int, rate: float) -> dict:
    backbone = state.backbone
    record: dict = {
        "type": "question", "dataset": bench.name, "task": ex.task, "example_id": ex.id, "document_id": ex.document_id,
        "system": system.name, "system_kind": system.kind, "question": ex.question, "answers": ex.answers,
        "gold_letter": ex.gold_letter, "document_tokens": state.document_tokens, "metadata": ex.metadata,
        "compressor": system.entry.label if system.entry else None,
        "fingerprint": system.entry.fingerprint if system.entry else None, "adapter_path": system.adapter_path,
    }
    latency = {"retrieve_s": 0.0, "compress_s": 0.0}
    reader = readers[None]
    adapter = None
    if system.text_reader is not None:
        key = ("text", system.text_reader.label)
        if key not in readers:  # no store: text only, read with the compressor's reader adapter (AUTO)
            readers[key] = SoftPromptReader(backbone, None, compressor=system.text_reader.compressor, adapter=AUTO,
                                            max_new_tokens=max_new_tokens)
        reader, adapter = readers[key], AUTO
        record["adapter_used"] = reader.resolve_adapter(adapter)
    with PeakRSS() as memory:
        if system.kind == SYSTEM_CLOSED_BOOK:
            context = None
            record["source_tokens"] = 0
        elif system.kind == SYSTEM_FULL:
            plan = plan_full_context(reader, ex, state.document.text, max_new_tokens=max_new_tokens)
            context = plan.text
            record.update(source_tokens=plan.kept_tokens, truncated=plan.truncated)
        else:
            index = state.index  # built once per document, outside the query's latency
            if system.kind == SYSTEM_LLOCO:
                store, ids = state.soft_prompts(system.entry, log)  # one-off compression, outside the latency too
                key = (system.entry.label, system.adapter)
                if key not in readers:
                    # No explicit adapter: the compressor's own reader adapter when it ships one (AUTO).
                    readers[key] = SoftPromptReader(backbone, store, compressor=system.entry.compressor,
                                                    adapter=system.adapter or AUTO, max_new_tokens=max_new_tokens)
                reader = readers[key]
                reader.store = store  # the document's soft prompts (the likelihood policy reads them too)
                adapter = system.adapter or AUTO
            start = time.perf_counter()
            hits, expanded = index.search(ex.question, system.top_k or top_k), set()
            if system.cut_to is not None:
                rows, _ = index.search_scored(ex.question, system.top_k or top_k)  # best first: the order they fill
            if system.expand_top_k:
                hits, expanded = _expand(index, ex.question, top_k, system, backbone, store, ids, reader)
                record["policy"] = system.policy
            latency["retrieve_s"] = time.perf_counter() - start
            chunks = [index.chunks[i] for i in hits]
            record["retrieved"] = hits
            record["source_tokens"] = sum(len(backbone.tokenize(c)) for c in chunks)
            if system.kind == SYSTEM_RAG and system.cut_to is not None:
                target = log.answers.get(system.cut_to.key(bench.name, ex.id))
                if target is None:
                    raise RuntimeError(f"{system.name} reads as many positions as {system.cut_to.name} did on the same "
                                       f"question, but {system.cut_to.name} has no answer for {ex.id} in {log.path}.")
                overhead = reader.count_positions(reader.render(build_messages(ex, "")))
                cut = fill_text_budget(backbone.tokenizer, [(r, index.chunks[r]) for r in rows],
                                       max(target["positions"] - overhead, 0))
                context = cut.text
                record["retrieved"] = cut.chunks
                record["source_tokens"] = cut.kept_tokens
                record["cut_to"] = {"system": system.cut_to.name, "positions": target["positions"],
                                    "budget_tokens": cut.budget, "whole_chunks": cut.whole}
            elif system.kind == SYSTEM_RAG:
                context = CHUNK_SEPARATOR.join(chunks)
            elif system.kind == SYSTEM_LLMLINGUA:
                out = peer.compress(chunks, question=ex.question, rate=rate)
                latency["compress_s"] = float(out["compress_s"])  # LLMLingua recompresses on every query
                context = out["compressed_prompt"]
                record["llmlingua"] = {k: out.get(k) for k in ("origin_tokens", "compressed_tokens", "peak_rss_mb")}
                record["llmlingua"]["rate"] = rate
            else:
                context = CHUNK_SEPARATOR.join(index.chunks[i] if i in expanded else make_placeholder(ids[i]) for i in hits)
                record["expanded"] = sorted(expanded)
                record["adapter_used"] = reader.resolve_adapter(adapter)
        messages = build_messages(ex, context)
        generated, prepared = timed_generate(reader, messages, adapter=adapter, max_new_tokens=max_new_tokens,
                                             stop_at_line_end=ex.task in SHORT_ANSWER_TASKS)
    latency.update({k: generated.pop(k) for k in ("assemble_s", "prefill_s", "decode_s")})
    latency["total_s"] = sum(latency.values())
    record.update(generated)
    record["latency"] = latency
    record["memory"] = memory.as_record()
    option_scores = None
    if ex.options:
        start = time.perf_counter()
        option_scores = reader.score_prepared_options(prepared, option_texts(ex), adapter=adapter)
        record["score_s"] = time.perf_counter() - start  # evaluation only, not part of the query latency
        record["option_scores"] = option_scores
    record["scores"] = score_prediction(ex.task, record["prediction"], answers=ex.answers, gold_letter=ex.gold_letter,
                                        option_scores=option_scores, gold_index=ex.gold_index)
    record["time"] = _now()
    record["loadavg_1m"] = os.getloadavg()[0]  # other work on the machine skews latencies: keep the evidence
    return record
