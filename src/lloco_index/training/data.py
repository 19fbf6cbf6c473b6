"""Training and evaluation data: token windows from documents, and QA examples.

:class:`QAExample` is the one question/answer record of the package: compressor pretraining's ``qa``
objective, its SQuAD evaluation and adapter finetuning (:mod:`lloco_index.finetune`) all read it, and
:func:`load_qa_examples` reads it from jsonl (any of the usual key spellings, so files written by older
versions, ``{"context", "question", "answers", "doc_id"}``, still load), LlamaIndex ``LabelledRagDataset``
JSON or objects, and plain records.

Only the train splits of ``../shared/data`` are used for training (SQuAD train
articles, QuALITY train, SQuALITY dev, QMSum val); the test splits (SQuAD test,
QuALITY test) are for held-out evaluation. Documents are tokenised once; a
training example is a *window*: ``segment`` tokens to compress followed by
``continuation`` tokens the decoder must predict from the soft prompt.

:class:`WindowSampler` walks a seeded permutation of all windows epoch by
epoch; its ``state_dict`` (epoch, position) is saved in checkpoints so a
resumed run sees exactly the examples an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from .. import defaults
from ..fileio import atomic_write_bytes, jsonl_records
from ..errors import DataNotFoundError

TRAIN_SOURCES = ("squad", "quality", "squality", "qmsum")
TEST_SOURCES = ("squad", "quality")


@dataclass
class Document:
    doc_id: str
    text: str
    source: str


_QUESTION_KEYS = ("question", "query", "instruction_question", "q")
_ANSWER_KEYS = ("answer", "reference_answer", "response", "output", "answers", "reference_answers")
_CONTEXT_KEYS = ("contexts", "reference_contexts", "context", "gold_contexts")
_GROUP_KEYS = ("group", "doc_id", "document_id", "title", "source")


@dataclass
class QAExample:
    """A question over a corpus, with whatever supervision there is.

    Pretraining's ``qa`` objective reads ``contexts`` (one SQuAD paragraph, which fits one segment) and
    trains on ``answer``; finetuning may leave ``answer`` out (a teacher writes it) and ``contexts`` out
    (the retriever finds them). Evaluation scores against every one of ``references``.
    """

    question: str
    answer: Optional[str] = None  # the training target; None: distil one from the model reading the full text
    references: list[str] = field(default_factory=list)  # all acceptable answers (for evaluation)
    contexts: Optional[list[str]] = None  # gold context texts; None: use the retriever
    id: str = ""
    group: Optional[str] = None  # document id: keeps a document's questions on one side of a split

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"Example {self.id or '?'} has an empty question.")
        if self.answer is not None and not self.references:
            self.references = [self.answer]
        if not self.id:
            self.id = hashlib.sha256(self.question.encode()).hexdigest()[:16]


def _first(record: dict, keys: Sequence[str]) -> Any:
    for key in keys:
        if key in record and record[key] not in (None, "", []):
            return record[key]
    return None


def qa_from_record(record: dict, index: int = 0) -> QAExample:
    """One QA record (plain dict, any of the usual key spellings) as a :class:`QAExample`."""
    question = _first(record, _QUESTION_KEYS)
    if question is None:
        raise ValueError(f"Record {index} has no question (looked for {', '.join(_QUESTION_KEYS)}): {str(record)[:120]}")
    answer = _first(record, _ANSWER_KEYS)
    references: list[str] = []
    if isinstance(answer, list):  # SQuAD style: several references, possibly dicts with "text"
        references = [a["text"] if isinstance(a, dict) else str(a) for a in answer]
        answer = references[0] if references else None
    elif isinstance(answer, dict):
        answer = answer.get("text")
    if isinstance(record.get("references"), list) and record["references"]:  # as write_qa_jsonl writes them
        references = [str(r) for r in record["references"]]
    contexts = _first(record, _CONTEXT_KEYS)
    if isinstance(contexts, str):
        contexts = [contexts]
    group = _first(record, _GROUP_KEYS)
    return QAExample(question=str(question), answer=None if answer is None else str(answer), references=references,
                     contexts=[str(c) for c in contexts] if contexts else None,
                     id=str(record.get("id") or record.get("_id") or ""), group=None if group is None else str(group))


def load_qa_jsonl(path: Union[str, Path]) -> list[QAExample]:
    """Read a jsonl file of question/answer(/contexts) records; blank lines are skipped."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    examples.append(qa_from_record(json.loads(line), i))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i + 1} is not valid JSON ({exc}).") from exc
    return examples


