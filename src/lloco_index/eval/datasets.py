"""Benchmark data loaders. Data is read from paths (default :func:`lloco_index.defaults.data_dir`), never copied.

Every loader returns a :class:`Benchmark`: documents by id and the questions asked about them.

>>> bench = load_quality("../shared/data/quality/test.jsonl", max_documents=1, max_questions=2)
>>> bench = load_squad("../shared/data/squad/test.json", max_documents=2, max_questions=5)
>>> bench = load_jsonl_qa("my.jsonl")          # lines of {"document", "question", "answers"}
>>> bench = needle_in_a_haystack("../shared/data/needle/paul_graham_essays", tokenizer,
...                              lengths=[1024, 4096], depths=[0.0, 0.5, 1.0])
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

from .. import defaults
from ..fileio import jsonl_records

PathLike = Union[str, Path]
LETTERS = "ABCD"


@dataclass
class Document:
    id: str
    text: str
    title: str = ""
    metadata: dict = field(default_factory=dict)


@dataclass
class Example:
    """One question about one document.

    ``task`` is ``mc`` (options + gold letter), ``extractive`` (short spans, EM/F1),
    ``abstractive`` (long answers, ROUGE-L) or ``needle``.
    """

    id: str
    document_id: str
    question: str
    answers: list[str]
    task: str
    options: list[str] = field(default_factory=list)
    gold_letter: Optional[str] = None
    metadata: dict = field(default_factory=dict)

    @property
    def gold_index(self) -> Optional[int]:
        return LETTERS.index(self.gold_letter) if self.gold_letter else None


@dataclass
class Benchmark:
    name: str
    task: str
    documents: dict[str, Document]
    examples: list[Example]
    notes: list[str] = field(default_factory=list)  # e.g. how documents were cut; printed in the report

    def by_document(self) -> dict[str, list[Example]]:
        grouped: dict[str, list[Example]] = {}
        for ex in self.examples:
            grouped.setdefault(ex.document_id, []).append(ex)
        return grouped


def _data_path(path: Optional[PathLike], default_rel: str) -> Path:
    return Path(path) if path is not None else defaults.data_dir() / default_rel


def _check(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"Benchmark data file {path} does not exist: pass data_dir= / --data-dir, or set ${defaults.DATA_DIR_ENV}.")
    return path


# ---------------------------------------------------------------- QuALITY
def parse_quality_instruction(instruction: str) -> tuple[str, list[str]]:
    """Split an L-Eval QuALITY instruction into the question and its four option texts."""
    question, _, rest = instruction.partition("\n\n (A)")
    rest = "(A)" + rest
    options = []
    for i, letter in enumerate(LETTERS):
        start = rest.find(f"({letter})")
        end = rest.find(f"({LETTERS[i + 1]})") if i + 1 < len(LETTERS) else len(rest)
        if start < 0:
            raise ValueError(f"QuALITY instruction lacks option ({letter}): {instruction[:80]!r}")
        options.append(rest[start + 3 : end if end > 0 else len(rest)].strip())
    return question.strip(), options


def load_quality(path: Optional[PathLike] = None, *, max_documents: Optional[int] = None,
                 max_questions: Optional[int] = None) -> Benchmark:
    """QuALITY as repackaged by L-Eval (one article per line; gold letter = ``outputs[i][1]``)."""
    path = _check(_data_path(path, "quality/test.jsonl"))
    documents: dict[str, Document] = {}
    examples: list[Example] = []
    for line_no, record in jsonl_records(path):
        if max_documents is not None and len(documents) >= max_documents:
            break
        doc_id = f"quality-{line_no}-{_digest(record['input'])}"
        documents[doc_id] = Document(doc_id, record["input"], title=record["input"][:60].split("\n")[0], metadata={"source": record.get("source")})
        for i, (instruction, output) in enumerate(zip(record["instructions"], record["outputs"])):
            if max_questions is not None and i >= max_questions:
                break
            question, options = parse_quality_instruction(instruction)
            gold = output.strip()[1]
            examples.append(Example(
                id=f"{doc_id}-q{i}", document_id=doc_id, question=question, answers=[output.strip()], task="mc",
                options=options, gold_letter=gold,
            ))
    return Benchmark("quality", "mc", documents, examples)


# ------------------------------------------------------------------ SQuAD
def load_squad(path: Optional[PathLike] = None, *, max_documents: Optional[int] = None,
               max_questions: Optional[int] = None, max_document_words: Optional[int] = None,
               include_impossible: bool = False) -> Benchmark:
    """SQuAD-style data with a whole article as the document and its paragraphs' questions.

    ``max_document_words`` keeps only the article's first paragraphs up to that many words and,
    with them, only their questions (so every kept question is still answerable from the document);
    the cut is recorded in the benchmark's notes.
    """
    path = _check(_data_path(path, "squad/test.json"))
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    documents: dict[str, Document] = {}
    examples: list[Example] = []
    notes = []
    for article in data[: max_documents if max_documents is not None else len(data)]:
        paragraphs, words, qas = [], 0, []
        for para in article["paragraphs"]:
            n = len(para["context"].split())
            if max_document_words is not None and paragraphs and words + n > max_document_words:
                break
            paragraphs.append(para["context"])
            words += n
            qas.extend(para["qas"])
        doc_id = f"squad-{article['title']}"
        documents[doc_id] = Document(doc_id, "\n\n".join(paragraphs), title=article["title"].replace("_", " "))
        if len(paragraphs) < len(article["paragraphs"]):
            notes.append(f"{doc_id}: first {len(paragraphs)} of {len(article['paragraphs'])} paragraphs ({words} words)")
        kept = 0
        for qa in qas:
            if qa.get("is_impossible") and not include_impossible:
                continue
            if max_questions is not None and kept >= max_questions:
                break
            answers = sorted({a["text"] for a in qa["answers"]}, key=lambda a: [x["text"] for x in qa["answers"]].index(a))
            examples.append(Example(id=f"squad-{qa['id']}", document_id=doc_id, question=qa["question"], answers=answers, task="extractive"))
            kept += 1
    return Benchmark("squad", "extractive", documents, examples, notes)


# ----------------------------------------------------------- generic jsonl
def load_jsonl_qa(path: PathLike, *, task: str = "extractive", name: Optional[str] = None,
                  max_questions: Optional[int] = None) -> Benchmark:
    """Lines of ``{"document", "question", "answers"}`` (``answers`` a list or a string).

    Optional keys: ``id``, ``document_id`` (questions with equal documents share one document
    either way), ``options`` + ``gold`` (letter) for multiple choice.
    """
    path = _check(Path(path))
    documents: dict[str, Document] = {}
    examples: list[Example] = []
    for i, record in jsonl_records(path):
        if max_questions is not None and len(examples) >= max_questions:
            break
        for key in ("document", "question", "answers"):
            if key not in record:
                raise ValueError(f"{path}:{i + 1}: missing key '{key}' (need document, question, answers)")
        text = record["document"]
        doc_id = str(record.get("document_id") or f"doc-{_digest(text)}")
        documents.setdefault(doc_id, Document(doc_id, text))
        answers = record["answers"] if isinstance(record["answers"], list) else [record["answers"]]
        options = list(record.get("options") or [])
        examples.append(Example(
            id=str(record.get("id", f"{path.stem}-{i}")), document_id=doc_id, question=record["question"],
            answers=[str(a) for a in answers], task="mc" if options else task, options=options,
            gold_letter=record.get("gold"),
        ))
    return Benchmark(name or path.stem, "mc" if examples and examples[0].options else task, documents, examples)


# ------------------------------------------------------ needle in haystack
NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NEEDLE_QUESTION = "What is the best thing to do in San Francisco?"
NEEDLE_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"


def needle_in_a_haystack(haystack_dir: Optional[PathLike] = None, tokenizer=None, *,
                         lengths: Sequence[int] = (1024, 2048, 4096), depths: Sequence[float] = (0.0, 0.5, 1.0),
                         needle: str = NEEDLE, question: str = NEEDLE_QUESTION, answer: str = NEEDLE_ANSWER,
                         count_tokens: Optional[Callable[[str], int]] = None) -> Benchmark:
    """The common NIAH construction: haystack text cut to ``length`` tokens, needle at ``depth`` (0 = start).

    The haystack is every ``*.txt`` in ``haystack_dir`` in name order, concatenated; the cut is
    token-exact under ``tokenizer`` (the decoder's, so lengths are positions the full context
    needs), and the needle goes in at the sentence boundary nearest before its depth, as the usual
    harness does. Lengths count the haystack plus the needle.
    """
    directory = Path(haystack_dir) if haystack_dir is not None else defaults.data_dir() / "needle" / "paul_graham_essays"
    files = sorted(directory.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"No *.txt haystack files in {directory}.")
    if tokenizer is None and count_tokens is None:
        raise ValueError("needle_in_a_haystack needs the decoder's tokenizer to cut lengths in tokens.")
    encode = (lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]) if tokenizer is not None else None
    haystack = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    hay_ids = encode(haystack) if encode else None
    needle_tokens = len(encode(" " + needle)) if encode else count_tokens(needle)
    documents: dict[str, Document] = {}
    examples: list[Example] = []
    for length in lengths:
        budget = max(1, length - needle_tokens)
        if hay_ids is not None:
            if budget > len(hay_ids):
                raise ValueError(f"The haystack has {len(hay_ids)} tokens, fewer than the {length} asked for.")
            context = tokenizer.decode(hay_ids[:budget])
        else:
            context = haystack[: budget * 4]
        for depth in depths:
            cut = int(len(context) * depth)
            if 0 < depth < 1:
                # Back up to the end of a sentence so the needle is not spliced into a word.
                stop = max(context.rfind(". ", 0, cut), context.rfind("\n", 0, cut))
                cut = stop + 1 if stop > 0 else cut
            text = context[:cut].rstrip() + (" " if cut else "") + needle + " " + context[cut:].lstrip()
            doc_id = f"needle-{length}-{int(round(depth * 100)):03d}"
            documents[doc_id] = Document(doc_id, text.strip(), metadata={"length": length, "depth": depth})
            examples.append(Example(id=doc_id, document_id=doc_id, question=question, answers=[answer], task="needle",
                                    metadata={"length": length, "depth": depth}))
    return Benchmark("needle", "needle", documents, examples)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def iter_examples(benchmarks: Iterable[Benchmark]) -> Iterable[tuple[Benchmark, Example]]:
    for bench in benchmarks:
        for ex in bench.examples:
            yield bench, ex
