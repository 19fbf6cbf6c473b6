"""Compression throughput against a plain forward pass, and store bytes per source token.

For each compressor, the same text (needle haystack, ``--tokens`` decoder tokens) is cut into
segment-length chunks and

* compressed with ``compressor.compress`` (batched, inference mode), timed;
* run through the decoder as a plain forward pass over the same segments, same batch size and
  precision, timed in the same process right before: the baseline the ratio is against;
* written into a persisted :class:`SoftPromptStore`; its bytes on disk / source tokens is the
  storage cost.

Usage (minutes; never run in tests)::

    nice -n 10 .venv/bin/python benchmarks/compression_throughput.py
    .venv/bin/python benchmarks/compression_throughput.py --compressors runs/compressor token_embedding --tokens 16384

Writes ``docs/benchmarks/compression_throughput.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lloco_index import defaults
from lloco_index.backbone import Backbone
from lloco_index.eval import datasets as ds
from lloco_index.chunking import chunk_text
from lloco_index.eval.runner import default_compressor_specs, machine_info, resolve_compressors
from lloco_index.precision import autocast, compute_dtype, set_precision

PRECISIONS = ("float32", "bfloat16")
from lloco_index.store import SoftPromptStore


def plain_forward_s(backbone: Backbone, segments: list[list[int]], batch_size: int) -> float:
    """Time of the decoder's forward over the same segments (right-padded batches, no adapter)."""
    pad = backbone.tokenizer.pad_token_id or 0
    start = time.perf_counter()
    with torch.inference_mode(), backbone.using(None) as model, autocast(backbone.device):
        for i in range(0, len(segments), batch_size):
            batch = segments[i : i + batch_size]
            width = max(len(s) for s in batch)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch], device=backbone.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], device=backbone.device)
            model.model(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compressors", nargs="+", default=None, help="specs as for `lloco-index bench --compressors`")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=defaults.DEFAULT_COMPRESS_BATCH_SIZE)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", default="docs/benchmarks")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds per precision (best is kept)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    backbone = Backbone.load()
    specs = args.compressors or default_compressor_specs(None)[0]
    entries = resolve_compressors(specs, backbone)
    data = Path(args.data_dir) if args.data_dir else defaults.data_dir()
    bench = ds.needle_in_a_haystack(data / "needle" / "paul_graham_essays", backbone.tokenizer, lengths=[args.tokens], depths=[0.0])
    text = next(iter(bench.documents.values())).text
    rows = []
    for entry in entries:
        compressor = entry.compressor
        chunks = [c.text for c in chunk_text(text, backbone.tokenizer, compressor.segment_length)]
        segments = [backbone.tokenize(c) for c in chunks]
        n_tokens = sum(len(s) for s in segments)
        timings: dict[str, dict[str, float]] = {}
        # Both precisions in one process, interleaved and best of --repeats, so the ratios do not
        # depend on what else the machine did at one moment.
        for _ in range(args.repeats):
            for dtype in PRECISIONS:
                set_precision(dtype)
                compressor.compress(chunks[: args.batch_size])  # warm-up: first-call allocations are not throughput
                forward_s = plain_forward_s(backbone, segments, args.batch_size)
                start = time.perf_counter()
                prompts = compressor.compress(chunks, batch_size=args.batch_size)
                compress_s = time.perf_counter() - start
                best = timings.setdefault(dtype, {"forward_s": forward_s, "compress_s": compress_s})
                best["forward_s"], best["compress_s"] = min(best["forward_s"], forward_s), min(best["compress_s"], compress_s)
        set_precision(None)
        with tempfile.TemporaryDirectory() as tmp:
            store = SoftPromptStore.open(tmp, compressor)
            store.add(chunks, compressor)  # recompresses; only the bytes on disk are used from this
            disk = sum(p.stat().st_size for p in (Path(tmp) / defaults.STORE_SUBDIR).rglob("*") if p.is_file())
        positions = sum(p.shape[0] for p in prompts)
        auto = "bfloat16" if compute_dtype(backbone.device) == torch.bfloat16 else "float32"
        for dtype, t in timings.items():
            row = {
                "compressor": entry.label, "fingerprint": entry.fingerprint, "note": entry.note, "precision": dtype,
                "auto_choice": dtype == auto, "source_tokens": n_tokens, "chunks": len(chunks), "soft_positions": positions,
                "ratio": n_tokens / positions, "compress_s": t["compress_s"], "compress_tokens_per_s": n_tokens / t["compress_s"],
                "plain_forward_s": t["forward_s"], "plain_forward_tokens_per_s": n_tokens / t["forward_s"],
                "compress_throughput_vs_forward": t["forward_s"] / t["compress_s"],
                "speedup_vs_float32": timings["float32"]["compress_s"] / t["compress_s"],
                "tensor_bytes_per_source_token": sum(p.numel() * p.element_size() for p in prompts) / n_tokens,
                "store_bytes_on_disk_per_source_token": disk / n_tokens, "storage_dtype": compressor.config.storage_dtype,
            }
            rows.append(row)
            print(json.dumps(row))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info(), "batch_size": args.batch_size, "rows": rows}
    (out_dir / "compression_throughput.json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    lines = ["# Compression throughput", "",
             f"Machine: {m.get('cpu')}, {m['cpu_count']} cores, torch {m['torch']}, {m['torch_threads']} thread(s), "
             f"capability {m['cpu_capability']} (bf16 flags: {', '.join(m['cpu_bf16_flags']) or 'none'}), 1-min load "
             f"{m.get('loadavg_1m_at_start', 0):.1f} at start; batch {args.batch_size}; {args.tokens} tokens of the needle "
             f"haystack; best of {args.repeats} interleaved rounds. The plain forward is the decoder over the same "
             "segments in the same process and precision (the baseline of the throughput ratio); `auto` marks the "
             "precision the policy picks on this machine.", "",
             "| compressor | precision | source tokens | ratio | compress tokens/s | plain forward tokens/s | "
             "compress throughput / forward | speed-up vs float32 | store bytes / source token (disk) | storage dtype |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['compressor']}` | {r['precision']}{' (auto)' if r['auto_choice'] else ''} | {r['source_tokens']} | "
                     f"{r['ratio']:.1f}x | {r['compress_tokens_per_s']:.0f} | {r['plain_forward_tokens_per_s']:.0f} | "
                     f"{r['compress_throughput_vs_forward']:.2f} | {r['speedup_vs_float32']:.2f} | "
                     f"{r['store_bytes_on_disk_per_source_token']:.1f} | {r['storage_dtype']} |")
    lines += ["", f"Command: `benchmarks/compression_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`"]
    (out_dir / "compression_throughput.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
