"""Finetune throughput on compressed contexts (soft prompts) against the same finetune on the full text.

The LLoCO comparison (paper: 11.52x): one LoRA finetune of the same decoder, with the same adapter
configuration, the same examples (questions and gold answers over whole articles) and the same number
of optimizer steps, once with each article read as its soft prompts and once with the article's text in
the prompt. Only the context differs; everything else is the trainer this package ships
(:class:`~lloco_index.finetune.trainer.LoRAFinetuner`: loss on the answer tokens, AdamW, LoRA on q/k/v/o).

* Articles: SQuAD **training** articles whose whole text fits the decoder's window with the prompt and
  the answer (``--min-tokens``/``--max-tokens``; 5.5k-7k tokens for SmolLM2's 8k window), compressed once
  with the shipped compressor (timed; an offline cost, reported apart).
* Examples: the articles' questions, round-robin over articles, the first reference answer as target.
* Each side runs in its own child process (``--side``) so that its peak memory is its own: the peak
  resident set size (RSS, sampled from ``/proc/self/statm`` every 50 ms while training; torch's CPU
  allocations bypass tracemalloc), the same above the RSS right after loading the model (the training
  memory), and ``ru_maxrss`` of the whole child.
* Time: the trainer's own wall-clock step time, and the process CPU time of the training loop (checkpoint
  writes left out). With one thread the CPU time hardly moves when other jobs share the cores; both
  ratios are reported.
* One warm-up optimizer step per side (first-call allocations) is run and not counted; the measured
  steps follow, resumed from the warm-up's checkpoint.

Reported per side: examples/s, positions/s (decoder positions forward + backward), mean positions per
example, seconds per step, peak RSS; and the compressed/full ratios of the same run.

Usage (tens of minutes on one CPU core; never run in tests)::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/finetune_throughput.py --threads 1
    .venv/bin/python benchmarks/finetune_throughput.py --steps 8 --examples-per-step 4

Writes ``docs/benchmarks/finetune_throughput.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIDES = ("soft_prompts", "full_text")


def _plan(args) -> dict:
    """Pick the articles and examples, compress the articles, write the plan and soft prompts to ``work``."""
    from safetensors.torch import save_file

    from lloco_index.backbone import Backbone
    from lloco_index.compressors import default_compressor
    from lloco_index.eval.datasets import load_squad
    from lloco_index.chunking import chunk_text
    from lloco_index.eval.systems import CHUNK_SEPARATOR, build_messages
    from lloco_index.generation import make_placeholder
    from lloco_index.store import SoftPromptStore

    backbone = Backbone.load(args.decoder)
    compressor, notice = default_compressor(backbone)
    if notice:
        raise SystemExit(f"error: the shipped compressor is needed for this benchmark: {notice}")
    tok = backbone.tokenizer
    bench = load_squad(Path(args.data_dir) / "squad" / "train.json")
    by_doc = bench.by_document()
    articles = []
    for doc_id, doc in bench.documents.items():
        n = len(tok(doc.text, add_special_tokens=False)["input_ids"])
        if args.min_tokens <= n <= args.max_tokens:
            articles.append((doc_id, n))
    articles = articles[: args.articles]
    if not articles:
        raise SystemExit(f"error: no SQuAD training article has {args.min_tokens}-{args.max_tokens} tokens")
    store = SoftPromptStore.for_compressor(compressor)
    contexts, compress_s, tensors, source_tokens = {}, 0.0, {}, 0
    for doc_id, n in articles:
        chunks = [c.text for c in chunk_text(bench.documents[doc_id].text, tok, compressor.segment_length)]
        start = time.perf_counter()
        with torch.inference_mode():
            prompts = compressor.compress(chunks)
        compress_s += time.perf_counter() - start
        source_tokens += n
        ids = [store.make_id(c) for c in chunks]
        for i, p in zip(ids, prompts):
            tensors[i] = p.detach().float().contiguous()
        contexts[doc_id] = {"soft_prompts": CHUNK_SEPARATOR.join(make_placeholder(i) for i in ids),
                            "full_text": bench.documents[doc_id].text}
    needed = (args.steps + 1) * args.examples_per_step  # + the warm-up step
    queues = {d: list(by_doc[d]) for d, _ in articles}
    examples = []
    while len(examples) < needed and any(queues.values()):
        for d, _ in articles:
            if queues[d] and len(examples) < needed:
                examples.append(queues[d].pop(0))
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(work / "soft_prompts.safetensors"))
    plan = {"articles": [{"id": d, "tokens": n} for d, n in articles], "compress_s": compress_s,
            "compressed_tokens_per_s": source_tokens / compress_s if compress_s else None,
            "compressor": compressor.fingerprint, "n_slots": compressor.n_slots,
            "segment_length": compressor.segment_length, "examples": []}
    for ex in examples:
        plan["examples"].append({
            "id": ex.id, "target": ex.answers[0],
            **{side: build_messages(ex, contexts[ex.document_id][side]) for side in SIDES}})
    (work / "plan.json").write_text(json.dumps(plan))
    return plan


def _side(args) -> dict:
    """One side's finetune, in this (child) process: warm-up step, then ``--steps`` measured steps."""
    from safetensors.torch import load_file

    from lloco_index.backbone import Backbone
    from lloco_index.compressors import default_compressor
    from lloco_index.eval.systems import PeakRSS
    from lloco_index.finetune.config import FinetuneConfig
    from lloco_index.finetune.data import TrainExample
    from lloco_index.finetune.trainer import LoRAFinetuner
    from lloco_index.generation import SoftPromptReader
    from lloco_index.store import SoftPromptStore

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    plan = json.loads((work / "plan.json").read_text())
    backbone = Backbone.load(args.decoder)
    compressor, _ = default_compressor(backbone)
    store = SoftPromptStore.for_compressor(compressor)
    store.put(load_file(str(work / "soft_prompts.safetensors")))
    reader = SoftPromptReader(backbone, store, compressor=compressor)
    train = [TrainExample(messages=e[args.side], target=e["target"], id=e["id"]) for e in plan["examples"]]
    config = FinetuneConfig(epochs=1, micro_batch_size=1, grad_accum_steps=args.examples_per_step,
                            max_target_tokens=args.max_target_tokens, patience=0, seed=0, dtype=args.dtype)
    class CpuTimed(LoRAFinetuner):
        """Also counts the process CPU time of the training loop, checkpoint writes left out: with one thread it
        hardly moves when other jobs share the cores, unlike wall-clock time."""

        loop_cpu = 0.0
        checkpoint_cpu = 0.0

        def _train_loop(self, *a, **k):
            start = time.process_time()
            try:
                return super()._train_loop(*a, **k)
            finally:
                self.loop_cpu += time.process_time() - start

        def _save_checkpoint(self, *a, **k):
            start = time.process_time()
            try:
                return super()._save_checkpoint(*a, **k)
            finally:
                self.checkpoint_cpu += time.process_time() - start

    with tempfile.TemporaryDirectory(dir=work) as out:
        finetuner = CpuTimed(reader, train, (), adapter_name="throughput", output_dir=out, config=config,
                             progress=False)
        if len(finetuner.train_examples) != len(train):
            raise SystemExit(f"error: {len(train) - len(finetuner.train_examples)} {args.side} examples do not fit "
                             f"the {backbone.context_window}-position window; lower --max-tokens")
        positions = [reader.count_positions(reader.render(e.messages)) for e in train]
        # The weights are memory-mapped and paged in on first use: one tiny no-grad forward makes them resident,
        # so the RSS after it is the loaded model, and what a step adds above it is training memory.
        with torch.no_grad():
            backbone.base_model(input_ids=torch.tensor([[backbone.tokenizer.eos_token_id or 0] * 4]))
        loaded = PeakRSS.rss()
        warm = finetuner.train(stop_after_steps=1)
        warm_cpu = finetuner.loop_cpu - finetuner.checkpoint_cpu
        load_start = os.getloadavg()[0]
        with PeakRSS(interval=0.05) as memory:
            result = finetuner.train(stop_after_steps=args.steps)
        load_end = os.getloadavg()[0]
        cpu_seconds = finetuner.loop_cpu - finetuner.checkpoint_cpu - warm_cpu
    seconds = result.train_seconds - warm.train_seconds
    trained_positions = result.positions_per_second * result.train_seconds - warm.positions_per_second * warm.train_seconds
    steps = result.step - warm.step
    examples = steps * config.examples_per_step
    return {
        "side": args.side, "steps": steps, "examples": examples, "seconds": seconds,
        "examples_per_s": examples / seconds, "positions_per_s": trained_positions / seconds,
        "seconds_per_step": seconds / steps, "cpu_seconds": cpu_seconds,
        "examples_per_cpu_s": examples / cpu_seconds, "positions_per_cpu_s": trained_positions / cpu_seconds,
        "mean_prompt_positions": statistics.mean(positions),
        "trained_positions": int(round(trained_positions)), "warmup_seconds": warm.train_seconds,
        "peak_rss_mb_training": memory.peak_bytes / 2**20, "rss_mb_before_training": memory.start_bytes / 2**20,
        "rss_mb_loaded": loaded / 2**20, "peak_rss_mb_above_loaded": (memory.peak_bytes - loaded) / 2**20,
        "ru_maxrss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loadavg_1m": [load_start, load_end], "final_train_loss": result.history[-1].get("train_loss"),
        "torch_threads": torch.get_num_threads(), "dtype": config.dtype,
    }


