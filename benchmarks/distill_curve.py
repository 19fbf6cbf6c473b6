"""Teacher-forced held-out ``distill`` losses of the starting compressor and of a run's checkpoints.

The cheap curve for a distillation run (no generation): for each step, the per-token KL to the teacher (the
shipped reader adapter reading the text) and the gold cross-entropy on held-out query-shaped examples.

    python benchmarks/distill_curve.py --run runs/distill-8x --out runs/distill-8x-curve --steps 0,20,40
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lloco_index import defaults
from lloco_index.backbone import Backbone
from lloco_index.compressors.loading import load_compressor
from lloco_index.training.pretrain import TEACHER_ADAPTER, export_checkpoint
from lloco_index.training.query_data import load_query_examples
from lloco_index.training.query_loss import held_out_distill_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the run directory")
    parser.add_argument("--out", required=True, help="where the exported checkpoints and curve.json go")
    parser.add_argument("--steps", default="0", help="comma-separated; 0 is the shipped compressor")
    parser.add_argument("--test", default="runs/qd/test.jsonl")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
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
        rows.append({"step": step, **held_out_distill_loss(compressor, test, teacher_adapter=TEACHER_ADAPTER),
                     "seconds": time.time() - start})
        print(json.dumps(rows[-1]), flush=True)
        compressor.release()
    (out / "curve.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
