"""A small dense index over compressed chunks: sentence-transformers + faiss (:mod:`lloco_index.vectors`), no framework.

:class:`ChunkIndex` is what :class:`~lloco_index.langchain.LLoCOLangChainRetriever`
searches. It keeps, for every chunk, the text (what the embedder sees and
what a user reads), the document it came from, its position in that document
and its soft-prompt id in a :class:`~lloco_index.store.SoftPromptStore`.

Layout inside ``persist_dir`` (beside the store and, if any, a LlamaIndex
StorageContext)::

    persist_dir/lloco_store/...                         soft prompts (SoftPromptStore)
    persist_dir/lloco_index.json                        which compressor/decoder made them
    persist_dir/lloco_langchain/chunks.json             chunk texts + metadata (the commit point)
    persist_dir/lloco_langchain/embeddings-<hash>.npy   their normalised embeddings

Writes are crash-safe: soft prompts first, then a new embeddings file under a
fresh name, then ``chunks.json`` (atomic rename) naming that file; only then
is the previous embeddings file removed. A crash at any point leaves the
previous ``chunks.json`` and the file it names intact.

>>> index = ChunkIndex.create(compressor, persist_dir="./storage")
>>> index.add_texts(["A long report ...", "Another one ..."], [{"source": "a.txt"}, {"source": "b.txt"}])
>>> [(hit.record.chunk, hit.score) for hit in index.search("what does the report say?", k=2)]
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence, Union

import numpy as np

from .. import defaults
from ..chunking import chunk_text
from ..fileio import atomic_write_bytes, read_json
from ..errors import CorruptStoreError, EmptyDocumentError, StoreMismatchError
from ..selection import Candidate, SelectionConfig, expansion_scores, select
from ..store import SoftPromptStore
from ..vectors import DenseIndex, Embedder, as_embedder
from .. import manifest

logger = logging.getLogger(__name__)

SUBDIR = "lloco_langchain"
CHUNKS_FILE = "chunks.json"
FORMAT_VERSION = 1
OnEmpty = Literal["error", "warn", "skip"]


# -------------------------------------------------------------------- records
@dataclass
class ChunkRecord:
    """One compressed chunk: what the retriever returns for it."""

    soft_prompt_id: str
    text: str
    doc_id: str
    chunk: int  # position of the chunk within its document (reading order)
    positions: int  # decoder positions its soft prompt takes
    start_char: int = 0
    end_char: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)  # the document's own metadata
    text_positions: int = 0  # decoder positions of the text (0: not recorded; estimated from its length)

    def text_cost(self) -> int:
        return self.text_positions or len(self.text) // 4 + 1


@dataclass
class SearchHit:
    record: ChunkRecord
    score: float
    expanded: bool = False  # the selection policy put this chunk in as its text


def _doc_id(text: str, metadata: dict[str, Any], explicit: Optional[str]) -> str:
    """The caller's id, else one from common metadata keys, else a content hash (same text -> same doc)."""
    for candidate in (explicit, metadata.get("doc_id"), metadata.get("id")):
        if candidate not in (None, ""):
            return str(candidate)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def select_chunks(hits: Iterable[SearchHit], config: SelectionConfig, store: Optional[SoftPromptStore] = None,
                  query: Optional[str] = None, *, reader: Any = None) -> list[SearchHit]:
    """:func:`lloco_index.selection.select` on search hits: dedupe, expand (``config.policy`` ranks the chunks
    for ``query``), fit the budget, reading order."""
    candidates = [Candidate(id=h.record.soft_prompt_id, doc_id=h.record.doc_id, chunk=h.record.chunk, score=h.score,
                            soft_positions=h.record.positions if store is None or h.record.soft_prompt_id in store else None,
                            text_positions=h.record.text_cost() if h.record.text.strip() else None, item=h,
                            text=h.record.text)
                  for h in hits]
    ranking = expansion_scores(config.policy, query, candidates, reader=reader) if config.expand_top_k else None
    return [SearchHit(s.candidate.item.record, s.candidate.item.score, s.expanded)
            for s in select(candidates, config, expansion_scores=ranking)]


