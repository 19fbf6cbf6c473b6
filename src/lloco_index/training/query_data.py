"""Training and evaluation examples shaped like queries: retrieved chunks, some as text, in the query template.

A query hands the reader several chunks of one document, in reading order, in the prompt template of the
query path; selective expansion puts the best-scored ones in as text and leaves the rest as soft prompts.
Each :class:`QueryExample` records exactly that: the chunks, which of them are expanded, the messages with
a placeholder ``<|lloco:cJ|>`` for chunk ``J`` (the student's prompt) and the same messages with every
chunk as text (the teacher's prompt). The messages are rendered once, when the examples are built, by a
``messages_for(question, chunk_strings)`` callable: the framework adapters supply their own query
template (LlamaIndex: :func:`lloco_index.llamaindex.finetune.text_qa_messages_fn`), so training needs no
framework installed where it runs.

Two shapes of context, both from SQuAD articles (train split for training, test split for evaluation):

* ``paragraph``: the question's own paragraph, cut into chunks; every chunk a soft prompt. This is the
  held-out measure of what a soft prompt carries (reader-normalised F1).
* ``retrieved``: the article's top-k chunks for the question (all-MiniLM-L6-v2, reading order), the top
  ``expand`` of them as text, chosen by the expansion policy queries use (:mod:`lloco_index.selection`),
  the rest as soft prompts; ``expand`` cycles over ``expansion_mix``.

    python -m lloco_index.training.query_data --split train --out runs/qd/train.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from .. import defaults
from ..chunking import chunk_text
from ..fileio import atomic_write_bytes
from ..generation import make_placeholder
from ..selection import POLICIES, Candidate, SelectionConfig, expansion_scores, select

MessagesFn = Callable[[str, Sequence[str]], list[dict]]
KINDS = ("paragraph", "retrieved")


def chunk_ref(j: int) -> str:
    """The placeholder id of an example's ``j``-th chunk (ids are per example, not store ids)."""
    return f"c{j}"


@dataclass
class QueryExample:
    id: str
    question: str
    answers: list[str]
    chunks: list[str]  # reading order
    expand: list[bool]  # chunk j reaches the reader as text
    messages: list[dict]  # the student's prompt: placeholders for the chunks not expanded
    teacher_messages: list[dict]  # the same prompt with every chunk as text
    closed_messages: list[dict] = field(default_factory=list)  # the same template with no context (closed book)
    kind: str = "paragraph"
    doc: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def soft_chunks(self) -> list[int]:
        return [j for j, e in enumerate(self.expand) if not e]


def bench_messages(question: str, chunks: Sequence[str]) -> list[dict]:
    """The benchmark harness's template (:func:`lloco_index.eval.systems.build_messages`), extractive QA."""
    from ..eval.datasets import Example
    from ..eval.systems import CHUNK_SEPARATOR, build_messages

    example = Example(id="", document_id="", question=question, answers=[], task="extractive")
    return build_messages(example, CHUNK_SEPARATOR.join(chunks) if chunks else None)


def make_example(ex_id: str, question: str, answers: Sequence[str], chunks: Sequence[str], expand: Sequence[bool],
                 messages_for: MessagesFn, *, kind: str, doc: str = "", meta: Optional[dict] = None) -> QueryExample:
    student = [c if e else make_placeholder(chunk_ref(j)) for j, (c, e) in enumerate(zip(chunks, expand))]
    return QueryExample(ex_id, question, list(answers), list(chunks), [bool(e) for e in expand],
                        messages_for(question, student), messages_for(question, list(chunks)),
                        messages_for(question, []), kind, doc, dict(meta or {}))


def _squad_articles(data_dir: Union[str, Path], split: str) -> list[dict]:
    return json.loads((Path(data_dir) / "squad" / f"{split}.json").read_text())["data"]