def write_qa_jsonl(path: Union[str, Path], examples: Iterable[QAExample]) -> None:
    """One :class:`QAExample` per line, every field under its own name (atomically; read by :func:`load_qa_jsonl`)."""
    lines = [json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in examples]
    atomic_write_bytes(Path(path), "".join(lines).encode("utf-8"))


def qa_from_labelled_rag_dataset(dataset: Any) -> list[QAExample]:
    """QA examples from a LlamaIndex ``LabelledRagDataset`` (or anything with ``.examples`` of that shape)."""
    out = []
    for i, ex in enumerate(dataset.examples):
        record = ex if isinstance(ex, dict) else {
            "query": getattr(ex, "query", None), "reference_answer": getattr(ex, "reference_answer", None),
            "reference_contexts": getattr(ex, "reference_contexts", None)}
        out.append(qa_from_record(record, i))
    return out


def load_qa_examples(source: Any) -> list[QAExample]:
    """Load QA examples from a path (.jsonl, or LabelledRagDataset .json), a dataset object, or records.

    >>> load_qa_examples("rag_dataset.json")          # LabelledRagDataset.save_json output
    >>> load_qa_examples([{"question": "Who?", "answer": "Ada"}])
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"No dataset file at '{path}'.")
        if path.suffix == ".jsonl":
            return load_qa_jsonl(path)
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "examples" in data:
            return [qa_from_record(r, i) for i, r in enumerate(data["examples"])]
        if isinstance(data, list):
            return [qa_from_record(r, i) for i, r in enumerate(data)]
        raise ValueError(f"{path}: expected a jsonl file, a list of records, or a LabelledRagDataset JSON "
                         f"({{\"examples\": [...]}}).")
    if hasattr(source, "examples"):
        return qa_from_labelled_rag_dataset(source)
    out = []
    for i, item in enumerate(source):
        out.append(item if isinstance(item, QAExample) else qa_from_record(item, i))
    return out


def context_text(example: QAExample) -> str:
    """The example's gold context as one text (what the ``qa`` objective compresses into one soft prompt)."""
    return "\n\n".join(example.contexts or [])


# ------------------------------------------------------------------ documents
def _squad_documents(path: Path) -> list[Document]:
    data = json.loads(path.read_text())["data"]
    return [Document(f"squad:{a['title']}", "\n\n".join(p["context"] for p in a["paragraphs"]), "squad") for a in data]


def _quality_documents(path: Path) -> list[Document]:
    return [Document(f"quality:{path.stem}:{i}", rec["input"], "quality") for i, rec in jsonl_records(path)]


def _squality_documents(path: Path) -> list[Document]:
    return [Document(f"squality:{rec['metadata']['passage_id']}", rec["document"], "squality")
            for _, rec in jsonl_records(path)]


def _qmsum_documents(path: Path) -> list[Document]:
    return [Document(f"qmsum:{i}", "\n".join(f"{t['speaker']}: {t['content']}" for t in rec["meeting_transcripts"]), "qmsum")
            for i, rec in jsonl_records(path)]


def load_documents(data_dir: Union[str, Path], split: str = "train", sources: Optional[Sequence[str]] = None) -> list[Document]:
    """Documents of one split. ``split="train"``: the training splits; ``"test"``: held-out test splits only."""
    data_dir = Path(data_dir)
    if split == "train":
        files: dict[str, tuple[Path, Callable[[Path], list[Document]]]] = {
            "squad": (data_dir / "squad/train.json", _squad_documents),
            "quality": (data_dir / "quality/train.jsonl", _quality_documents),
            "squality": (data_dir / "squality/dev.jsonl", _squality_documents),
            "qmsum": (data_dir / "qmsum/val.jsonl", _qmsum_documents),
        }
    elif split == "test":
        files = {
            "squad": (data_dir / "squad/test.json", _squad_documents),
            "quality": (data_dir / "quality/test.jsonl", _quality_documents),
        }
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    sources = list(sources) if sources else list(files)
    unknown = [s for s in sources if s not in files]
    if unknown:
        raise ValueError(f"Unknown {split} sources {unknown}; known: {sorted(files)}")
    docs: list[Document] = []
    for name in sources:
        path, reader = files[name]
        if not path.is_file():
            raise DataNotFoundError(
                f"{path} is missing. Train on your own text with --text PATH (a .txt file, a .jsonl file with a 'text' "
                f"field per line, or a folder of them), or point --data-dir (or ${defaults.DATA_DIR_ENV}) at the shared data."
            )
        docs.extend(reader(path))
    return docs


