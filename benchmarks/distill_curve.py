"""Teacher-forced held-out ``distill`` losses of the starting compressor and of a run's checkpoints.

The cheap curve for a distillation run (no generation): for each step, the per-token KL to the teacher (the
shipped reader adapter reading the text) and the gold cross-entropy on held-out query-shaped examples, with
the training CPU-hours that step cost. ``--controls`` adds the closed-book and shuffled-slot lines (3x the
time): the soft prompts help only where their KL is below both.

    python benchmarks/distill_curve.py --run runs/distill-8x --out runs/distill-8x-curve --steps 0,20,40
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
from lloco_index.compressors.loading import load_compressor
from lloco_index.training.checkpoint import load_run_checkpoint
from lloco_index.training.pretrain import TEACHER_ADAPTER, export_checkpoint
from lloco_index.training.query_data import load_query_examples
from lloco_index.training.query_loss import held_out_distill_loss


RESUME_GAP_S = 600  # a longer pause between two logged steps is a stop and resume, not training


def train_cpu_hours(run: str, step: int) -> float:
    """CPU-hours of training up to ``step``: the logged steps' durations (pauses for a resume left out)
    times the run's torch threads."""
    state = load_run_checkpoint(run, step).state
    times = [h["time"] for h in state["history"] if h["step"] <= step]
    gaps = [b - a for a, b in zip(times, times[1:]) if 0 < b - a < RESUME_GAP_S]
    seconds = sum(gaps) + (statistics.median(gaps) if gaps else 0.0)  # the first step has no predecessor
    return seconds * int(state["config"].get("threads") or 1) / 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the run directory")
    parser.add_argument("--out", required=True, help="where the exported checkpoints and curve.json go")
    parser.add_argument("--steps", default="0", help="comma-separated; 0 is the shipped compressor")
    parser.add_argument("--test", default="runs/qd/test.jsonl")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--controls", action="store_true", help="add the closed-book and shuffled-slot lines")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test = load_query_examples(args.test)[: args.n]
    backbone = Backbone.load()
    backbone.load_adapter(defaults.default_compressor_dir() / "reader", TEACHER_ADAPTER)
    rows = []
    for step in (int(s) for s in args.steps.split(",")):
        start = time.time()
        compressor = (load_compressor(backbone=backbone) if step == 0 else
                      export_checkpoint(args.run, str(out / f"step-{step}"), backbone=backbone, step=step))
        losses = held_out_distill_loss(compressor, test, teacher_adapter=TEACHER_ADAPTER, controls=args.controls)
        rows.append({"step": step, "train_cpu_hours": train_cpu_hours(args.run, step) if step else 0.0, **losses,
                     "seconds": time.time() - start})
        print(json.dumps(rows[-1]), flush=True)
        compressor.release()
    (out / "curve.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