def build_query_examples(data_dir: Union[str, Path], split: str, tokenizer, messages_for: MessagesFn, *,
                         segment_length: int = defaults.DEFAULT_SEGMENT_LENGTH, kinds: Sequence[str] = KINDS,
                         top_k: int = 4, expansion_mix: Sequence[int] = (0, 1, 2), embedder=None,
                         policy: str = defaults.DEFAULT_EXPANSION_POLICY, max_questions: Optional[int] = None, seed: int = 0, progress: bool = False) -> list[QueryExample]:
    """Query-shaped examples for every answerable question of the SQuAD ``split`` (a seeded sample of
    ``max_questions``), one per (question, kind). ``tokenizer`` is the decoder's (chunks are cut as the
    shipped chunker cuts them); ``embedder`` ranks an article's chunks for ``retrieved`` (default: the shipped
    all-MiniLM-L6-v2), and the expansion ``policy`` picks the chunks read as text, as at query time."""
    from tqdm.auto import tqdm

    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"Unknown example kinds {bad}; choose from {KINDS}.")
    questions = []
    for article in _squad_articles(data_dir, split):
        for p_index, para in enumerate(article["paragraphs"]):
            for qa in para["qas"]:
                answers = [a["text"] for a in qa.get("answers", [])]
                if answers and not qa.get("is_impossible"):
                    questions.append((article["title"], p_index, qa["id"], qa["question"], answers))
    rng = random.Random(seed)
    if max_questions is not None and max_questions < len(questions):
        questions = sorted(rng.sample(questions, max_questions), key=lambda q: (q[0], q[1]))
    articles = {a["title"]: a for a in _squad_articles(data_dir, split)}

    def chunks_of(text: str) -> list[str]:
        return [c.text for c in chunk_text(text, tokenizer, segment_length)]

    retrieval: dict[str, tuple[list[str], object]] = {}
    if "retrieved" in kinds:
        from ..vectors import DenseIndex, as_embedder

        embedder = as_embedder(embedder)

    out: list[QueryExample] = []
    for n, (title, p_index, qid, question, answers) in enumerate(tqdm(questions, desc=f"{split} examples", disable=not progress)):
        article = articles[title]
        if "paragraph" in kinds:
            chunks = chunks_of(article["paragraphs"][p_index]["context"])
            out.append(make_example(f"{qid}:paragraph", question, answers, chunks, [False] * len(chunks), messages_for,
                                    kind="paragraph", doc=title))
        if "retrieved" in kinds:
            if title not in retrieval:
                chunks = chunks_of("\n\n".join(p["context"] for p in article["paragraphs"]))
                retrieval[title] = (chunks, DenseIndex(embedder.embed_documents(chunks)))
            chunks, index = retrieval[title]
            rows, scores = index.search(embedder.embed_query(question), min(top_k, len(chunks)))
            n_expand = expansion_mix[n % len(expansion_mix)]
            expanded = _expanded_rows(question, rows, scores, chunks, n_expand, policy)
            order = sorted(rows)  # reading order
            out.append(make_example(f"{qid}:retrieved", question, answers, [chunks[r] for r in order],
                                    [r in expanded for r in order], messages_for, kind="retrieved", doc=title,
                                    meta={"expand_top_k": n_expand, "rows": order}))
    return out


def _expanded_rows(question: str, rows, scores, chunks: Sequence[str], n_expand: int, policy: str) -> set[int]:
    """The rows a query with ``expand_top_k=n_expand`` reads as text, chosen by the selection policy that queries use
    (positions are not limited here: every retrieved chunk is kept, as the examples' reading order needs)."""
    candidates = [Candidate(id=str(r), doc_id="article", chunk=r, score=s, soft_positions=1, text_positions=1,
                            text=chunks[r]) for r, s in zip(rows, scores)]
    config = SelectionConfig(top_k=None, position_budget=None, text_budget=None, expand_top_k=n_expand, policy=policy)
    picked = select(candidates, config, expansion_scores=expansion_scores(policy, question, candidates))
    return {p.candidate.chunk for p in picked if p.expanded}


def write_query_examples(path: Union[str, Path], examples: Sequence[QueryExample]) -> None:
    """JSONL, gzip-compressed when the name ends in ``.gz`` (the prompts repeat: ~10x smaller)."""
    data = "".join(json.dumps(asdict(e)) + "\n" for e in examples).encode()
    atomic_write_bytes(Path(path), gzip.compress(data, mtime=0) if str(path).endswith(".gz") else data)


def load_query_examples(path: Union[str, Path]) -> list[QueryExample]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No query examples at '{path}': write them with "
                                f"'python -m lloco_index.training.query_data --split train --out {path}'.")
    text = gzip.decompress(path.read_bytes()).decode() if path.name.endswith(".gz") else path.read_text(encoding="utf-8")
    fields = set(QueryExample.__dataclass_fields__)
    return [QueryExample(**{k: v for k, v in json.loads(line).items() if k in fields})
            for line in text.splitlines() if line.strip()]


def messages_fn(template: str) -> MessagesFn:
    """``"bench"``: the benchmark's template; ``"llamaindex"``: LlamaIndex's default text-QA chat template as
    ``LLoCOQueryEngine`` sends it (needs llama-index-core)."""
    if template == "bench":
        return bench_messages
    if template == "llamaindex":
        from ..llamaindex.finetune import text_qa_messages_fn

        return text_qa_messages_fn()
    raise ValueError(f"template must be 'bench' or 'llamaindex', got {template!r}.")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Write query-shaped SQuAD examples (JSONL) for training or evaluation.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--data-dir", default=str(defaults.data_dir()))
    parser.add_argument("--template", choices=("llamaindex", "bench"), default="llamaindex",
                        help="the query template the messages are rendered in")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: paragraph, retrieved")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--expansion-mix", default="0,1,2", help="expand_top_k values cycled over 'retrieved' examples")
    parser.add_argument("--policy", default=defaults.DEFAULT_EXPANSION_POLICY, choices=POLICIES,
                        help="the expansion policy that picks the 'retrieved' chunks read as text")
    parser.add_argument("--max-questions", type=int, default=None)
    parser.add_argument("--segment-length", type=int, default=defaults.DEFAULT_SEGMENT_LENGTH)
    parser.add_argument("--decoder", default=None, help="tokenizer of this decoder (default: the embedded model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from ..models import resolve_decoder_path

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_decoder_path(args.decoder)[0]))
    examples = build_query_examples(
        args.data_dir, args.split, tokenizer, messages_fn(args.template),
        segment_length=args.segment_length, kinds=[k for k in args.kinds.split(",") if k], top_k=args.top_k,
        expansion_mix=[int(v) for v in args.expansion_mix.split(",")], max_questions=args.max_questions,
        policy=args.policy, seed=args.seed, progress=True)
    write_query_examples(args.out, examples)
    print(f"{len(examples)} examples -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
