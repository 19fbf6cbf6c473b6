"""Latency and memory vs context length: full context against soft prompts of the whole context.

For each length (default 1k -> 32k decoder tokens of the needle haystack, with the needle in the
middle) the same question is answered twice on the same decoder, in the same process, one after
the other:

* ``full_context``: the text itself (only while it fits the model's window; past it the full
  context cannot run at all, and the row says so);
* ``soft_prompts``: every chunk of the context compressed (one-off, timed separately) and spliced
  in as soft prompts, no retrieval: positions grow with length / ratio, not with source tokens.

Usage (takes ~15 min on a 2-core CPU; never run in tests)::

    nice -n 10 .venv/bin/python benchmarks/scaling.py                       # untrained ICAE unless one is shipped
    .venv/bin/python benchmarks/scaling.py --compressor runs/compressor --lengths 1024 4096 16384

Writes ``docs/benchmarks/scaling.jsonl`` (one line per length and system), ``scaling.md`` and ``scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lloco_index import defaults
from lloco_index.backbone import Backbone
from lloco_index.eval import datasets as ds
from lloco_index.eval.runner import default_compressor_specs, machine_info, resolve_compressors
from lloco_index.eval.systems import CHUNK_SEPARATOR, PeakRSS, build_messages, timed_generate
from lloco_index.chunking import chunk_text
from lloco_index.generation import AUTO, SoftPromptReader, make_placeholder
from lloco_index.store import SoftPromptStore


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--compressor", default=None, help="directory, 'default', 'icae-untrained' (default: as the harness picks)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="queries per length and system (median reported)")
    parser.add_argument("--out-dir", default="docs/benchmarks")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in scaling.jsonl (same compressor) and measure only new lengths")
    args = parser.parse_args(argv)

    backbone = Backbone.load()
    spec = args.compressor or default_compressor_specs(None)[0][0]
    [entry] = resolve_compressors([spec], backbone)
    compressor = entry.compressor
    data = Path(args.data_dir) if args.data_dir else defaults.data_dir()
    bench = ds.needle_in_a_haystack(data / "needle" / "paul_graham_essays", backbone.tokenizer, lengths=args.lengths, depths=[0.5])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    previous = out_dir / "scaling.jsonl"
    if args.append and previous.is_file():
        old = [json.loads(line) for line in previous.read_text().splitlines() if line.strip()]
        if old and old[0].get("fingerprint") == entry.fingerprint:
            rows = [r for r in old if r.get("type") != "run"]
    done = {r["length"] for r in rows if r["system"] == "soft_prompts"}
    plain = SoftPromptReader(backbone, None, adapter=None, max_new_tokens=args.max_new_tokens)
    window = backbone.context_window
    print(f"compressor {entry.label} ({entry.fingerprint}): {entry.note}; window {window}")
    meta = {"machine": machine_info(), "compressor": entry.label, "fingerprint": entry.fingerprint, "note": entry.note,
            "window": window, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats}
    for ex in bench.examples:
        doc = bench.documents[ex.document_id]
        length = ex.metadata["length"]
        if length in done:
            continue
        # Full context: only where it fits (the reader refuses a prompt past the window).
        fits = plain.count_positions(plain.render(build_messages(ex, doc.text))) + args.max_new_tokens <= window
        if fits:
            rows.append(_measure("full_context", length, plain, build_messages(ex, doc.text), None, args))
        else:
            rows.append({"system": "full_context", "length": length, "skipped": f"{length} tokens exceed the {window}-position window"})
        # Soft prompts of every chunk (no retrieval).
        chunks = [c.text for c in chunk_text(doc.text, backbone.tokenizer, compressor.segment_length)]
        store = SoftPromptStore.for_compressor(compressor)
        start = time.perf_counter()
        prompts = compressor.compress(chunks)
        compress_s = time.perf_counter() - start
        ids = [store.make_id(c) for c in chunks]
        store.put(dict(zip(ids, prompts)))
        reader = SoftPromptReader(backbone, store, compressor=compressor, adapter=AUTO, max_new_tokens=args.max_new_tokens)
        context = CHUNK_SEPARATOR.join(make_placeholder(i) for i in ids)
        row = _measure("soft_prompts", length, reader, build_messages(ex, context), AUTO, args)
        row["compress_s"] = compress_s
        row["compress_tokens_per_s"] = length / compress_s
        rows.append(row)
        print(json.dumps({k: v for k, v in rows[-2].items() if k != "prediction"}))
        print(json.dumps({k: v for k, v in row.items() if k != "prediction"}))
        # Written after every length, so a long run that is stopped keeps what it measured.
        (out_dir / "scaling.jsonl").write_text("\n".join(json.dumps(r) for r in [{"type": "run", **meta}, *rows]) + "\n")
        _report(rows, meta, out_dir)


def _measure(system: str, length: int, reader: SoftPromptReader, messages, adapter, args) -> dict:
    runs = []
    for _ in range(args.repeats):
        with PeakRSS() as memory:
            out, _ = timed_generate(reader, messages, adapter=adapter, max_new_tokens=args.max_new_tokens, stop_at_line_end=True)
        out["total_s"] = out["assemble_s"] + out["prefill_s"] + out["decode_s"]
        out.update(memory.as_record())
        runs.append(out)
    best = {k: statistics.median(r[k] for r in runs) for k in ("assemble_s", "prefill_s", "decode_s", "total_s", "peak_rss_mb", "rss_growth_mb")}
    return {"system": system, "length": length, "positions": runs[0]["positions"], "prediction": runs[0]["prediction"], **best}


def _report(rows: list[dict], meta: dict, out_dir: Path) -> None:
    by = {(r["system"], r["length"]): r for r in rows}
    lengths = sorted({r["length"] for r in rows})
    lines = ["# Scaling: latency and memory vs context length", "",
             f"Machine: {meta['machine'].get('cpu')}, {meta['machine']['cpu_count']} cores, torch {meta['machine']['torch']}. "
             f"Compressor `{meta['compressor']}` (`{meta['fingerprint']}`): {meta['note']}. Window {meta['window']} positions; "
             f"{meta['max_new_tokens']} new tokens; median of {meta['repeats']} run(s). Same question, needle at 50%, same process.", "",
             "| context tokens | full: positions | full: prefill s | full: total s | full: peak RSS MB | soft: positions | soft: prefill s | soft: total s | soft: peak RSS MB | soft: one-off compress s | positions ratio | latency ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for length in lengths:
        f, s = by.get(("full_context", length), {}), by.get(("soft_prompts", length), {})
        if "skipped" in f:
            full_cells = ["cannot run (past window)"] + ["–"] * 3
            ratios = ["–", "–"]
        else:
            full_cells = [str(f["positions"]), f"{f['prefill_s']:.2f}", f"{f['total_s']:.2f}", f"{f['peak_rss_mb']:.0f}"]
            ratios = [f"{f['positions'] / s['positions']:.1f}x", f"{f['total_s'] / s['total_s']:.2f}x"]
        soft_cells = [str(s["positions"]), f"{s['prefill_s']:.2f}", f"{s['total_s']:.2f}", f"{s['peak_rss_mb']:.0f}", f"{s['compress_s']:.1f}"]
        lines.append(f"| {length} | " + " | ".join(full_cells + soft_cells + ratios) + " |")
    lines += ["", "![scaling](scaling.png)", ""]
    (out_dir / "scaling.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for system in ("full_context", "soft_prompts"):
        pts = [(r["length"], r["total_s"], r["peak_rss_mb"]) for r in rows if r["system"] == system and "skipped" not in r]
        if pts:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=system)
    for ax, label in ((ax1, "query latency, s"), (ax2, "peak RSS during the query, MB")):
        ax.axvline(meta["window"], color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("context length (decoder tokens)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set_title("full context stops at the window (dashed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "scaling.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
