"""Finetuning data: question/answer records in, chat examples with placeholders out.

Two record types:

* :class:`QAExample` -- what a user brings: a question, optionally an answer (or several references) and
  the gold context texts, plus a group (document) id for splitting.
* :class:`TrainExample` -- what the trainer reads: the chat ``messages`` exactly as the LLM receives them at
  query time (soft prompts as ``<|lloco:ID|>`` placeholders) and the assistant ``target`` text.

Loaders accept plain jsonl (``question``/``answer``/``contexts`` with common aliases), LlamaIndex
``LabelledRagDataset`` objects or their JSON files (``{"examples": [{"query", "reference_answer",
"reference_contexts"}]}``), and instruction data (Alpaca ``instruction``/``input``/``output``, ``prompt``/
``response``, or chat ``messages``).

>>> qa = load_qa_examples("questions.jsonl")
>>> qa[0].question, qa[0].answer
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from ..fileio import atomic_write_bytes

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}

_QUESTION_KEYS = ("question", "query", "instruction_question", "q")
_ANSWER_KEYS = ("answer", "reference_answer", "response", "output", "answers", "reference_answers")
_CONTEXT_KEYS = ("contexts", "reference_contexts", "context", "gold_contexts")
_GROUP_KEYS = ("group", "doc_id", "document_id", "title", "source")


@dataclass
class QAExample:
    """A question over the indexed corpus, with whatever supervision the user has."""

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


@dataclass
class TrainExample:
    """One supervised chat turn: ``messages`` as the LLM sees them, and the assistant's ``target``."""

    messages: list[Message]
    target: str
    id: str
    kind: str = "qa"  # "qa" | "instruction"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainExample":
        return cls(messages=list(data["messages"]), target=data["target"], id=data["id"],
                   kind=data.get("kind", "qa"), meta=dict(data.get("meta") or {}))


# ---------------------------------------------------------------- loading
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


def instruction_from_record(record: dict, index: int = 0) -> TrainExample:
    """A general instruction example (Alpaca, prompt/response, or chat messages) as a TrainExample."""
    if "messages" in record:
        messages = [dict(m) for m in record["messages"]]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"Instruction record {index}: 'messages' must end with the assistant's reply.")
        target = messages.pop()["content"]
    else:
        prompt = record.get("instruction") or record.get("prompt")
        target = record.get("output") or record.get("response") or record.get("completion")
        if not prompt or target is None:
            raise ValueError(f"Instruction record {index} needs instruction/output, prompt/response or messages.")
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        messages = [{"role": "user", "content": str(prompt)}]
    ident = hashlib.sha256(json.dumps([messages, target], sort_keys=True).encode()).hexdigest()[:16]
    return TrainExample(messages=messages, target=str(target), id=f"instr-{ident}", kind="instruction")


def load_instruction_examples(source: Any) -> list[TrainExample]:
    """Instruction data from a .jsonl/.json path or a list of records."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        text = path.read_text(encoding="utf-8")
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
    else:
        records = list(source)
    return [r if isinstance(r, TrainExample) else instruction_from_record(r, i) for i, r in enumerate(records)]


# ---------------------------------------------------------- splits, mixing
def _rank(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def split_train_val(examples: Sequence[TrainExample], fraction: float, *, max_val: int = 64,
                    seed: int = 0) -> tuple[list[TrainExample], list[TrainExample]]:
    """Deterministic split by group (the ``meta["group"]`` document) when there are several, else by example.

    Splitting by document keeps the validation loss honest about unseen documents; the order of the input
    does not matter (examples are ranked by a seeded hash of their key).
    """
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    groups = {e.meta.get("group") for e in examples if e.kind == "qa"}
    by_group = len(groups) >= 5 and None not in groups
    key = (lambda e: str(e.meta.get("group"))) if by_group else (lambda e: e.id)
    want = max(1, min(max_val, round(fraction * len(examples))))
    qa = [e for e in examples if e.kind == "qa"]
    order = sorted({key(e) for e in qa}, key=lambda k: _rank(k, seed))
    val_keys: set[str] = set()
    count = 0
    for k in order:
        if count >= want:
            break
        val_keys.add(k)
        count += sum(1 for e in qa if key(e) == k)
    val = [e for e in qa if key(e) in val_keys][:max_val]
    val_ids = {e.id for e in val}
    train = [e for e in examples if e.id not in val_ids and not (e.kind == "qa" and key(e) in val_keys)]
    if not train:
        raise ValueError("The validation split took every example; lower val_fraction or add examples.")
    return train, val


def mix_instructions(train: Sequence[TrainExample], instructions: Sequence[TrainExample], ratio: float,
                     *, seed: int = 0) -> list[TrainExample]:
    """Add ``round(ratio * len(qa))`` instruction examples (sampled without replacement, seeded)."""
    if ratio <= 0 or not instructions:
        return list(train)
    n_qa = sum(1 for e in train if e.kind == "qa")
    n = min(len(instructions), max(1, round(ratio * n_qa)))
    picked = random.Random(seed).sample(list(instructions), n)
    return list(train) + picked


def examples_hash(examples: Iterable[TrainExample]) -> str:
    """sha256 over the canonical JSON of the examples (messages, targets, ids), 16 hex digits."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps({"m": e.messages, "t": e.target, "i": e.id, "k": e.kind}, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def save_examples(path: Union[str, Path], splits: dict[str, Sequence[TrainExample]]) -> None:
    """Write ``{"split": name, **example}`` lines atomically (the built data set, for resume and audit)."""
    lines = [json.dumps({"split": name, **e.to_json()}, ensure_ascii=False) for name, exs in splits.items() for e in exs]
    atomic_write_bytes(Path(path), ("\n".join(lines) + "\n").encode("utf-8"))


def load_examples(path: Union[str, Path]) -> dict[str, list[TrainExample]]:
    splits: dict[str, list[TrainExample]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                splits.setdefault(record.pop("split"), []).append(TrainExample.from_json(record))
    return splits
