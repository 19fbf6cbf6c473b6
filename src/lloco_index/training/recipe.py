"""One prepared run: distil the shipped compressor through the query path, evaluate, write the winner.

Given a compressor to start from (default: the shipped one) and query-shaped train/test examples
(:mod:`.query_data`), for each ratio it trains the ``distill`` objective (projector warm-up on cached
features, then encoder, projection and reader together) for the steps that fit the time budget,
evaluates every run and the starting compressor on the same held-out questions through the query
path, and writes to ``--out``:

* ``results.json``: every run compared (config, steps, seconds, metrics, command);
* ``compressor/``: the best run, exported (weights, reader adapter, ``MODEL_CARD.md`` listing every run),
  and ``ships: true`` in results.json when it beats the starting compressor by more than ``--margin``.

It needs only this package, the examples and the model files: no network, no framework. Made for one
GPU (``scripts/gpu_recipe.sh`` carries everything to a machine that has one); the same command runs
on a CPU with a tiny model in the tests.

    python -m lloco_index.training.recipe --train runs/qd/train.jsonl.gz --test runs/qd/test.jsonl \\
        --out runs/recipe --minutes 9 --ratios 8,4
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

from .. import defaults
from ..fileio import atomic_write_bytes


def _init_shapes(init: str) -> dict:
    """The LoRA ranks and pool layer of the compressor a run starts from: its weights must fit the run's."""
    from ..compressors.base import read_compressor_config

    enc = read_compressor_config(Path(init))
    reader = json.loads((Path(init) / "reader" / "adapter_config.json").read_text())
    return dict(lora_r=enc["lora_r"], lora_alpha=enc["lora_alpha"], pool_layer=enc.get("pool_layer"),
                reader_r=reader["r"], reader_alpha=reader["lora_alpha"], segment_length=enc["segment_length"])


def _run_config(args: argparse.Namespace, ratio: int, run_dir: Path, steps: int, train_file: str):
    from .pretrain import PretrainConfig

    shapes = _init_shapes(args.init)
    segment = shapes["segment_length"]
    return PretrainConfig(
        run_dir=str(run_dir), decoder=args.decoder, device=args.device, init_from=args.init, pooling="mean",
        n_slots=segment // ratio, **shapes, objectives={"distill": 1.0},
        distill_file=train_file, teacher=args.teacher, distill_kl=args.distill_kl, distill_ce=args.distill_ce,
        distill_hidden=args.distill_hidden, freeze_encoder_steps=max(1, int(steps * args.warmup_share)), steps=steps,
        batch_size=args.batch_size, learning_rate=args.lr, reader_lr=args.reader_lr, head_lr=args.head_lr,
        warmup_steps=max(1, steps // 20), checkpoint_every=max(1, steps // 4), eval_every=0, seed=args.seed,
        threads=args.threads)


def _seconds_per_step(args: argparse.Namespace, ratio: int, out: Path, train_file: str, backbone, train) -> float:
    """Seconds per step of the real run's full (encoder-training) step, from a short probe run's own step
    times; the first step, with its one-off overheads, is not counted."""
    from .pretrain import pretrain

    probe = _run_config(args, ratio, out / "probe" / f"x{ratio}", args.probe_steps + 1, train_file)
    probe = replace(probe, freeze_encoder_steps=0, checkpoint_every=0)
    result = pretrain(probe, backbone=backbone, distill_examples=train, resume=False, progress=False)
    result.compressor.release()
    times = [r["time"] for r in result.history if "loss" in r]
    return (times[-1] - times[0]) / max(1, len(times) - 1)


def run_recipe(args: argparse.Namespace) -> dict:
    import torch

    from ..backbone import Backbone
    from ..compressors.loading import load_compressor
    from ..models import select_device
    from .evaluate import evaluate_query_path
    from .pretrain import export_checkpoint, pretrain
    from .query_data import load_query_examples

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    test = load_query_examples(args.test)[: args.eval_n]
    started = time.perf_counter()
    command = "python -m lloco_index.training.recipe " + " ".join(sys.argv[1:])
    results: dict = {"command": command, "runs": [], "eval_n": len(test)}

    def evaluate(compressor) -> dict:
        return evaluate_query_path(compressor, test, batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens)

    args.init = args.init or str(defaults.default_compressor_dir())
    # One decoder and one read of the training examples for every probe and run: each run's compressor
    # takes its adapters off the decoder (release) before the next one adds its own.
    backbone = Backbone.load(args.decoder, device=select_device(args.device))
    train = load_query_examples(args.train)
    start_compressor = load_compressor(args.init, backbone=backbone)
    results["start"] = {"compressor": args.init,
                        "fingerprint": start_compressor.fingerprint, "metrics": evaluate(start_compressor)}
    start_compressor.release()
    ratios = [int(r) for r in args.ratios.split(",")]
    for i, ratio in enumerate(ratios):
        # What is left of the training budget, shared equally by the ratios still to run.
        left = args.minutes * 60 - (time.perf_counter() - started) - args.eval_reserve_s * (len(ratios) - i)
        budget = left / (len(ratios) - i)
        per_step = _seconds_per_step(args, ratio, out, args.train, backbone, train)
        steps = max(1, int(budget / per_step)) if args.steps is None else args.steps
        run_dir = out / "runs" / f"x{ratio}"
        config = _run_config(args, ratio, run_dir, steps, args.train)
        t0 = time.perf_counter()
        trained = pretrain(config, backbone=backbone, distill_examples=train, progress=args.progress)
        seconds = time.perf_counter() - t0
        metrics = evaluate(trained.compressor)
        results["runs"].append({"ratio": ratio, "run_dir": str(run_dir), "steps": trained.step, "train_s": seconds,
                                "s_per_step_probe": per_step, "config": asdict(config), "metrics": metrics})
        trained.compressor.release()
        atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())

    key = "qa_normalised_f1_reader"
    best = max(results["runs"], key=lambda r: _finite(r["metrics"][key]))
    results["best"] = {"ratio": best["ratio"], "run_dir": best["run_dir"]}
    gain = best["metrics"]["qa_soft_f1"] - results["start"]["metrics"]["qa_soft_f1"]
    results["ships"] = bool(gain > args.margin)
    results["soft_f1_gain_over_start"] = gain
    compressor = export_checkpoint(best["run_dir"], str(out / "compressor"), backbone=backbone,
                                   notes={"recipe": {"eval": best["metrics"], "start": results["start"]["metrics"]}})
    card = out / "compressor" / "MODEL_CARD.md"
    card.write_text(_model_card(results, compressor))
    results["total_s"] = time.perf_counter() - started
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())
    return results


