"""Which expansion policy puts the answer's chunk in as text: the selection step alone, no generation.

For every question the benchmark's retriever (the shipped chunker's segment length, all-MiniLM-L6-v2, top-k)
returns its chunks; each policy of :mod:`lloco_index.selection` then picks the ``expand_top_k`` chunks read as
text, through the same :func:`~lloco_index.selection.select` call the query path makes. A hit is an expanded
chunk that contains a gold answer (SQuAD: any gold answer string, case-folded; needle: its place name).
``in top-k`` is the ceiling: the answer's chunk was retrieved at all. Only retrieval and selection run, so the
whole SQuAD test split fits in minutes on a CPU; the answers a decoder gives from these contexts are the bench's
job (``lloco-index bench --policies score lexical``).

    python benchmarks/expansion_policy.py --out docs/benchmarks/expansion-policy
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from lloco_index import defaults
from lloco_index.eval import datasets as ds
from lloco_index.eval.retrieval import ChunkIndex, load_embedder
from lloco_index.eval.runner import machine_info
from lloco_index.models import resolve_decoder_path
from lloco_index.selection import Candidate, SelectionConfig, expansion_scores, select

POLICIES = ("score", "lexical")  # "likelihood" needs decoder passes per chunk; the bench measures it end to end


def _expanded(question: str, index: ChunkIndex, rows, scores, policy: str, k: int) -> list[int]:
    candidates = [Candidate(id=str(r), doc_id="document", chunk=r, score=s, soft_positions=1, text_positions=1,
                            text=index.chunks[r]) for r, s in zip(rows, scores)]
    config = SelectionConfig(top_k=None, position_budget=None, text_budget=None, expand_top_k=k, policy=policy)
    picked = select(candidates, config, expansion_scores=expansion_scores(policy, question, candidates))
    return [p.candidate.chunk for p in picked if p.expanded]


def measure(bench: ds.Benchmark, hit, tokenizer, embedder, *, top_k: int, segment: int, group=lambda ex: "all"):
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for doc_id, examples in bench.by_document().items():
        index = ChunkIndex.build(bench.documents[doc_id].text, tokenizer, chunk_tokens=segment, embedder=embedder)
        for ex in examples:
            rows, scores = index.search_scored(ex.question, top_k)
            has_answer = {r: hit(ex, index.chunks[r]) for r in rows}
            c = counts[str(group(ex))]
            c["questions"] += 1
            c["in_top_k"] += any(has_answer.values())
            for policy in POLICIES:
                for k in (1, 2):
                    c[f"{policy}@{k}"] += any(has_answer[r] for r in _expanded(ex.question, index, rows, scores, policy, k))
    return {g: dict(c) for g, c in counts.items()}


def _table(results: dict) -> list[str]:
    cols = [f"{p}@{k}" for k in (1, 2) for p in POLICIES]
    lines = ["| data | questions | answer in top-k | " + " | ".join(f"`{c}`" for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for dataset, groups in results.items():
        for group, c in groups.items():
            n = c["questions"]
            lines.append(f"| {dataset} {group} | {n} | {c['in_top_k'] / n:.3f} | "
                         + " | ".join(f"{c[col] / n:.3f}" for col in cols) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="default: ../shared/data")
    parser.add_argument("--out", default="docs/benchmarks/expansion-policy", help="writes OUT.json and OUT.md")
    parser.add_argument("--top-k", type=int, default=defaults.DEFAULT_TOP_K)
    parser.add_argument("--needle-lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--needle-depths", type=float, nargs="+", default=[0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9])
    parser.add_argument("--squad-articles", type=int, default=None, help="default: every test article")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    start = time.time()
    data = Path(args.data_dir) if args.data_dir else defaults.data_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_decoder_path(None)[0]))
    embedder = load_embedder()
    segment = defaults.DEFAULT_SEGMENT_LENGTH
    squad = ds.load_squad(data / "squad" / "test.json", max_documents=args.squad_articles)
    needle = ds.needle_in_a_haystack(data / "needle" / "paul_graham_essays", tokenizer, lengths=args.needle_lengths,
                                     depths=args.needle_depths)
    results = {
        "squad": measure(squad, lambda ex, text: any(a.lower() in text.lower() for a in ex.answers), tokenizer,
                         embedder, top_k=args.top_k, segment=segment),
        # The needle's answer is one clause; a chunk with its place name holds it (a chunk edge can split the rest).
        "needle": measure(needle, lambda ex, text: "Dolores Park" in text, tokenizer, embedder,
                          top_k=args.top_k, segment=segment, group=lambda ex: f"{ex.metadata['length'] // 1024}k"),
    }
    record = {"results": results, "top_k": args.top_k, "segment_length": segment, "policies": list(POLICIES),
              "needle_depths": args.needle_depths, "seconds": round(time.time() - start, 1),
              "machine": machine_info(),
              "command": "python benchmarks/expansion_policy.py --out " + args.out}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    md = ["# Expansion policies: is the answer's chunk the one read as text?", "",
          f"Top-{args.top_k} retrieval with the benchmark's retriever; `policy@k` = share of questions where one of "
          f"the k chunks the policy expands contains the answer. Command: `{record['command']}` "
          f"({record['seconds']:.0f} s).", "", *_table(results), ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
