"""Finetuning data: question/answer records in, chat examples with placeholders out.

What a user brings is a :class:`~lloco_index.training.data.QAExample` (a question, optionally an answer or
several references and the gold context texts, plus a group id for splitting), read by
:func:`~lloco_index.training.data.load_qa_examples` from plain jsonl (``question``/``answer``/``contexts``
with common aliases) or LlamaIndex ``LabelledRagDataset`` objects and JSON files. What the trainer reads is a
:class:`TrainExample`: the chat ``messages`` exactly as the LLM receives them at query time (soft prompts as
``<|lloco:ID|>`` placeholders) and the assistant ``target`` text. Instruction data (Alpaca
``instruction``/``input``/``output``, ``prompt``/``response``, or chat ``messages``) becomes TrainExamples
directly.

>>> qa = load_qa_examples("questions.jsonl")
>>> qa[0].question, qa[0].answer
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from ..fileio import atomic_write_bytes

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


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
