"""Measure a finetuned adapter on held-out SQuAD documents (split by document), resumably.

    nice -n 10 python -m lloco_index.finetune.benchmark --run-dir runs/finetune-squad

Stages (each skipped when its output exists, so an interrupted run resumes where it stopped):

1. ``index``: one index over the training and held-out articles (each cut to its first
   ``--max-words`` words and the questions of the kept paragraphs), with the shipped compressor, or
   :class:`TokenEmbeddingCompressor` when none is shipped (then the adapter is plain in-domain QA LoRA).
2. ``train``: :class:`LLoCOFinetuneEngine` on the training articles' questions (gold answers, contexts
   from the retriever, exactly as queries see them); resumable from its checkpoints.
3. ``eval``: the held-out articles' questions through :class:`LLoCOQueryEngine` (compact, the same top-k)
   with soft prompts and no adapter, with the compressor's reader adapter (when it ships one), with the
   finetuned adapter, closed book (the same template with an empty context), and the full-document baseline (the same prompt
   with the whole article's text); per-question results are appended to jsonl files and skipped on rerun.

Prints and writes ``summary.json``: EM/F1 per condition, training time, tokens/s, adapter size.
"""

from __future__ import annotations

import argparse
import json
import sys
import logging
import random
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .. import defaults
from ..fileio import atomic_write_bytes
from ..selection import POLICIES

logger = logging.getLogger(__name__)