# ---------------------------------------------------------------------- index
class ChunkIndex:
    """Compressed chunks of a corpus, searchable by dense similarity.

    Build with :meth:`create` + :meth:`add_texts`, reopen with :meth:`load`.
    Without ``persist_dir`` everything stays in memory.
    """

    def __init__(self, store: SoftPromptStore, *, compressor: Any = None, embedder: Optional[Embedder] = None,
                 records: Optional[list[ChunkRecord]] = None, embeddings: Optional[np.ndarray] = None,
                 persist_dir: Optional[Union[str, Path]] = None):
        self.store = store
        self.compressor = compressor
        self.embedder = embedder or Embedder()
        self.records: list[ChunkRecord] = list(records or [])
        self.persist_dir: Optional[Path] = Path(persist_dir) if persist_dir is not None else None
        self._embeddings = embeddings if embeddings is not None else np.zeros((0, 0), dtype=np.float32)
        self._embeddings_file: Optional[str] = None
        self._dense: Optional[DenseIndex] = None
        self._lock = threading.RLock()
        self._keys = {(r.doc_id, r.chunk, r.soft_prompt_id) for r in self.records}

    # ------------------------------------------------------------ create/load
    @classmethod
    def create(cls, compressor: Any, persist_dir: Optional[Union[str, Path]] = None, *, embedder: Any = None,
               store: Optional[SoftPromptStore] = None) -> "ChunkIndex":
        """An empty index for ``compressor`` (reopened instead if ``persist_dir`` already holds one)."""
        if persist_dir is not None and (cls._dir(persist_dir) / CHUNKS_FILE).is_file():
            return cls.load(persist_dir, compressor, embedder=embedder)
        if store is None:
            store = SoftPromptStore.open(persist_dir, compressor) if persist_dir is not None else SoftPromptStore.for_compressor(compressor)
        store.check_compressor(compressor)
        return cls(store, compressor=compressor, embedder=as_embedder(embedder), persist_dir=persist_dir)

    @classmethod
    def load(cls, persist_dir: Union[str, Path], compressor: Any = None, *, embedder: Any = None) -> "ChunkIndex":
        """Reopen a persisted index. ``compressor`` is only needed to add texts (and is checked against the store)."""
        directory = cls._dir(persist_dir)
        path = directory / CHUNKS_FILE
        if not path.is_file():
            raise CorruptStoreError(
                f"No LangChain chunk index in '{persist_dir}' ({SUBDIR}/{CHUNKS_FILE} missing). Build it with "
                f"LLoCOLangChainRetriever.from_texts(..., persist_dir='{persist_dir}')."
            )
        meta = read_json(path, lambda exc: CorruptStoreError(
            f"{path} is corrupt ({exc}). The soft prompts in {defaults.STORE_SUBDIR}/ are intact: rebuild the chunk "
            f"index with from_texts(..., persist_dir=...) (already-compressed chunks are not recomputed)."))
        if meta.get("format") != FORMAT_VERSION:
            raise CorruptStoreError(f"{path}: chunk index format {meta.get('format')} is not supported (expected {FORMAT_VERSION}).")
        store = SoftPromptStore.open(persist_dir, compressor)
        if meta.get("fingerprint") != store.fingerprint:
            raise StoreMismatchError(
                f"{path} indexes soft prompts of compressor {meta.get('fingerprint')}, but the store beside it holds "
                f"{store.fingerprint}. The persist dir mixes two builds: rebuild it into a new directory."
            )
        records = [ChunkRecord(**r) for r in meta["records"]]
        missing = [r.soft_prompt_id for r in records if r.soft_prompt_id not in store]
        if missing:
            raise CorruptStoreError(
                f"{len(missing)} chunk(s) in {path} have no soft prompt in the store (e.g. {missing[0]}): a shard was "
                f"deleted. Run from_texts(..., persist_dir='{persist_dir}') again with the same documents; only the "
                f"missing chunks are recompressed."
            )
        emb = as_embedder(embedder)
        if meta.get("embedder") != emb.name:
            raise StoreMismatchError(
                f"{path} was embedded with '{meta.get('embedder')}', but the embedder given is '{emb.name}'. Pass the "
                f"same embedder (None for the shipped {defaults.DEFAULT_EMBEDDER_NAME}), or rebuild into a new persist_dir."
            )
        index = cls(store, compressor=compressor, embedder=emb, records=records, persist_dir=persist_dir)
        index._embeddings_file = meta.get("embeddings_file")
        index._embeddings = index._read_embeddings(directory, meta)
        return index

    @staticmethod
    def _dir(persist_dir: Union[str, Path]) -> Path:
        return Path(persist_dir) / SUBDIR

    def _read_embeddings(self, directory: Path, meta: dict) -> np.ndarray:
        name = meta.get("embeddings_file")
        if not self.records:
            return np.zeros((0, 0), dtype=np.float32)
        try:
            vectors = np.load(directory / name, allow_pickle=False) if name else None
        except (OSError, ValueError) as exc:
            logger.warning("%s is unreadable (%s); re-embedding %d chunks", directory / str(name), exc, len(self.records))
            vectors = None
        if vectors is None or vectors.shape[0] != len(self.records):
            # The texts are the source of truth: vectors can always be recomputed from them.
            vectors = self.embedder.embed_documents([r.text for r in self.records])
            self._embeddings = vectors
            self.persist()
        return np.ascontiguousarray(vectors, dtype=np.float32)

    # ------------------------------------------------------------------ write
    def add_texts(self, texts: Sequence[str], metadatas: Optional[Sequence[Optional[dict]]] = None, *,
                  ids: Optional[Sequence[Optional[str]]] = None, on_empty: OnEmpty = "warn",
                  batch_size: Optional[int] = None, progress: bool = False) -> list[str]:
        """Chunk, compress, embed and index ``texts``; return the soft-prompt ids of their chunks, in order.

        ``ids`` are document ids (default: ``metadata["doc_id"]``/``["id"]``, else a
        content hash). A document already indexed (same id and chunks) is not added twice.
        Empty or whitespace-only documents are skipped with a warning (``on_empty``
        picks 'warn', 'skip' or 'error').
        """
        if self.compressor is None:
            raise ValueError("This ChunkIndex was loaded without a compressor: pass compressor= to load() to add texts.")
        texts = list(texts)
        metadatas = list(metadatas) if metadatas is not None else [None] * len(texts)
        ids = list(ids) if ids is not None else [None] * len(texts)
        if not (len(metadatas) == len(ids) == len(texts)):
            raise ValueError(f"Got {len(texts)} texts, {len(metadatas)} metadatas and {len(ids)} ids: they must match.")
        tokenizer = self.compressor.backbone.tokenizer
        planned: list[tuple[str, int, Any, dict]] = []
        for position, (text, metadata, explicit) in enumerate(zip(texts, metadatas, ids)):
            metadata = dict(metadata or {})
            _check_json(metadata, position)
            if not isinstance(text, str):
                raise TypeError(f"Document {position} is a {type(text).__name__}, not a str.")
            chunks = chunk_text(text, tokenizer, self.compressor.segment_length)
            doc_id = _doc_id(text, metadata, explicit)
            if not chunks:
                self._handle_empty(position, doc_id, on_empty)
                continue
            planned.extend((doc_id, i, c, metadata) for i, c in enumerate(chunks))
        with self._lock:
            # One store.add: batched, flushed to shards as it goes; chunks already stored are not recomputed.
            prompt_ids = self.store.add([c.text for _, _, c, _ in planned], self.compressor, batch_size=batch_size,
                                        progress=progress)
            fresh: list[ChunkRecord] = []
            for (doc_id, i, chunk, metadata), prompt_id in zip(planned, prompt_ids):
                key = (doc_id, i, prompt_id)
                if key in self._keys:
                    continue
                self._keys.add(key)
                fresh.append(ChunkRecord(prompt_id, chunk.text, doc_id, i, self.store.num_positions(prompt_id),
                                         chunk.start_char, chunk.end_char, metadata,
                                         text_positions=len(self.compressor.backbone.tokenize(chunk.text))))
            if fresh:
                vectors = self.embedder.embed_documents([r.text for r in fresh], progress=progress)
                self._embeddings = vectors if not self.records else np.concatenate([self._embeddings, vectors])
                self.records.extend(fresh)
                self._dense = None
                self.persist()
        return prompt_ids

    def _handle_empty(self, position: int, doc_id: str, on_empty: OnEmpty) -> None:
        message = (f"Document {position} ({doc_id}) is empty or whitespace-only and was not compressed. Remove it "
                   f"from the input, or pass on_empty='skip' to skip such documents silently.")
        if on_empty == "error":
            raise EmptyDocumentError(message.replace("and was not compressed", "; nothing to compress"))
        if on_empty == "warn":
            warnings.warn(message, stacklevel=4)

    def persist(self) -> None:
        """Write chunks.json and the embeddings (no-op in memory). Called by :meth:`add_texts`."""
        if self.persist_dir is None:
            return
        with self._lock:
            directory = self._dir(self.persist_dir)
            directory.mkdir(parents=True, exist_ok=True)
            if self.compressor is not None:  # lets ChatLLoCO.from_persist_dir find the compressor again
                manifest.write_manifest(self.persist_dir, self.compressor)
            buffer = io.BytesIO()
            np.save(buffer, self._embeddings, allow_pickle=False)
            data = buffer.getvalue()
            name = f"embeddings-{hashlib.sha256(data).hexdigest()[:16]}.npy"
            atomic_write_bytes(directory / name, data)  # new name: the current chunks.json still names the old file
            meta = {
                "format": FORMAT_VERSION,
                "fingerprint": self.store.fingerprint,
                "embedder": self.embedder.name,
                "embeddings_file": name,
                "records": [asdict(r) for r in self.records],
            }
            atomic_write_bytes(directory / CHUNKS_FILE, json.dumps(meta, ensure_ascii=False).encode("utf-8"))
            for old in directory.glob("embeddings-*.npy"):  # only after the commit point
                if old.name != name:
                    old.unlink(missing_ok=True)
            self._embeddings_file = name

    # ------------------------------------------------------------------- read
    def __len__(self) -> int:
        return len(self.records)

    def _index(self) -> DenseIndex:
        with self._lock:
            if self._dense is None:
                # In memory only (rebuilt from the embeddings): a GPU copy is safe here.
                self._dense = DenseIndex(self._embeddings, gpu=True)
            return self._dense

    def search(self, query: str, k: int = defaults.DEFAULT_TOP_K, *, position_budget: Optional[int] = defaults.DEFAULT_POSITION_BUDGET,
               fetch_k: Optional[int] = None, expand_top_k: int = 0,
               text_budget: Optional[int] = defaults.DEFAULT_TEXT_BUDGET,
               policy: str = defaults.DEFAULT_EXPANSION_POLICY, reader: Any = None) -> list[SearchHit]:
        """The ``k`` best chunks for ``query`` after :func:`select_chunks` (dedupe, expand, budget, reading order).

        ``expand_top_k`` of them, ranked by the expansion ``policy``, come back with ``expanded=True`` (read as
        text, see :mod:`lloco_index.selection`; ``policy="likelihood"`` needs the ``reader``).
        """
        config = SelectionConfig(top_k=k, position_budget=position_budget, expand_top_k=expand_top_k,
                                 text_budget=text_budget, policy=policy)
        if k <= 0 or not self.records:
            return []
        index = self._index()
        query_vector = self.embedder.embed_query(query)
        n = min(len(self.records), max(fetch_k or 0, 4 * k, k + 8))
        while True:
            # Fetch more than k: duplicates and chunks over budget are dropped after the search.
            rows, scores = index.search(query_vector, n)
            hits = [SearchHit(self.records[i], s) for i, s in zip(rows, scores)]
            selected = select_chunks(hits, config, self.store, query, reader=reader)
            if len(selected) >= k or n >= len(self.records):
                return selected
            n = min(len(self.records), 2 * n)


def _check_json(metadata: dict, position: int) -> None:
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"Metadata of document {position} cannot be persisted as JSON ({exc}); keep metadata to str/int/float/bool/"
            f"list/dict values."
        ) from exc
