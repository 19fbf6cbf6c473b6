"""Long-context table (64k and 128k tokens on an 8k-window decoder) from a `lloco-index bench` needle results file.

The bench command measures; this script only reads its results and breaks them down per haystack length,
adding what the aggregate table cannot show: whether the retriever found the chunk holding the needle
(``retrieved``), and whether that chunk was read as text (``expanded``) or as its soft prompt. The needle
chunk is found by rebuilding each haystack exactly as the bench did (same data, tokenizer and chunking).

Usage (the bench runs: tens of minutes each on one core; this report: seconds, minutes with ``--ranks``;
never run in tests)::

    OMP_NUM_THREADS=1 nice -n 10 lloco-index bench --suite full --datasets needle \\
        --needle-lengths 65536 131072 --needle-depths 0.25 0.5 0.75 --systems rag lloco --expand-top-k 1 2 \\
        --tag long-context-needle
    OMP_NUM_THREADS=1 nice -n 10 lloco-index bench --suite full --datasets needle --needle-lengths 131072 \\
        --needle-depths 0.25 0.5 0.75 --systems rag lloco --compressors default --expand-top-k 1 2 --top-k 8 \\
        --tag long-context-needle-top8
    .venv/bin/python benchmarks/long_context_report.py --ranks

Writes ``docs/benchmarks/long-context.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

NEEDLE_MARK = "Dolores Park"  # a phrase of the needle sentence; the chunk holding it is the needle chunk


def needle_ranks(lengths: list[int], depths: list[float], segment: int, cache: Path) -> dict[str, int]:
    """Document id -> the 1-based rank the retriever gives the best needle chunk (minutes: every chunk is embedded
    again with the bench's embedder; cached in ``cache``)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    from transformers import AutoTokenizer

    from lloco_index.eval import datasets as ds
    from lloco_index.eval.retrieval import ChunkIndex, load_embedder
    from lloco_index.models import default_decoder_dir

    tok = AutoTokenizer.from_pretrained(str(default_decoder_dir()))
    bench = ds.needle_in_a_haystack(None, tok, lengths=lengths, depths=depths)
    embedder = load_embedder()
    out = {}
    for doc_id, doc in bench.documents.items():
        index = ChunkIndex.build(doc.text, tok, chunk_tokens=segment, embedder=embedder)
        holding = {i for i, c in enumerate(index.chunks) if NEEDLE_MARK in c or "sandwich and sit" in c}
        rows, _ = index.search_scored(bench.examples[0].question, len(index.chunks))
        out[doc_id] = 1 + min(rows.index(i) for i in holding)
        print(doc_id, out[doc_id], flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


def needle_chunks(lengths: list[int], depths: list[float], segment: int) -> dict[str, set[int]]:
    """Document id -> the chunk numbers that hold the needle (two when a chunk boundary cuts it)."""
    from transformers import AutoTokenizer

    from lloco_index.eval import datasets as ds
    from lloco_index.chunking import chunk_text
    from lloco_index.models import default_decoder_dir

    tok = AutoTokenizer.from_pretrained(str(default_decoder_dir()))
    bench = ds.needle_in_a_haystack(None, tok, lengths=lengths, depths=depths)
    out = {}
    for doc_id, doc in bench.documents.items():
        chunks = [c.text for c in chunk_text(doc.text, tok, segment)]
        out[doc_id] = {i for i, c in enumerate(chunks) if NEEDLE_MARK in c or "sandwich and sit" in c}
    return out


def short(system: str) -> str:
    top = system.split("]")[-1] if "]" in system else ""
    return system.split("[")[0] + ("[identity]" if "token_embedding" in system else "") + top


def length_sections(questions, documents, run, where, ranks, title: str = "") -> list[str]:
    """One section per haystack length: per-system table, recall split by retrieval, needle ranks, compression."""
    segment = run["compressors"][0]["segment_length"]
    lengths = sorted({q["metadata"]["length"] for q in questions})
    lines: list[str] = []
    by = defaultdict(list)
    for q in questions:
        by[(q["metadata"]["length"], q["system"])].append(q)
    systems = list(dict.fromkeys(q["system"] for q in questions))
    for length in lengths:
        lines += [f"## {length // 1024}k tokens ({length} decoder tokens, {length // segment} chunks){title}", "",
                  "| system | n | recall | needle retrieved | needle read as text | positions | prefill s | total s | "
                  "peak RSS MB | load avg |", "|---|---|---|---|---|---|---|---|---|---|"]
        for system in systems:
            rows = by.get((length, system), [])
            if not rows:
                continue
            hit = [r for r in rows if where[r["document_id"]] & set(r.get("retrieved") or [])]
            as_text = [r for r in hit if r["system_kind"] == "rag" or where[r["document_id"]] & set(r.get("expanded") or [])]

            def mean(f):
                return statistics.mean(f(r) for r in rows)

            lines.append(
                f"| `{short(system)}` | {len(rows)} | {mean(lambda r: r['scores']['recall']):.3f} | {len(hit)}/{len(rows)} | "
                f"{len(as_text)}/{len(rows)} | {mean(lambda r: r['positions']):.0f} | "
                f"{mean(lambda r: r['latency']['prefill_s']):.2f} | {mean(lambda r: r['latency']['total_s']):.2f} | "
                f"{mean(lambda r: r['memory']['peak_rss_mb']):.0f} | {mean(lambda r: r['loadavg_1m']):.1f} |")
        # Reading and retrieval apart: the same systems on the haystacks where the needle chunk was retrieved, and
        # where it was not (then no system reading retrieved chunks can know the answer).
        split = {True: [], False: []}
        for doc_id in sorted({r["document_id"] for (n, _), rows in by.items() if n == length for r in rows}):
            rag = [r for r in questions if r["document_id"] == doc_id and r["system_kind"] == "rag"]
            if rag:
                split[bool(where[doc_id] & set(rag[0].get("retrieved") or []))].append(doc_id)
        lines += ["", f"Recall split by retrieval: the needle chunk was in the top {run['top_k']} for "
                      f"{len(split[True])} of {len(split[True]) + len(split[False])} haystacks "
                      f"(the retriever is the same for every system).", "",
                  "| system | recall where the needle was retrieved | recall where it was not |", "|---|---|---|"]
        for system in systems:
            cells = []
            for hit in (True, False):
                vals = [r["scores"]["recall"] for r in by.get((length, system), []) if r["document_id"] in split[hit]]
                cells.append(f"{statistics.mean(vals):.3f} (n={len(vals)})" if vals else "–")
            lines.append(f"| `{short(system)}` | {cells[0]} | {cells[1]} |")
        mine = {d: r for d, r in ranks.items() if d.startswith(f"needle-{length}-")}
        if mine:
            lines += ["", "Where the retriever ranks the needle chunk for the question (1 = best; the systems read the "
                          f"top {run['top_k']}): " + ", ".join(f"depth {d.rsplit('-', 1)[1].lstrip('0') or '0'}%: "
                                                             f"{r} of {length // segment}" for d, r in sorted(mine.items()))
                      + "."]
        docs = [d for d in documents if d["source_tokens"] >= length - 2 and d["source_tokens"] <= length
                and "token_embedding" not in d["compressor"]]
        if docs:
            lines += ["", f"One-off compression per haystack: {statistics.mean(d['compress_s'] for d in docs):.0f} s "
                          f"({statistics.mean(d['source_tokens'] / d['compress_s'] for d in docs):.0f} tokens/s), "
                          f"{docs[0]['soft_positions']} soft-prompt positions, "
                          f"{docs[0]['store_bytes'] / 2**20:.1f} MiB of soft prompts; chunk embedding "
                          f"{statistics.mean(d['index_s'] for d in docs):.0f} s."]
        lines.append("")
    return lines


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="docs/benchmarks/results-long-context-needle.jsonl")
    p.add_argument("--out", default="docs/benchmarks/long-context.md")
    p.add_argument("--command", default="OMP_NUM_THREADS=1 nice -n 10 lloco-index bench --suite full --datasets needle "
                   "--needle-lengths 65536 131072 --needle-depths 0.25 0.5 0.75 --systems rag lloco --expand-top-k 1 2 "
                   "--tag long-context-needle")
    p.add_argument("--also", nargs="*", default=["docs/benchmarks/results-long-context-needle-top8.jsonl"],
                   help="more results files of the same haystacks (e.g. another --top-k), one section each")
    p.add_argument("--also-command", default="OMP_NUM_THREADS=1 nice -n 10 lloco-index bench --suite full --datasets "
                   "needle --needle-lengths 131072 --needle-depths 0.25 0.5 0.75 --systems rag lloco --compressors default "
                   "--expand-top-k 1 2 --top-k 8 --tag long-context-needle-top8")
    p.add_argument("--ranks", action="store_true",
                   help="also rank every chunk for the question, to say where the needle chunk stands (minutes)")
    p.add_argument("--ranks-cache", default="runs/long-context-needle-ranks.json")
    args = p.parse_args(argv)
    records = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    runs = [r for r in records if r["type"] == "run"]
    questions = [r for r in records if r["type"] == "question"]
    documents = [r for r in records if r["type"] == "document"]
    run = runs[-1]
    segment = run["compressors"][0]["segment_length"]
    lengths = sorted({q["metadata"]["length"] for q in questions})
    depths = sorted({q["metadata"]["depth"] for q in questions})
    where = needle_chunks(lengths, depths, segment)
    ranks = needle_ranks(lengths, depths, segment, Path(args.ranks_cache)) if args.ranks else {}
    window = run["context_window"]
    m = run["machine"]

    lines = [f"# Long context: {', '.join(f'{n // 1024}k' for n in lengths)} tokens on an {window // 1024}k-window decoder",
             "",
             f"Needle in a haystack (Paul Graham essays, the usual needle sentence and question), {len(depths)} depths "
             f"per length ({', '.join(str(d) for d in depths)}), decoder `{run['decoder']}` (context window {window} "
             f"positions), compressor `{run['compressors'][0]['label']}` ({run['compressors'][0]['n_slots']} slots per "
             f"{segment} tokens), retriever all-MiniLM-L6-v2 top-{run['top_k']}, the shipped reader adapter.",
             "",
             f"**The full context cannot run:** {lengths[0]} tokens are {lengths[0] / window:.0f}x the window, and even "
             f"the whole document as soft prompts needs {lengths[0] // segment * run['compressors'][0]['n_slots']} to "
             f"{lengths[-1] // segment * run['compressors'][0]['n_slots']} positions (1x-2x the window), so every system "
             f"here reads retrieved chunks. `lloco` = the 4 retrieved chunks as soft prompts; `hybrid<k>` = the same with "
             f"the k best read as text (selective expansion); `rag` = the 4 chunks as text; `[identity]` = the identity "
             f"compressor (token embeddings as soft prompts: must answer as `rag` does).",
             "",
             "`recall` is the share of the answer's words in the prediction (so an answer about San Francisco without "
             "the needle still scores about 0.1 on common words like 'a' and 'day').",
             "",
             "`needle retrieved` = questions whose retrieved chunks include the one holding the needle; `needle read as "
             "text` = of those, the needle chunk was expanded to text (always for `rag`). Latency is end to end per "
             "question (retrieve + assemble + prefill + decode), on one CPU thread.",
             ""]
    lines += length_sections(questions, documents, run, where, ranks)
    by = defaultdict(list)
    for q in questions:
        by[(q["metadata"]["length"], q["system"])].append(q)
    for extra in args.also:
        path = Path(extra)
        if not path.is_file():
            continue
        more = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        extra_run = [r for r in more if r["type"] == "run"][-1]
        extra_q = [r for r in more if r["type"] == "question"]
        lines += length_sections(extra_q, [r for r in more if r["type"] == "document"], extra_run, where, ranks,
                                 f", top-{extra_run['top_k']} retrieval ([`{path.name}`]({path.name}))")
        # In the per-question table below, these rows carry their top-k.
        questions = questions + [{**r, "system": f"{r['system']}@top{extra_run['top_k']}"} for r in extra_q]
    loads = [q["loadavg_1m"] for q in questions]
    lines += [f"Load: the machine's 1-minute load average was {min(loads):.1f}-{max(loads):.1f} on {m.get('cpu_count')} "
              f"cores while these answers ran (other jobs shared the machine), so seconds differ between rows by more "
              f"than their positions explain; the positions are exact.", ""]
    lines += ["## Per question", "", "| length | depth | system | retrieved chunks | needle chunk | expanded | answer |",
              "|---|---|---|---|---|---|---|"]
    for q in sorted(questions, key=lambda r: (r["metadata"]["length"], r["metadata"]["depth"], r["system"])):
        answer = q["prediction"].replace("|", "/").replace("\n", " ")[:70]
        lines.append(f"| {q['metadata']['length'] // 1024}k | {q['metadata']['depth']} | `{short(q['system'])}` | "
                     f"{q.get('retrieved')} | {sorted(where[q['document_id']])} | {q.get('expanded', '–')} | {answer} |")
    lines += ["", f"Machine: {m.get('cpu')}, {m.get('cpu_count')} cores, torch {m.get('torch')} ({m.get('torch_threads')} "
                  f"thread), compute dtype {m.get('compute_dtype')}, generation {m.get('generation_dtype')}, load average "
                  f"at start {m.get('loadavg_1m_at_start', 0):.2f}; run started {run['time']}.", "",
              f"Command: `{args.command}`"
              + (f" and `{args.also_command}`" if any(Path(a).is_file() for a in args.also) else "")
              + f", then `python benchmarks/long_context_report.py --ranks` for this page. Raw results: "
              f"[`{Path(args.results).name}`]({Path(args.results).name}); the bench's own table: "
              f"[`results-long-context-needle.md`](results-long-context-needle.md).", ""]
    out = Path(args.out)
    out.write_text("\n".join(lines))
    print(out)
    return out


if __name__ == "__main__":
    main()
