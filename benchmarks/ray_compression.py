"""Ray Data compression throughput with 1 vs N local workers (SmolLM2 + an ICAE compressor).

Each configuration compresses the same chunks (SQuAD test paragraphs cut into 256-token
segments) into a fresh store, one run after the other in one process on one local Ray instance.
Reported per worker count: wall time (actor start and model loads included), chunks/s, and the
speed-up over 1 worker. An untrained ICAE compressor costs the same as a trained one, so it is
saved once to a directory that every worker loads (the deployment path).

Usage (never run in tests; needs the ``distributed`` extra)::

    nice -n 10 .venv/bin/python benchmarks/ray_compression.py                 # 1 and 2 workers, 48 chunks
    .venv/bin/python benchmarks/ray_compression.py --workers 1 2 4 8 --chunks 512 --gpus-per-worker 1

Writes ``docs/benchmarks/ray_compression.json`` and ``ray_compression.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from lloco_index import defaults


def chunks_from_squad(path: Path, tokenizer, n: int, length: int) -> list[str]:
    out: list[str] = []
    for article in json.loads(path.read_text())["data"]:
        ids = tokenizer(" ".join(p["context"] for p in article["paragraphs"]), add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids) - length + 1, length):
            out.append(tokenizer.decode(ids[i : i + length]))
            if len(out) == n:
                return out
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(defaults.data_dir() / "squad" / "test.json"))
    parser.add_argument("--chunks", type=int, default=48)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs given to the local Ray instance")
    parser.add_argument("--gpus-per-worker", type=float, default=0)
    parser.add_argument("--compressor", default=None, help="saved compressor dir (default: a fresh ICAE, saved)")
    parser.add_argument("--out-dir", default="docs/benchmarks")
    args = parser.parse_args(argv)

    import ray

    from lloco_index.backbone import Backbone
    from lloco_index.compressors import ICAECompressor
    from lloco_index.distributed import CompressorSpec, compress_with_ray

    backbone = Backbone.load()
    tmp = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    compressor_dir = args.compressor
    if compressor_dir is None:
        torch.manual_seed(0)
        compressor_dir = tmp / "compressor"
        ICAECompressor(backbone).save_pretrained(compressor_dir)
    texts = chunks_from_squad(Path(args.data), backbone.tokenizer, args.chunks, defaults.DEFAULT_SEGMENT_LENGTH)

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        for k, n in enumerate(args.workers):  # repeat counts to interleave, e.g. --workers 1 2 1 2
            threads = max(1, args.cpus // n)
            spec = CompressorSpec(compressor_dir=compressor_dir, threads=threads)
            start = time.perf_counter()
            result = compress_with_ray(texts, tmp / f"store-{k}-{n}", spec, num_workers=n, batch_size=args.batch_size,
                                       num_cpus_per_worker=args.cpus / n, num_gpus_per_worker=args.gpus_per_worker)
            total = time.perf_counter() - start
            rows.append({"workers": n, "torch_threads_per_worker": threads, "chunks": result.computed,
                         "map_seconds": round(result.seconds, 2), "total_seconds": round(total, 2),
                         "chunks_per_s": round(result.computed / result.seconds, 3)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
    # Speed-up against the mean of the 1-worker (first count's) runs, so interleaved repeats are compared fairly.
    first = [r["chunks_per_s"] for r in rows if r["workers"] == rows[0]["workers"]]
    base = sum(first) / len(first)
    for row in rows:
        row["speedup_vs_first"] = round(row["chunks_per_s"] / base, 2)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    report = {"model": backbone.identity, "compressor_dir": str(compressor_dir), "segment_tokens": defaults.DEFAULT_SEGMENT_LENGTH,
              "ray_cpus": args.cpus, "cpu_count": os.cpu_count(), "loadavg_1m_at_end": load, "rows": rows}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_compression.json").write_text(json.dumps(report, indent=2))
    md = [f"# Ray Data compression: {report['model']} + ICAE, local Ray with {args.cpus} CPUs", "",
          f"{len(texts)} chunks of {defaults.DEFAULT_SEGMENT_LENGTH} tokens (SQuAD test), batch size {args.batch_size}; "
          f"machine: {os.cpu_count()} cores, 1-min load average {load} at the end (shared with other jobs).", "",
          "| workers | torch threads each | map seconds (incl. actor start + model load) | chunks/s | speed-up |",
          "| ---: | ---: | ---: | ---: | ---: |"]
    md += [f"| {r['workers']} | {r['torch_threads_per_worker']} | {r['map_seconds']} | {r['chunks_per_s']} | {r['speedup_vs_first']} |"
           for r in rows]
    md += ["", f"Command: `benchmarks/ray_compression.py {' '.join(argv if argv is not None else os.sys.argv[1:])}`", ""]
    (out / "ray_compression.md").write_text("\n".join(md))
    return report


if __name__ == "__main__":
    main()