def _markdown(report: dict) -> str:
    s, f, r = report["sides"]["soft_prompts"], report["sides"]["full_text"], report["ratios"]
    m = report["machine"]
    target = report["target_ratio"]
    verdict = ("met" if report["target_met"] else "**missed**") + (
        f" (target >= {target}x on both clocks; LLoCO reports 11.52x)")
    lines = [
        "# Finetune throughput: soft prompts vs full text", "",
        f"The same LoRA finetune (decoder `{report['decoder']}`, adapter r={report['lora_r']} on q/k/v/o started from the "
        f"shipped reader adapter, {report['steps']} measured optimizer steps x {report['examples_per_step']} examples "
        f"after 1 warm-up step, the same {report['examples_total']} SQuAD training questions), once reading each "
        f"article as its soft prompts and once as its text. Articles: {len(report['articles'])} whole SQuAD training "
        f"articles of {min(a['tokens'] for a in report['articles'])}-{max(a['tokens'] for a in report['articles'])} "
        f"tokens, compressed {report['segment_length']} tokens -> {report['n_slots']} slots.", "",
        "| | soft prompts | full text | ratio (soft / full) |", "|---|---|---|---|",
        f"| examples/s (wall clock) | {s['examples_per_s']:.4f} | {f['examples_per_s']:.4f} | **{r['examples_per_s']:.2f}x** |",
        f"| examples per CPU second | {s['examples_per_cpu_s']:.4f} | {f['examples_per_cpu_s']:.4f} | **{r['examples_per_cpu_s']:.2f}x** |",
        f"| positions/s (forward + backward) | {s['positions_per_s']:.0f} | {f['positions_per_s']:.0f} | {r['positions_per_s']:.2f}x |",
        f"| mean prompt positions per example | {s['mean_prompt_positions']:.0f} | {f['mean_prompt_positions']:.0f} | "
        f"{1 / r['positions_per_example']:.2f}x fewer |",
        f"| seconds per optimizer step | {s['seconds_per_step']:.1f} | {f['seconds_per_step']:.1f} | |",
        f"| peak RSS while training (MB) | {s['peak_rss_mb_training']:.0f} | {f['peak_rss_mb_training']:.0f} | "
        f"{r['peak_rss_training']:.2f}x less |",
        f"| peak RSS above the loaded model (MB): training memory | {s['peak_rss_mb_above_loaded']:.0f} | "
        f"{f['peak_rss_mb_above_loaded']:.0f} | {r['peak_rss_above_loaded']:.1f}x less |",
        f"| RSS with the model loaded, before any step (MB) | {s['rss_mb_loaded']:.0f} | {f['rss_mb_loaded']:.0f} | |",
        f"| load average (1 min) at start / end | {s['loadavg_1m'][0]:.1f} / {s['loadavg_1m'][1]:.1f} | "
        f"{f['loadavg_1m'][0]:.1f} / {f['loadavg_1m'][1]:.1f} | |", "",
        f"Examples/s ratio: {verdict}. The wall-clock ratio moves with the other jobs on the machine (see the load "
        f"column); the CPU-time ratio (process CPU time of the training loop, one thread, checkpoint writes left out) "
        f"hardly does.", "",
        f"Compression of the articles (offline, once, not in the finetune time): {report['compress_s']:.1f} s "
        f"({report['compressed_tokens_per_s']:.0f} tokens/s).", "",
        "Memory: resident set size (RSS) of each side's own process, read from `/proc/self/statm` every 50 ms "
        "during the measured steps (torch's CPU allocations are invisible to tracemalloc, so RSS is what shows the "
        "activations kept for the backward pass); the model, the compressor and the soft prompts are resident on "
        "both sides, and 'above the loaded model' subtracts the RSS measured after loading them, before any step.", "",
        f"Machine: {m.get('cpu')}, {m.get('cpu_count')} cores, torch {m.get('torch')} ({report['sides']['soft_prompts']['torch_threads']} "
        f"thread), compute dtype {m.get('compute_dtype')}, load average at start {m.get('loadavg_1m_at_start', 0):.2f}.", "",
        f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    from lloco_index import defaults

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(defaults.data_dir()))
    p.add_argument("--decoder", default=None, help="local HF model dir (default: embedded SmolLM2)")
    p.add_argument("--articles", type=int, default=5)
    p.add_argument("--min-tokens", type=int, default=5500, help="shortest article (decoder tokens)")
    p.add_argument("--max-tokens", type=int, default=7000, help="longest article: the full text must fit the window")
    p.add_argument("--steps", type=int, default=4, help="measured optimizer steps per side (after 1 warm-up step)")
    p.add_argument("--examples-per-step", type=int, default=1)
    p.add_argument("--max-target-tokens", type=int, default=32)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    p.add_argument("--target-ratio", type=float, default=10.0)
    p.add_argument("--work-dir", default="runs/finetune_throughput")
    p.add_argument("--out-dir", default="docs/benchmarks")
    p.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.side:
        result = _side(args)
        Path(args.work_dir, f"{args.side}.json").write_text(json.dumps(result, indent=1))
        return result

    from lloco_index.eval.runner import machine_info
    from lloco_index.finetune.config import FinetuneConfig

    machine = machine_info()
    plan = _plan(args)
    print(f"{len(plan['articles'])} articles, {len(plan['examples'])} examples; compression {plan['compress_s']:.1f} s",
          flush=True)
    passthrough = sys.argv[1:] if argv is None else list(argv)
    sides = {}
    for side in SIDES:  # one after the other: each child has the machine's share to itself
        subprocess.run([sys.executable, __file__, *passthrough, "--side", side], check=True)
        sides[side] = json.loads(Path(args.work_dir, f"{side}.json").read_text())
        print(json.dumps(sides[side]), flush=True)
    s, f = sides["soft_prompts"], sides["full_text"]
    ratios = {"examples_per_s": s["examples_per_s"] / f["examples_per_s"],
              "examples_per_cpu_s": s["examples_per_cpu_s"] / f["examples_per_cpu_s"],
              "positions_per_s": s["positions_per_s"] / f["positions_per_s"],
              "positions_per_example": s["mean_prompt_positions"] / f["mean_prompt_positions"],
              "peak_rss_training": f["peak_rss_mb_training"] / s["peak_rss_mb_training"],
              "peak_rss_above_loaded": f["peak_rss_mb_above_loaded"] / s["peak_rss_mb_above_loaded"]}
    report = {
        "decoder": "SmolLM2-135M-Instruct" if args.decoder is None else args.decoder,
        "lora_r": FinetuneConfig().lora_r, "steps": args.steps, "examples_per_step": args.examples_per_step,
        "examples_total": len(plan["examples"]), "articles": plan["articles"], "compressor": plan["compressor"],
        "n_slots": plan["n_slots"], "segment_length": plan["segment_length"], "compress_s": plan["compress_s"],
        "compressed_tokens_per_s": plan["compressed_tokens_per_s"], "sides": sides, "ratios": ratios,
        "target_ratio": args.target_ratio,
        "target_met": min(ratios["examples_per_s"], ratios["examples_per_cpu_s"]) >= args.target_ratio,
        "machine": machine,
        "command": "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/finetune_throughput.py " + " ".join(passthrough),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_throughput.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "finetune_throughput.md").write_text(_markdown(report))
    print(json.dumps(ratios, indent=1))
    return report


if __name__ == "__main__":
    main()