def _finite(x: float) -> float:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else float("-inf")


def _model_card(results: dict, compressor) -> str:
    from .model_card import describe_machine

    start = results["start"]["metrics"]
    lines = [f"# {compressor.config.mode} compressor distilled through the query path", "",
             f"Base model: **{compressor.backbone.identity}**; fingerprint `{compressor.fingerprint}`; started from "
             f"`{results['start']['compressor']}` (`{results['start']['fingerprint']}`). Trained on "
             f"{describe_machine(compressor.backbone.device)}.", "",
             "Objective `distill`: KL(teacher || student) on the gold answer's tokens, the teacher being the starting "
             "reader adapter reading every chunk as text, plus the gold cross-entropy; query-shaped contexts (the "
             "question's paragraph, or the article's top-4 retrieved chunks with 0-2 expanded to text); projector "
             "warm-up on cached encoder features first.", "",
             f"Held-out evaluation: {results['eval_n']} SQuAD test questions, each with its own paragraph as soft "
             "prompts, answered through the query path (store, reader, LlamaIndex text-QA template); every line uses "
             "the reader adapter of the row's compressor.", "",
             "| compressor | ratio | steps | train s | soft F1 | full-text F1 | closed F1 | shuffled F1 | normalised |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             _row("start", "", "", "", start)]
    for run in results["runs"]:
        lines.append(_row(f"x{run['ratio']}", f"{run['ratio']}x", str(run["steps"]), f"{run['train_s']:.0f}", run["metrics"]))
    verdict = ("ships: it beats the starting compressor's soft-prompt F1 by "
               f"{results['soft_f1_gain_over_start']:+.3f}" if results["ships"] else
               "does not ship: its soft-prompt F1 is within the margin of the starting compressor's "
               f"({results['soft_f1_gain_over_start']:+.3f})")
    lines += ["", f"Best run: x{results['best']['ratio']}; {verdict}.", "", "Command:", "", "```", results["command"], "```", ""]
    return "\n".join(lines)


def _row(name: str, ratio: str, steps: str, secs: str, m: dict) -> str:
    cells = [m.get(f"qa_{k}_f1", float("nan")) for k in ("soft", "full", "closed", "shuffled")]
    return (f"| {name} | {ratio} | {steps} | {secs} | " + " | ".join(f"{c:.3f}" for c in cells)
            + f" | {m.get('qa_normalised_f1_reader', float('nan')):.3f} |")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lloco_index.training.recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="query-shaped training examples (.jsonl or .jsonl.gz)")
    p.add_argument("--test", required=True, help="query-shaped held-out examples (paragraph kind)")
    p.add_argument("--out", required=True, help="output folder (results.json, runs/, compressor/)")
    p.add_argument("--init", default=None, help="compressor to start from (default: the shipped one)")
    p.add_argument("--decoder", default=None, help="decoder directory (default: the embedded SmolLM2)")
    p.add_argument("--device", default=None, help="default: $LLOCO_DEVICE, else a GPU when there is one")
    p.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget for training and evaluation")
    p.add_argument("--eval-reserve-s", type=float, default=45.0, help="seconds kept per ratio for its evaluation")
    p.add_argument("--steps", type=int, default=None, help="fixed steps per ratio instead of the time budget")
    p.add_argument("--probe-steps", type=int, default=3, help="timed steps that size each run")
    p.add_argument("--ratios", default="8,4", help="compression ratios to train, comma-separated")
    p.add_argument("--teacher", default="init_reader")
    p.add_argument("--distill-kl", type=float, default=1.0)
    p.add_argument("--distill-ce", type=float, default=0.5)
    p.add_argument("--distill-hidden", type=float, default=0.0)
    p.add_argument("--warmup-share", type=float, default=0.15, help="share of steps with the encoder frozen")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--reader-lr", type=float, default=1e-4)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--eval-n", type=int, default=200, help="held-out questions (at least 150 for differences of 0.03)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--margin", type=float, default=0.03, help="soft-prompt F1 gain needed to ship")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--progress", action="store_true")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    results = run_recipe(build_parser().parse_args(argv))
    summary = {"best": results["best"], "ships": results["ships"], "start": results["start"]["metrics"],
               "runs": [{"ratio": r["ratio"], "steps": r["steps"], **r["metrics"]} for r in results["runs"]]}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
