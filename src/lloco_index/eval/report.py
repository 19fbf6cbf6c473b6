"""Turn a results JSONL into the markdown table and the plots under docs/benchmarks/.

>>> from lloco_index.eval.report import write_report
>>> write_report("docs/benchmarks/results-quick.jsonl", "docs/benchmarks", "quick")
{'table': 'docs/benchmarks/results-quick.md', 'plots': [...]}

Only the records of the systems and compressor fingerprints of the latest run in the file are
reported, so a file that outlived a retrained compressor does not mix two models' numbers.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional, Union

from .metrics import PRIMARY_METRIC, normalized_score

PathLike = Union[str, Path]
METRIC_COLUMNS = {"mc": ["accuracy", "accuracy_loglik"], "extractive": ["em", "f1", "rouge_l"],
                  "abstractive": ["rouge_l"], "needle": ["recall", "rouge_l"]}
SYSTEM_ORDER = ["closed_book", "closed_book+reader", "full_context", "full_context+reader", "rag", "rag+reader", "llmlingua"]


def baseline(systems, kind: str):
    """The ``closed_book`` or ``full_context`` row the others are compared with: the one that reads with the
    compressor's reader adapter when the run has it (the same adapter as the lloco systems), else the plain one."""
    return systems.get(kind + "+reader") or systems.get(kind)


def read_records(path: PathLike) -> list[dict]:
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def current(records: list[dict]) -> tuple[Optional[dict], list[dict], list[dict]]:
    """The latest run record and the question/document records that belong to its systems."""
    runs = [r for r in records if r.get("type") == "run"]
    run = runs[-1] if runs else None
    fingerprints = {c["fingerprint"] for c in run["compressors"]} if run else None
    systems = set(run["systems"]) if run else None

    def keep(r: dict) -> bool:
        if fingerprints is not None and r.get("fingerprint") and r["fingerprint"] not in fingerprints:
            return False
        return systems is None or r.get("type") == "document" or r["system"] in systems

    questions = [r for r in records if r.get("type") == "question" and keep(r)]
    documents = [r for r in records if r.get("type") == "document" and keep(r)]
    return run, questions, documents


