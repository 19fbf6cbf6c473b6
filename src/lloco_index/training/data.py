"""Training and evaluation data: token windows from documents, and QA examples.

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

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

from .. import defaults
from ..fileio import jsonl_records
from ..errors import DataNotFoundError

TRAIN_SOURCES = ("squad", "quality", "squality", "qmsum")
TEST_SOURCES = ("squad", "quality")


@dataclass
class Document:
    doc_id: str
    text: str
    source: str


@dataclass
class QAExample:
    """A question over a short context (one SQuAD paragraph fits one segment)."""

    context: str
    question: str
    answers: list[str]  # references; answers[0] is the training target
    doc_id: str = ""


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
                    out.append(QAExample(para["context"], qa["question"], answers, f"squad:{article['title']}"))
    return out


def load_qa_jsonl(path: Union[str, Path]) -> list[QAExample]:
    """QA examples written by :func:`write_qa_jsonl` (e.g. teacher answers for sequence-level distillation)."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out.append(QAExample(r["context"], r["question"], r["answers"], r.get("doc_id", "")))
    return out


def write_qa_jsonl(path: Union[str, Path], examples: Iterable[QAExample]) -> None:
    with open(path, "w") as f:
        for e in examples:
            f.write(json.dumps({"context": e.context, "question": e.question, "answers": e.answers, "doc_id": e.doc_id}) + "\n")


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
