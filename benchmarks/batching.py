"""Throughput of batched generation vs batch size on the HF backend (SmolLM2 by default).

The same N SQuAD questions (paragraph compressed to a soft prompt + question) are answered with
``SoftPromptReader.generate`` one at a time (batch size 1) and with ``generate_batch`` at larger
batch sizes, in the same process, one configuration after the other, ``--repeats`` rounds each
(the median counts: this project's CPUs are shared with training jobs). Reported per batch size:
answers/s, generated tokens/s, the speed-up over batch size 1 in the same run, and how many
answers equal the batch-size-1 answers (greedy under bf16 autocast: a batch changes matmul shapes,
which can flip a near-tie).

Usage (never run in tests)::

    nice -n 10 .venv/bin/python benchmarks/batching.py                          # 16 questions, sizes 1 2 4 8 16
    .venv/bin/python benchmarks/batching.py --questions 32 --batch-sizes 1 4 16 32 --max-new-tokens 32
    .venv/bin/python benchmarks/batching.py --decoder /models/llama-2-7b-chat-hf --device cuda

Writes ``docs/benchmarks/batching.json`` and ``batching.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from lloco_index import defaults
from lloco_index.backbone import Backbone
from lloco_index.eval.runner import machine_info
from lloco_index.generation import SoftPromptReader, make_placeholder
from lloco_index.store import SoftPromptStore


def squad_requests(path: Path, n: int) -> list[tuple[str, str]]:
    """(paragraph, question) pairs, one question per paragraph, in file order."""
    data = json.loads(path.read_text())["data"]
    out = []
    for article in data:
        for para in article["paragraphs"]:
            if para["qas"]:
                out.append((para["context"], para["qas"][0]["question"]))
            if len(out) == n:
                return out
    return out


def load_compressor_for_bench(backbone: Backbone, compressor_dir: str | None):
    from lloco_index.compressors import default_compressor, load_compressor

    if compressor_dir:
        return load_compressor(compressor_dir, backbone=backbone)
    compressor, notice = default_compressor(backbone)
    if notice:
        print(notice, file=sys.stderr)
    return compressor


def divergence(reader: SoftPromptReader, messages, reference: str, other: str) -> dict:
    """Where a batched answer leaves the one-by-one answer, and the one-by-one model's margin between its
    top two next tokens there (logit units): a margin near 0 is a near-tie that the rounding of another batch
    shape can flip, not a padding or masking error (those change answers at large margins)."""
    tok = reader.backbone.tokenizer
    ref_ids, other_ids = tok(reference, add_special_tokens=False)["input_ids"], tok(other, add_special_tokens=False)["input_ids"]
    step = next((i for i, (a, b) in enumerate(zip(ref_ids, other_ids)) if a != b), min(len(ref_ids), len(other_ids)))
    prepared = reader.prepare(messages)
    table = reader.backbone.embedding_table()
    with torch.inference_mode(), reader.backbone.using(reader.resolve_adapter()) as model:
        prefix = table(torch.tensor(ref_ids[:step], dtype=torch.long, device=table.weight.device)).unsqueeze(0)
        embeds = torch.cat([prepared.inputs_embeds, prefix.to(prepared.inputs_embeds.dtype)], 1)
        top = model(inputs_embeds=embeds).logits[0, -1].float().topk(2).values
    return {"token": step, "top2_margin": round(float(top[0] - top[1]), 4)}


def machine() -> dict:
    return machine_info()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(defaults.data_dir() / "squad" / "test.json"))
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decoder", default=None, help="local HF model dir (default: embedded SmolLM2)")
    parser.add_argument("--compressor", default=None, help="compressor dir (default: shipped, else identity)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default="docs/benchmarks")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    backbone = Backbone.load(args.decoder, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32)
    backbone.base_model.to(args.device)
    compressor = load_compressor_for_bench(backbone, args.compressor)
    store = SoftPromptStore(compressor.fingerprint, compressor_info={"mode": compressor.config.mode})
    pairs = squad_requests(Path(args.data), args.questions)
    ids = [store.make_id(p) for p, _ in pairs]
    store.put(dict(zip(ids, compressor.compress([p for p, _ in pairs]))))
    reader = SoftPromptReader(backbone, store, compressor=compressor, max_new_tokens=args.max_new_tokens)
    requests = [[{"role": "user", "content": f"Context: {make_placeholder(i)}\n\nQuestion: {q}\nAnswer in a few words."}]
                for i, (_, q) in zip(ids, pairs)]
    positions = [reader.prepare(m).positions for m in requests]
    reader.generate(requests[0], max_new_tokens=2)  # warm-up (first-call allocations)

    rows, reference = [], None
    for bs in args.batch_sizes:
        times, answers = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            if bs == 1:
                results = [reader.generate(m) for m in requests]
            else:
                results = reader.generate_batch(requests, batch_size=bs)
            times.append(time.perf_counter() - start)
            answers = results
        if reference is None:
            reference = [r.text for r in answers]
        seconds = statistics.median(times)
        tokens = sum(r.new_tokens for r in answers)
        differing = [divergence(reader, m, b, a.text) for m, a, b in zip(requests, answers, reference) if a.text != b]
        rows.append({"batch_size": bs, "seconds": round(seconds, 3), "all_seconds": [round(t, 3) for t in times],
                     "answers_per_s": round(len(requests) / seconds, 3), "new_tokens": tokens,
                     "tokens_per_s": round(tokens / seconds, 2),
                     "same_as_bs1": sum(a.text == b for a, b in zip(answers, reference)), "differences": differing})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["answers_per_s"] if rows and rows[0]["batch_size"] == 1 else None
    for row in rows:
        row["speedup_vs_bs1"] = round(row["answers_per_s"] / base, 2) if base else None

    report = {"model": backbone.identity, "compressor": compressor.config.mode, "device": args.device,
              "questions": len(requests), "prompt_positions": {"min": min(positions), "max": max(positions),
                                                               "mean": round(statistics.mean(positions), 1)},
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "machine": machine(), "rows": rows,
              "example_answers": [{"question": q, "answer": a} for (_, q), a in list(zip(pairs, reference))[:4]]}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batching.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Batched generation: {report['model']} ({report['compressor']} soft prompts), {args.device}", "",
             f"{len(requests)} SQuAD test questions, prompts of {report['prompt_positions']['min']}-"
             f"{report['prompt_positions']['max']} positions, up to {args.max_new_tokens} new tokens, greedy; "
             f"median of {args.repeats} rounds; generation in {report['machine']['generation_dtype']}. Machine: "
             f"{report['machine']}.", "",
             "| batch size | seconds | answers/s | tokens/s | speed-up vs 1 | answers equal to bs 1 | top-2 margins where they differ |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['batch_size']} | {r['seconds']} | {r['answers_per_s']} | {r['tokens_per_s']} | "
                     f"{r['speedup_vs_bs1']} | {r['same_as_bs1']}/{len(requests)} | "
                     f"{', '.join(str(d['top2_margin']) for d in r['differences']) or '-'} |")
    lines += ["", f"Command: `benchmarks/batching.py {' '.join(argv if argv is not None else os.sys.argv[1:])}`", ""]
    (out / "batching.md").write_text("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