def _squad(path: Path, first: int, count: int, max_words: int, max_questions: int, seed: int):
    from ..eval.datasets import load_squad

    bench = load_squad(path, max_documents=first + count, max_document_words=max_words)
    doc_ids = list(bench.documents)[first:first + count]
    docs = {d: bench.documents[d] for d in doc_ids}
    examples = [e for e in bench.examples if e.document_id in docs]
    rng = random.Random(seed)
    if max_questions and len(examples) > max_questions:  # the same share from every article
        per_doc = max(1, max_questions // len(docs))
        picked = []
        for d in doc_ids:
            mine = [e for e in examples if e.document_id == d]
            picked.extend(rng.sample(mine, min(per_doc, len(mine))))
        examples = picked
    return docs, examples


def _compressor(backbone):
    from ..compressors import default_compressor

    compressor, notice = default_compressor(backbone)
    return compressor, "shipped" if notice is None else "token_embedding (the shipped compressor is not available)"


def _evaluate(name: str, path: Path, examples, answer_fn) -> dict[str, float]:
    """Answer every example not yet in ``path`` (jsonl), then score all of them."""
    from tqdm.auto import tqdm

    from ..eval.metrics import exact_match, f1_score

    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["id"]] = r
    with open(path, "a", encoding="utf-8") as out:
        for ex in tqdm([e for e in examples if e.id not in done], desc=f"eval {name}", unit="q"):
            start = time.perf_counter()
            prediction, positions = answer_fn(ex)
            r = {"id": ex.id, "question": ex.question, "answers": ex.answers, "prediction": prediction,
                 "positions": positions, "seconds": time.perf_counter() - start,
                 "em": exact_match(prediction, ex.answers), "f1": f1_score(prediction, ex.answers)}
            out.write(json.dumps(r) + "\n")
            out.flush()
            done[ex.id] = r
    rows = [done[e.id] for e in examples]
    n = max(len(rows), 1)
    return {"n": len(rows), "em": sum(r["em"] for r in rows) / n, "f1": sum(r["f1"] for r in rows) / n,
            "mean_positions": sum(r["positions"] for r in rows) / n, "mean_seconds": sum(r["seconds"] for r in rows) / n}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from llama_index.core import Document

    from ..backbone import Backbone
    from ..llamaindex import LLoCOLLM, LLoCOQueryEngine, build_index, load_index
    from ..llamaindex.finetune import LLoCOFinetuneEngine
    from ..eval.runner import machine_info
    from .config import FinetuneConfig

    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = Path(args.data_dir)
    train_docs, train_qs = _squad(data / "squad" / "train.json", 0, args.train_docs, args.max_words, args.train_questions, 0)
    test_docs, test_qs = _squad(data / "squad" / "test.json", 0, args.test_docs, args.max_words, args.test_questions, 1)
    assert not set(train_docs) & set(test_docs), "train and held-out articles overlap"

    storage = run_dir / "storage"
    backbone = Backbone.load()
    if (storage / "lloco_index.json").is_file():
        index, store, compressor = load_index(storage)
        kind = json.loads((run_dir / "compressor.json").read_text())["kind"]
    else:
        compressor, kind = _compressor(backbone)
        documents = [Document(text=d.text, metadata={"title": d.title}, id_=d.id) for d in {**train_docs, **test_docs}.values()]
        start = time.perf_counter()
        index, store = build_index(documents, compressor, persist_dir=storage, show_progress=True)
        atomic_write_bytes(run_dir / "compressor.json", json.dumps(
            {"kind": kind, "fingerprint": compressor.fingerprint, "seconds": time.perf_counter() - start}).encode())
    llm = LLoCOLLM(compressor, store, max_new_tokens=args.max_new_tokens)

    qa = [{"question": e.question, "answers": e.answers, "group": e.document_id, "id": e.id} for e in train_qs]
    config = FinetuneConfig(epochs=args.epochs, learning_rate=args.lr, seed=0)
    mix = [int(x) for x in args.expansion_mix.split(",")] if args.expansion_mix else None
    engine = LLoCOFinetuneEngine(index, qa, llm=llm, adapter_name="squad", output_dir=run_dir / "adapter", config=config,
                                 similarity_top_k=args.top_k, use_gold_contexts=False, expansion_mix=mix,
                                 policy=args.policy)
    result = engine.finetune(stop_after_steps=args.stop_after_steps)
    summary: dict[str, Any] = {
        "machine": f"{torch.get_num_threads()} torch thread(s), CPU", "compressor": kind, "top_k": args.top_k,
        "train_articles": list(train_docs), "test_articles": list(test_docs), "train_questions": len(train_qs),
        "test_questions": len(test_qs), "finetune": result.metrics(), "config": config.to_dict(),
        "expansion_mix": mix}
    if not result.finished:
        print(json.dumps(summary, indent=2))
        return summary

    tuned = engine.get_finetuned_model(max_new_tokens=args.max_new_tokens)
    plain = LLoCOLLM(compressor, store, max_new_tokens=args.max_new_tokens, adapter=None)

    def via_engine(model, expand_top_k=0, top_k=args.top_k, policy="score"):  # "score": the rows measured first
        query_engine = LLoCOQueryEngine.from_index(index, model, similarity_top_k=top_k, expand_top_k=expand_top_k,
                                                   policy=policy)

        def answer(ex):
            response = query_engine.query(ex.question)
            # Positions the decoder read: the same call rebuilt from the nodes the engine used.
            chunks = [n.node.get_content(metadata_mode="llm") for n in response.source_nodes]
            positions = model.reader.count_positions(model.reader.render(engine.query_messages(ex.question, chunks)))
            return str(response).strip(), positions

        return answer

    def text_messages(ex, with_document: bool):
        return engine.query_messages(ex.question, [test_docs[ex.document_id].text] if with_document else [])

    def plain_reading(adapter, with_document: bool):
        """The same template with the whole article (or nothing, closed book) read by ``adapter``."""
        def answer(ex):
            result = llm.reader.generate(text_messages(ex, with_document), adapter=adapter,
                                         max_new_tokens=args.max_new_tokens)
            return result.text, result.prompt.positions
        return answer

    full_document, closed_book = plain_reading(None, True), plain_reading(None, False)

    # The full-document baseline reads ~4x the positions: on a slow machine run it on an evenly spread subset
    # and compare every condition on that subset too.
    subset = test_qs
    if args.full_limit and args.full_limit < len(test_qs):
        stride = len(test_qs) / args.full_limit
        subset = [test_qs[int(i * stride)] for i in range(args.full_limit)]

    conditions = [("soft_prompts_no_adapter", via_engine(plain))]
    reader = compressor.reader_adapter
    if reader is not None:  # the compressor's own reader: what the domain adapter starts from
        shipped = LLoCOLLM(compressor, store, max_new_tokens=args.max_new_tokens, adapter=reader)
        conditions += [("soft_prompts_reader_adapter", via_engine(shipped)),
                       ("hybrid1_reader_adapter", via_engine(shipped, expand_top_k=1))]
    conditions += [("soft_prompts_adapter", via_engine(tuned)), ("closed_book", closed_book),
                   ("full_document_text", full_document)]
    if mix is not None:  # a mixed-context adapter: every system on the same decoder and adapter
        conditions += [
            ("hybrid1_adapter", via_engine(tuned, expand_top_k=1)),
            ("hybrid2_adapter", via_engine(tuned, expand_top_k=2)),
            ("hybrid1_likelihood_adapter", via_engine(tuned, expand_top_k=1, policy="likelihood")),
            ("hybrid1_lexical_adapter", via_engine(tuned, expand_top_k=1, policy="lexical")),
            ("hybrid2_lexical_adapter", via_engine(tuned, expand_top_k=2, policy="lexical")),
            ("text_rag_top1_adapter", via_engine(tuned, expand_top_k=1, top_k=1)),
            (f"text_rag_top{args.top_k}_adapter", via_engine(tuned, expand_top_k=args.top_k)),
            # The text baselines read with the same finetuned adapter as the lloco systems.
            ("closed_book_adapter", plain_reading("squad", False)),
            ("full_document_text_adapter", plain_reading("squad", True)),
        ]
    if args.conditions:  # a subset, in the order given (the rest is left for a later run)
        known = dict(conditions)
        unknown = [c for c in args.conditions if c not in known]
        if unknown:
            raise SystemExit(f"error: unknown conditions {unknown}; known: {list(known)}")
        conditions = [(c, known[c]) for c in args.conditions]
    results, on_subset = {}, {}
    for name, fn in conditions:
        if name.startswith("full_document_text") and args.skip_full:
            continue
        questions = subset if name.startswith("full_document_text") else test_qs
        results[name] = _evaluate(name, run_dir / f"eval_{name}.jsonl", questions, fn)
        if subset is not test_qs:
            on_subset[name] = _evaluate(name, run_dir / f"eval_{name}.jsonl", subset, fn)
        print(name, json.dumps(results[name]), flush=True)
    summary["eval"] = results
    if "closed_book" in results and "full_document_text" in results:
        gap = results["full_document_text"]["f1"] - results["closed_book"]["f1"]
        summary["normalised_f1"] = {k: (v["f1"] - results["closed_book"]["f1"]) / gap if gap > 0 else float("nan")
                                    for k, v in results.items()}
    summary["machine_info"] = machine_info()
    if on_subset:
        summary["eval_on_full_document_subset"] = on_subset
    atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    print(json.dumps(summary, indent=2))
    return summary