def load_text_documents(path: Union[str, Path]) -> list[Document]:
    """Bring-your-own training text: a ``.txt`` file (one document), a ``.jsonl`` file (a ``text`` field per
    line, one document each), or a folder searched recursively for both, in path order."""
    path = Path(path).expanduser()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else []
    docs = [d for f in files for d in load_text_file(f) if d.text.strip()]
    if not docs:
        raise DataNotFoundError(
            f"No training text at '{path}'. --text takes a .txt file, a .jsonl file with a 'text' field per line, "
            f"or a folder of them."
        )
    return docs


def load_text_file(path: Union[str, Path]) -> list[Document]:
    """Held-out text from a file: plain text (one document) or JSONL with a ``text`` field per line."""
    path = Path(path)
    raw = path.read_text()
    if path.suffix == ".jsonl":
        return [Document(f"{path.name}:{i}", json.loads(l)["text"], path.name) for i, l in enumerate(raw.splitlines()) if l.strip()]
    return [Document(path.name, raw, path.name)]


def load_squad_qa(path: Union[str, Path], max_context_tokens: Optional[int] = None, tokenize=None) -> list[QAExample]:
    """SQuAD questions with their paragraph as context (optionally only paragraphs that fit one segment)."""
    data = json.loads(Path(path).read_text())["data"]
    out: list[QAExample] = []
    for article in data:
        for para in article["paragraphs"]:
            if max_context_tokens is not None and tokenize is not None and len(tokenize(para["context"])) > max_context_tokens:
                continue
            for qa in para["qas"]:
                answers = [a["text"] for a in qa.get("answers", [])]
                if answers:
                    out.append(QAExample(question=qa["question"], answer=answers[0], references=answers,
                                         contexts=[para["context"]], id=str(qa.get("id") or ""),
                                         group=f"squad:{article['title']}"))
    return out


# -------------------------------------------------------------------- windows
@dataclass
class Window:
    """``segment`` is compressed; ``continuation`` follows it in the same document."""

    segment: list[int]
    continuation: list[int]
    doc_index: int


def tokenize_documents(docs: Sequence[Document], tokenize: Callable[[str], list[int]]) -> list[list[int]]:
    return [tokenize(d.text) for d in docs]


def make_windows(token_docs: Sequence[list[int]], segment_length: int, continuation_length: int,
                 min_continuation: int = 16) -> list[Window]:
    """Non-overlapping windows of ``segment_length + continuation_length`` tokens per document."""
    size = segment_length + continuation_length
    windows = []
    for d, ids in enumerate(token_docs):
        for start in range(0, len(ids) - segment_length - min_continuation + 1, size):
            seg = ids[start : start + segment_length]
            cont = ids[start + segment_length : start + size]
            windows.append(Window(seg, cont, d))
    return windows


class WindowSampler:
    """Seeded, resumable batches of windows: a fresh permutation per epoch.

    Windows are cut at the maximum segment length; a curriculum with shorter
    segments uses each window's prefix (:func:`shorten`), so the data order does
    not depend on the curriculum.
    """

    def __init__(self, windows: Sequence[Window], batch_size: int, seed: int = 0):
        if not windows:
            raise ValueError("No training windows: the documents are shorter than one segment.")
        self.windows = list(windows)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.windows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[Window]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            batch.append(self.windows[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_windows": len(self.windows)}

    def load_state_dict(self, state: dict) -> None:
        if state["n_windows"] != len(self.windows) or state["seed"] != self.seed:
            raise ValueError(
                f"Checkpoint data position was saved for {state['n_windows']} windows (seed {state['seed']}), but "
                f"this run has {len(self.windows)} (seed {self.seed}): resume with the same data and config."
            )
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._permutation(self.epoch)


def shorten(window: Window, segment_length: int, continuation_length: int) -> Window:
    """The window with a shorter segment: the tokens cut from the segment's end start the continuation."""
    if segment_length >= len(window.segment):
        return Window(window.segment, window.continuation[:continuation_length], window.doc_index)
    tail = window.segment[segment_length:] + window.continuation
    return Window(window.segment[:segment_length], tail[:continuation_length], window.doc_index)