def _mean(values: Iterable[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isinf(value):
            return "never"
        return f"{value:.{digits}f}"
    return str(value)


def _system_sort_key(name: str) -> tuple:
    return (SYSTEM_ORDER.index(name) if name in SYSTEM_ORDER else len(SYSTEM_ORDER), name)


def summarize(questions: list[dict]) -> dict[str, dict[str, dict]]:
    """dataset -> system -> aggregated numbers (means over that system's questions)."""
    grouped: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in questions:
        grouped[r["dataset"]][r["system"]].append(r)
    out: dict[str, dict[str, dict]] = {}
    for dataset, systems in grouped.items():
        out[dataset] = {}
        for system, rows in systems.items():
            task = rows[0]["task"]
            agg = {"n": len(rows), "task": task, "kind": rows[0].get("system_kind", system)}
            for metric in METRIC_COLUMNS.get(task, []):
                agg[metric] = _mean(r["scores"].get(metric) for r in rows)
            agg["positions"] = _mean(r["positions"] for r in rows)
            agg["source_tokens"] = _mean(r.get("source_tokens") for r in rows)
            for part in ("retrieve_s", "compress_s", "assemble_s", "prefill_s", "decode_s", "total_s"):
                agg[part] = _mean(r["latency"].get(part) for r in rows)
            agg["peak_rss_mb"] = max(r["memory"]["peak_rss_mb"] for r in rows)
            agg["truncated"] = sum(1 for r in rows if r.get("truncated"))
            agg["load"] = _mean(r.get("loadavg_1m") for r in rows)
            agg["ids"] = {r["example_id"] for r in rows}
            out[dataset][system] = agg
    # Normalised score of the primary metric, on each system's own questions.
    for dataset, systems in out.items():
        closed, full = baseline(systems, "closed_book"), baseline(systems, "full_context")
        for agg in systems.values():
            metric = PRIMARY_METRIC.get(agg["task"])
            agg["normalized"] = (normalized_score(agg[metric], closed[metric], full[metric])
                                 if closed and full and agg.get(metric) is not None else None)
            if full and full["positions"]:
                agg["fewer_positions"] = full["positions"] / agg["positions"] if agg["positions"] else None
                agg["speedup"] = full["total_s"] / agg["total_s"] if agg["total_s"] else None
                agg["prefill_speedup"] = full["prefill_s"] / agg["prefill_s"] if agg["prefill_s"] else None
    return out


def compression_table(documents: list[dict], questions: list[dict]) -> list[dict]:
    """Per compressor: one-off cost, throughput, bytes per source token, and queries to break even.

    Break-even against a baseline = one-off compression time of a document / (baseline's mean query
    latency − lloco's mean query latency on that document's questions); ``inf`` when lloco is not faster.
    """
    by_doc_system: dict[tuple, list[float]] = defaultdict(list)
    for r in questions:
        by_doc_system[(r["dataset"], r["document_id"], r["system"])].append(r["latency"]["total_s"])
    full_name = "full_context+reader" if any(r["system"] == "full_context+reader" for r in questions) else "full_context"
    lloco_systems = defaultdict(set)
    for r in questions:
        if r.get("system_kind") == "lloco" and r.get("fingerprint"):
            lloco_systems[r["fingerprint"]].add(r["system"])
    rows = []
    by_comp: dict[str, list[dict]] = defaultdict(list)
    for d in documents:
        by_comp[d["fingerprint"]].append(d)
    for fingerprint, docs in by_comp.items():
        row = {"compressor": docs[0]["compressor"], "fingerprint": fingerprint, "documents": len(docs),
               "source_tokens": _mean(d["source_tokens"] for d in docs),
               "compress_s": _mean(d["compress_s"] for d in docs),
               "tokens_per_s": sum(d["source_tokens"] for d in docs) / max(sum(d["compress_s"] for d in docs), 1e-9),
               "bytes_per_token": sum(d["store_bytes"] for d in docs) / max(sum(d["source_tokens"] for d in docs), 1),
               "ratio": sum(d["source_tokens"] for d in docs) / max(sum(d["soft_positions"] for d in docs), 1)}
        systems = sorted(s for s in lloco_systems.get(fingerprint, ()) if "+adapter" not in s)
        system = systems[0] if systems else None
        for column, base_name in (("full_context", full_name), ("llmlingua", "llmlingua")):
            values = []
            for d in docs:
                base = by_doc_system.get((d["dataset"], d["document_id"], base_name))
                mine = by_doc_system.get((d["dataset"], d["document_id"], system)) if system else None
                if not base or not mine:
                    continue
                saving = statistics.fmean(base) - statistics.fmean(mine)
                values.append(d["compress_s"] / saving if saving > 0 else math.inf)
            row[f"break_even_vs_{column}"] = statistics.median(values) if values else None
        rows.append(row)
    return rows


def needle_by_length(questions: list[dict]) -> dict[str, dict[int, tuple[float, int]]]:
    """system -> haystack length -> (mean recall over its depths, questions)."""
    cells: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in questions:
        if r.get("task") == "needle" and "length" in (r.get("metadata") or {}):
            cells[r["system"]][r["metadata"]["length"]].append(r["scores"]["recall"])
    return {s: {l: (statistics.fmean(v), len(v)) for l, v in row.items()} for s, row in cells.items()}


def identity_check(questions: list[dict]) -> Optional[tuple[int, int]]:
    """How often lloco[token_embedding] gave exactly the text-RAG answer (it should: same chunks, same vectors)."""
    rag = {(r["dataset"], r["example_id"]): r["prediction"] for r in questions if r["system"] == "rag"}
    ident = [(r["dataset"], r["example_id"], r["prediction"]) for r in questions if r["system"] == "lloco[token_embedding]"]
    pairs = [(rag[(d, e)], p) for d, e, p in ident if (d, e) in rag]
    if not pairs:
        return None
    return sum(a == b for a, b in pairs), len(pairs)


def markdown(run: Optional[dict], questions: list[dict], documents: list[dict], tag: str, plots: list[str]) -> str:
    table = summarize(questions)
    lines = [f"# lloco-index benchmark: `{tag}`", ""]
    if run:
        machine = run.get("machine", {})
        lines += [
            f"- Decoder: `{run['decoder']}`, context window {run.get('context_window')} positions; "
            f"retriever: all-MiniLM-L6-v2 + faiss, top-k {run['top_k']}; max new tokens {run['max_new_tokens']}.",
            f"- Machine: {machine.get('cpu', machine.get('processor', '?'))}, {machine.get('cpu_count')} cores, "
            f"torch {machine.get('torch')} ({machine.get('torch_threads')} threads){', GPU ' + machine['gpu'] if machine.get('gpu') else ''}; "
            f"last run started {run['time']}.",
        ]
        for c in run["compressors"]:
            lines.append(f"- Compressor `{c['label']}`: fingerprint `{c['fingerprint']}`, {c['n_slots']} slots per "
                         f"{c['segment_length']} tokens; {c['note']}.")
        if run.get("adapter"):
            lines.append(f"- Finetuned adapter: `{run['adapter']}`.")
        if run.get("text_reader"):
            lines.append(f"- Text systems (`+reader`) read with the reader adapter of `{run['text_reader']}`, as the lloco "
                         f"and hybrid systems do; `rag_top<n>` reads the best n chunks, `rag_cut<n>` the text of the best "
                         f"chunks cut to the positions `hybrid<n>` read on the same question.")
        if run.get("llmlingua"):
            info = run["llmlingua"]
            limit = run.get("peer_max_examples")
            lines.append(f"- LLMLingua {info.get('llmlingua')} (transformers {info.get('transformers')}, own venv, SmolLM2 as "
                         f"scorer) compresses the retrieved chunks to rate {run['llmlingua_rate']:.3f} on every query; its "
                         f"compression time is in its latency" + (f"; run on the first {limit} example(s) per dataset only." if limit else "."))
        for system, reason in (run.get("skipped") or {}).items():
            lines.append(f"- **Skipped `{system}`**: {reason}.")
        for note in run.get("notes", [])[1:]:
            lines.append(f"- Data: {note}.")
        lines.append("")
    for dataset, systems in table.items():
        task = next(iter(systems.values()))["task"]
        metrics = METRIC_COLUMNS.get(task, [])
        lines += [f"## {dataset} ({task}; primary metric `{PRIMARY_METRIC.get(task)}`)", ""]
        header = ["system", "n", *metrics, "normalised", "positions", "x fewer", "retrieve s", "compress s",
                  "assemble s", "prefill s", "decode s", "total s", "speed-up", "prefill speed-up", "peak RSS MB", "truncated", "load avg"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for name in sorted(systems, key=_system_sort_key):
            a = systems[name]
            cells = [f"`{name}`", str(a["n"]), *[_fmt(a.get(m)) for m in metrics], _fmt(a.get("normalized")),
                     _fmt(a["positions"], 0), _fmt(a.get("fewer_positions"), 1), _fmt(a["retrieve_s"]),
                     _fmt(a["compress_s"], 2), _fmt(a["assemble_s"]), _fmt(a["prefill_s"], 2), _fmt(a["decode_s"], 2),
                     _fmt(a["total_s"], 2), _fmt(a.get("speedup"), 2), _fmt(a.get("prefill_speedup"), 2), _fmt(a["peak_rss_mb"], 0), str(a["truncated"]), _fmt(a["load"], 1)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    needle = needle_by_length(questions)
    if needle:
        lengths = sorted({l for row in needle.values() for l in row})
        lines += ["## needle recall by haystack length", "",
                  "Mean recall over the depths at each length (questions per cell in brackets); the target is 0.7 at every length up to 32k.", "",
                  "| system | " + " | ".join(f"{l // 1024}k" if l >= 1024 else str(l) for l in lengths) + " | lowest |",
                  "|---|" + "---|" * (len(lengths) + 1)]
        for name in sorted(needle, key=_system_sort_key):
            row = needle[name]
            cells = [f"{row[l][0]:.3f} ({row[l][1]})" if l in row else "–" for l in lengths]
            lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {min(v[0] for v in row.values()):.3f} |")
        lines.append("")
    comp = compression_table(documents, questions)
    if comp:
        lines += ["## One-off compression and break-even", "",
                  "| compressor | documents | mean source tokens | compress s / doc | tokens/s | ratio | store bytes / source token | break-even queries vs full context | vs LLMLingua |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in comp:
            lines.append(f"| `{c['compressor']}` | {c['documents']} | {_fmt(c['source_tokens'], 0)} | {_fmt(c['compress_s'], 2)} | "
                         f"{_fmt(c['tokens_per_s'], 0)} | {_fmt(c['ratio'], 1)}x | {_fmt(c['bytes_per_token'], 1)} | "
                         f"{_fmt(c['break_even_vs_full_context'], 2)} | {_fmt(c['break_even_vs_llmlingua'], 2)} |")
        lines.append("")
    ident = identity_check(questions)
    if ident:
        lines += [f"Identity check: `lloco[token_embedding]` gave the text-RAG answer on {ident[0]} of {ident[1]} questions "
                  f"(same chunks as token embeddings instead of text; a difference means the chunk text tokenised inside the prompt "
                  f"differs at a chunk boundary from the chunk tokenised alone: compare the two rows' positions).", ""]
    lines += ["Columns: `positions` = decoder input positions (template + context + question); `x fewer` and `speed-up` "
              "are against `full_context` (its `+reader` row when the run has one) on the same dataset; `total s` = retrieve + compress + assemble + prefill "
              "(to the first token) + decode; `normalised` = (system − closed book) / (full context − closed book) on "
              "the primary metric; `truncated` = questions whose document was cut to the window; `load avg` = the machine's "
              "1-minute load average at the end of each answer (other jobs on a shared machine stretch latencies); "
              "`prefill speed-up` isolates the part the compression ratio bounds. Break-even = one-off "
              "compression time / per-query saving (median over documents).", ""]
    for plot in plots:
        lines.append(f"![{Path(plot).stem}]({Path(plot).name})")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ plots
def plot_all(questions: list[dict], out_dir: Path, tag: str, context_window: Optional[int]) -> list[str]:
    """Accuracy vs positions, latency vs context length, and the needle heatmap; returns the written paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    table = summarize(questions)
    # 1. Score vs positions, one panel per dataset.
    if table:
        fig, axes = plt.subplots(1, len(table), figsize=(5 * len(table), 4), squeeze=False)
        for ax, (dataset, systems) in zip(axes[0], table.items()):
            metric = PRIMARY_METRIC[next(iter(systems.values()))["task"]]
            for name in sorted(systems, key=_system_sort_key):
                a = systems[name]
                if a.get(metric) is None:
                    continue
                ax.scatter(max(a["positions"], 1), a[metric], s=40)
                ax.annotate(name, (max(a["positions"], 1), a[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("log")
            ax.set_xlabel("mean positions fed to the decoder")
            ax.set_ylabel(metric)
            ax.set_title(dataset)
        fig.tight_layout()
        path = out_dir / f"{tag}-accuracy-vs-positions.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    # 2. Query latency vs the document's length in tokens.
    series: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in questions:
        series[r["system"]][r["document_tokens"]].append(r["latency"]["total_s"])
    if series:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in sorted(series, key=_system_sort_key):
            xs = sorted(series[name])
            ax.plot(xs, [statistics.fmean(series[name][x]) for x in xs], marker="o", label=name)
        if context_window:
            ax.axvline(context_window, color="grey", linestyle="--", linewidth=1)
            ax.text(context_window, ax.get_ylim()[1] * 0.95, "model window: full context\ntruncated past it ", fontsize=7, va="top", ha="right")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("document length (decoder tokens)")
        ax.set_ylabel("query latency, s (end to end)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{tag}-latency-vs-length.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    # 3. Needle heatmaps (recall), one per system.
    needle = [r for r in questions if r["task"] == "needle"]
    if needle:
        names = sorted({r["system"] for r in needle}, key=_system_sort_key)
        lengths = sorted({r["metadata"]["length"] for r in needle})
        depths = sorted({r["metadata"]["depth"] for r in needle})
        fig, axes = plt.subplots(1, len(names), figsize=(2.2 + 1.0 * len(lengths) * len(names), 3.2), squeeze=False)
        for ax, name in zip(axes[0], names):
            grid = [[math.nan] * len(lengths) for _ in depths]
            for r in needle:
                if r["system"] == name:
                    grid[depths.index(r["metadata"]["depth"])][lengths.index(r["metadata"]["length"])] = r["scores"]["recall"]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [f"{l // 1024}k" if l >= 1024 else str(l) for l in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{int(d * 100)}%" for d in depths], fontsize=7)
            ax.set_title(name, fontsize=8)
            ax.set_xlabel("context length", fontsize=7)
        axes[0][0].set_ylabel("needle depth", fontsize=7)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="answer recall")
        path = out_dir / f"{tag}-needle-heatmap.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


def write_report(results: PathLike, out_dir: PathLike, tag: str) -> dict:
    """Write ``results-<tag>.md`` and the plots from a results JSONL; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run, questions, documents = current(read_records(results))
    plots = plot_all(questions, out_dir, tag, run.get("context_window") if run else None)
    path = out_dir / f"results-{tag}.md"
    path.write_text(markdown(run, questions, documents, tag, plots), encoding="utf-8")
    return {"table": str(path), "plots": plots}