def write_report(run_dir: Path, out_dir: Path, name: str, command: str) -> Path:
    """A markdown table and an accuracy-vs-positions plot from the per-question files of a run (all conditions
    found, also a partial run's); returns the markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[str, list[dict]] = {}
    for path in sorted(Path(run_dir).glob("eval_*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if records:
            rows[path.stem[len("eval_"):]] = records

    def mean(records, key):
        return sum(r[key] for r in records) / len(records)

    subset = {r["id"] for r in rows.get("full_document_text_adapter", [])}
    lines = [f"# Selective expansion on held-out SQuAD articles: `{name}`", "",
             "Every `*_adapter` system reads with the same decoder and the same mixed-context adapter. `positions` are "
             "the decoder's input positions, `seconds` the end-to-end time per question on this machine. The last "
             "column compares each system with the full document on the questions that system was also run on.", "",
             "| system | n | EM | F1 | positions | seconds | F1 on the full-document subset | x fewer positions than full document | x faster than full document |",
             "|---|---|---|---|---|---|---|---|---|"]
    full = rows.get("full_document_text_adapter")
    for system, records in sorted(rows.items(), key=lambda kv: mean(kv[1], "positions")):
        same = [r for r in records if r["id"] in subset]
        extra = ("–", "–", "–")
        if full and same:
            extra = (f"{mean(same, 'f1'):.3f}", f"{mean(full, 'positions') / mean(same, 'positions'):.1f}",
                     f"{mean(full, 'seconds') / mean(same, 'seconds'):.1f}")
        lines.append(f"| `{system}` | {len(records)} | {mean(records, 'em'):.3f} | {mean(records, 'f1'):.3f} | "
                     f"{mean(records, 'positions'):.0f} | {mean(records, 'seconds'):.2f} | {' | '.join(extra)} |")
    summary = Path(run_dir) / "summary.json"
    if summary.is_file():
        info = json.loads(summary.read_text())
        lines += ["", f"Adapter: {info['finetune'].get('train_examples')} training examples, "
                      f"{info['finetune'].get('step')} steps, expansion mix {info.get('expansion_mix')}."]
    lines += ["", f"Command: `{command}`", "", f"![accuracy vs positions]({name}-accuracy-vs-positions.png)", ""]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, records in rows.items():
        ax.scatter(mean(records, "positions"), mean(records, "f1"))
        ax.annotate(system.replace("_adapter", ""), (mean(records, "positions"), mean(records, "f1")), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("decoder positions per question (log)")
    ax.set_ylabel("F1")
    ax.set_title("Accuracy against positions (same decoder and adapter)")
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}-accuracy-vs-positions.png", dpi=120)
    plt.close(fig)
    md = out_dir / f"{name}.md"
    atomic_write_bytes(md, "\n".join(lines).encode())
    return md


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/finetune-squad")
    p.add_argument("--data-dir", default=str(defaults.data_dir()))
    p.add_argument("--train-docs", type=int, default=4)
    p.add_argument("--test-docs", type=int, default=2)
    p.add_argument("--train-questions", type=int, default=200)
    p.add_argument("--test-questions", type=int, default=60)
    p.add_argument("--max-words", type=int, default=1500, help="cut each article to its first N words")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expansion-mix", default=None,
                   help="train on contexts with these expand_top_k values cycled, e.g. 0,1,2,4 (adds the hybrid and "
                        "same-adapter text systems to the evaluation)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine (no spin-waiting)")
    p.add_argument("--stop-after-steps", type=int, default=None)
    p.add_argument("--skip-full", action="store_true")
    p.add_argument("--conditions", nargs="+", default=None, help="evaluate only these conditions, in this order")
    p.add_argument("--full-limit", type=int, default=None, help="full-document baseline on N evenly spread questions")
    p.add_argument("--policy", default=defaults.DEFAULT_EXPANSION_POLICY, choices=POLICIES,
                   help="expansion policy of the training examples' mixed contexts (a run resumes with its own)")
    p.add_argument("--report", default=None, metavar="NAME",
                   help="only write docs/benchmarks/NAME.md and its plot from the run's per-question files")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = p.parse_args(argv)
    if args.report:
        print(write_report(Path(args.run_dir), Path("docs/benchmarks"), args.report,
                           "python -m lloco_index.finetune.benchmark " + " ".join(argv if argv is not None else sys.argv[1:])))
        return
    run(args)


if __name__ == "__main__":
    main()
