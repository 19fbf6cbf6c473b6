"""Command-line front end of compressor pretraining (``lloco-index pretrain``).

``lloco-index`` (:mod:`lloco_index.cli`) calls :func:`add_pretrain_arguments` on its sub-parser and
:func:`run_pretrain` with the parsed args; ``python -m lloco_index.training.cli``
runs it standalone.

    lloco-index pretrain --run-dir runs/mean-4x --n-slots 64 --pool-layer 8 --steps 400
    lloco-index pretrain --run-dir runs/mean-4x            # resumes from the newest checkpoint
    lloco-index pretrain --eval-only --compressor DIR --data held_out.txt
    lloco-index pretrain --export runs/mean-4x --out DIR
    lloco-index pretrain --convert-checkpoints runs/old    # .pt checkpoints of earlier versions -> folders
    lloco-index pretrain --run-dir runs/ac --method autocompressor --objectives ac=1 --ac-segments 2
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Optional

from .. import defaults


def _curriculum(text: str) -> list[list[int]]:
    """``"0:64,100:128"`` -> ``[[0, 64], [100, 128]]``."""
    return [[int(a), int(b)] for a, b in (item.split(":") for item in text.split(",") if item)]


def _objectives(text: str) -> dict[str, float]:
    """``"lm=0.4,kl=0.4,ae=0.2"`` -> weights."""
    return {k: float(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    from .pretrain import PretrainConfig

    d = PretrainConfig(run_dir="")
    g = parser.add_argument_group("run")
    g.add_argument("--run-dir", help="where checkpoints and metrics.jsonl go (resumes if it has checkpoints)")
    g.add_argument("--data-dir", default=d.data_dir, help="the shared data (train splits for training, test for eval)")
    g.add_argument("--sources", default=",".join(d.sources), help="train sources, comma-separated")
    g.add_argument("--text", default=None, help="train on your own text instead of the shared data: a .txt file, a "
                   ".jsonl file with a 'text' field per line, or a folder of them (every 10th document is held out)")
    g.add_argument("--decoder", default=None, help="local Hugging Face decoder directory of a supported family (default: embedded SmolLM2)")
    g.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N (default: $LLOCO_DEVICE, else a GPU when there is one, else the CPU)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (e.g. 2 on a shared CPU)")
    g.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    g.add_argument("--config", help="JSON file with PretrainConfig fields (flags given explicitly override it)")
    g = parser.add_argument_group("compressor")
    g.add_argument("--method", choices=["icae", "autocompressor"], default=d.method,
                   help="icae: encoder LoRA + pooling or memory tokens; autocompressor: recursive summaries (objective 'ac')")
    g.add_argument("--ac-segments", type=int, default=d.ac_segments,
                   help="autocompressor: consecutive segments per 'ac' example")
    g.add_argument("--pooling", choices=["mean", "memory"], default=d.pooling, help="mean: window mean-pooling; memory: ICAE memory tokens")
    g.add_argument("--segment-length", type=int, default=d.segment_length, help="tokens per compressed chunk")
    g.add_argument("--n-slots", type=int, default=d.n_slots, help="slots per full segment (ratio = segment/slots)")
    g.add_argument("--pool-layer", type=int, default=None, help="encoder layer to pool from (default: last)")
    g.add_argument("--lora-r", type=int, default=d.lora_r, help="rank of the encoder LoRA")
    g.add_argument("--init-projection", choices=["identity", "lstsq"], default=d.init_projection, help="lstsq: first fit hidden states to token embeddings at 1x")
    g.add_argument("--init-from", default=None, help="compressor directory to start from")
    g.add_argument("--frozen-decoder", action="store_true", help="no reader LoRA (ICAE)")
    g.add_argument("--reader-r", type=int, default=d.reader_r, help="rank of the reader LoRA")
    g = parser.add_argument_group("objectives")
    g.add_argument("--objectives", type=_objectives, default=d.objectives, help='e.g. "lm=0.4,kl=0.4,ae=0.2"')
    g.add_argument("--continuation-length", type=int, default=d.continuation_length, help="tokens after the segment that the lm/kl objectives predict")
    g.add_argument("--qa-file", default=None, help="JSONL QA examples for the qa objective")
    g.add_argument("--distill-file", default=None, help="query-shaped examples for the distill objective "
                   "(python -m lloco_index.training.query_data --split train --out FILE)")
    g.add_argument("--teacher", default=d.teacher, help="distill teacher reading the text: init_reader (frozen "
                   "copy of --init-from's reader), base (no adapter) or an adapter directory")
    g.add_argument("--distill-kl", type=float, default=d.distill_kl, help="weight of KL(teacher||student) on answer tokens")
    g.add_argument("--distill-ce", type=float, default=d.distill_ce, help="weight of the gold answer's cross-entropy")
    g.add_argument("--distill-hidden", type=float, default=d.distill_hidden, help="weight of the hidden-state distance")
    g.add_argument("--freeze-encoder-steps", type=int, default=d.freeze_encoder_steps,
                   help="projector warm-up: steps with the encoder frozen and its features cached")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per forward pass")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum_steps, help="forward passes per optimizer step")
    g.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate of the LoRA adapters")
    g.add_argument("--reader-lr", type=float, default=None, help="learning rate of the reader LoRA (default: --lr)")
    g.add_argument("--head-lr", type=float, default=d.head_lr, help="learning rate of the projection and memory tokens")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default=d.lr_schedule, help="learning-rate decay after warmup")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory, slower steps")
    g.add_argument("--segment-curriculum", type=_curriculum, default=[], help='"step:len,...", e.g. "0:64,100:128"')
    g.add_argument("--slots-curriculum", type=_curriculum, default=[], help='"step:n_slots,...", e.g. "0:64,200:32"')
    g.add_argument("--chunks-curriculum", type=_curriculum, default=[],
                   help='autocompressor: "step:segments,...", e.g. "0:1,100:2,300:4"')
    g.add_argument("--seed", type=int, default=d.seed, help="seed of sampling and initialisation")
    g = parser.add_argument_group("checkpoints and evaluation")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between resumable checkpoints (0: none)")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between held-out evaluations with the control lines (0: none)")
    g.add_argument("--eval-windows", type=int, default=d.eval_windows, help="held-out windows per evaluation")
    g.add_argument("--eval-segment-length", type=int, default=None, help="segment length of evaluation windows (default: --segment-length)")
    g.add_argument("--eval-only", action="store_true", help="evaluate --compressor (or --run-dir's newest checkpoint)")
    g.add_argument("--compressor", default=None, help="compressor directory for --eval-only (default: shipped)")
    g.add_argument("--data", default=None, help="held-out text file for --eval-only (.txt, or .jsonl with 'text')")
    g.add_argument("--qa", type=int, default=0, help="--eval-only: number of SQuAD test questions to answer")
    g.add_argument("--eval-query", default=None, metavar="FILE", help="--eval-only/--export: query-shaped test "
                   "examples (query_data --split test) answered through the query path")
    g.add_argument("--eval-query-n", type=int, default=150, help="how many of --eval-query's examples to answer")
    g.add_argument("--export", default=None, metavar="RUN_DIR", help="export RUN_DIR's newest checkpoint to --out")
    g.add_argument("--out", default=None, help="output compressor directory for --export")
    g.add_argument("--export-step", type=int, default=None, help="checkpoint step to export (default: newest)")
    g.add_argument("--notes", default=None, help="markdown file appended to the exported MODEL_CARD.md")
    g.add_argument("--convert-checkpoints", default=None, metavar="RUN_DIR",
                   help="rewrite RUN_DIR's single-file step-*.pt checkpoints (earlier versions) as checkpoint folders")
    g.add_argument("--remove-legacy", action="store_true",
                   help="--convert-checkpoints: delete each .pt file once its folder is written")
    # Remember the defaults so that a --config file is overridden only by flags given explicitly.
    parser.set_defaults(_pretrain_defaults={a.dest: a.default for a in parser._actions})


def config_from_args(args: argparse.Namespace):
    from .pretrain import PretrainConfig
    from .vocabulary import upgrade_names

    base = json.loads(open(args.config).read()) if getattr(args, "config", None) else {}
    mapping = dict(
        run_dir=args.run_dir, data_dir=args.data_dir, sources=args.sources.split(","), text=args.text, decoder=args.decoder,
        device=args.device, threads=args.threads, method=args.method, ac_segments=args.ac_segments,
        chunks_curriculum=args.chunks_curriculum, pooling=args.pooling, segment_length=args.segment_length,
        n_slots=args.n_slots, pool_layer=args.pool_layer, lora_r=args.lora_r, init_projection=args.init_projection,
        init_from=args.init_from, reader=not args.frozen_decoder, reader_r=args.reader_r, objectives=args.objectives,
        continuation_length=args.continuation_length, qa_file=args.qa_file, distill_file=args.distill_file,
        teacher=args.teacher, distill_kl=args.distill_kl, distill_ce=args.distill_ce, distill_hidden=args.distill_hidden,
        freeze_encoder_steps=args.freeze_encoder_steps, steps=args.steps,
        batch_size=args.batch_size, grad_accum_steps=args.grad_accum, learning_rate=args.lr, reader_lr=args.reader_lr,
        head_lr=args.head_lr, warmup_steps=args.warmup_steps, lr_schedule=args.schedule,
        gradient_checkpointing=args.gradient_checkpointing, segment_curriculum=args.segment_curriculum,
        slots_curriculum=args.slots_curriculum, seed=args.seed, checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every, eval_windows=args.eval_windows, eval_segment_length=args.eval_segment_length,
    )
    names = {f.name for f in fields(PretrainConfig)}
    base = {k: v for k, v in upgrade_names(base).items() if k in names}
    defaults_seen = getattr(args, "_pretrain_defaults", {})
    flag_of = {"reader": "frozen_decoder", "sources": "sources", "grad_accum_steps": "grad_accum", "learning_rate": "lr",
               "lr_schedule": "schedule"}
    for key, value in mapping.items():
        flag = flag_of.get(key, key)
        explicit = flag in defaults_seen and getattr(args, flag) != defaults_seen[flag]
        if key not in base or explicit:
            base[key] = value
    base = {k: v for k, v in base.items() if v is not None or k in ("decoder", "pool_layer", "init_from",
                                                                   "qa_file", "distill_file", "reader_lr", "threads",
                                                                   "eval_segment_length")}
    return PretrainConfig(**base)


def run_pretrain(args: argparse.Namespace) -> int:
    """Train, resume, evaluate or export, as the arguments say. Returns a process exit code."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.convert_checkpoints:
        return _convert_checkpoints(args.convert_checkpoints, remove=args.remove_legacy)
    if args.export:
        return _export(args)
    if args.eval_only:
        return _eval_only(args)
    if not args.run_dir:
        raise SystemExit("--run-dir is required for training")
    from .pretrain import pretrain

    config = config_from_args(args)
    try:
        result = pretrain(config, resume=not args.no_resume)
    except KeyboardInterrupt as exc:
        raise pretrain_interrupted(Path(config.run_dir), config.checkpoint_every) from exc
    print(json.dumps({"step": result.step, "eval": result.last_eval}, indent=2))
    return 0


def pretrain_interrupted(run_dir: Path, checkpoint_every: int) -> KeyboardInterrupt:
    """The line a Ctrl-C during ``pretrain`` ends with. Checkpoints are written only every ``checkpoint_every``
    steps (an interrupt can land inside an optimizer step, so the state at that moment is not one to save):
    the line names the step training resumes from, so the user knows what is trained again."""
    from ..errors import Interrupted
    from . import checkpoint as ckpt

    latest = ckpt.CheckpointDir(run_dir / ckpt.CHECKPOINT_DIR).latest_name()
    if latest is not None:
        step = int(latest.split("-")[-1])
        return Interrupted(f"interrupted: the checkpoint of step {step} is saved in {run_dir / ckpt.CHECKPOINT_DIR}; "
                           f"run the same command again to resume from it (the steps after {step} are trained "
                           f"again; --checkpoint-every {checkpoint_every} sets how many can be lost).")
    return Interrupted(f"interrupted before the first checkpoint (every {checkpoint_every} steps): nothing is saved "
                       f"in {run_dir} yet; run the same command again to start over.")


def _convert_checkpoints(run_dir: str, *, remove: bool) -> int:
    """``--convert-checkpoints``: the run's ``.pt`` checkpoints as folders (it resumes from either)."""
    from . import checkpoint as ckpt

    legacy = ckpt.legacy_checkpoints(run_dir)
    if not legacy:
        print(f"No single-file .pt checkpoints in {run_dir}/{ckpt.CHECKPOINT_DIR}: nothing to convert.")
        return 0
    written = ckpt.convert_legacy_checkpoints(run_dir, remove=remove)
    for path in written:
        print(f"wrote {path}")
    if len(written) < len(legacy):
        raise SystemExit(f"{len(legacy) - len(written)} of {len(legacy)} .pt checkpoints in {run_dir}/"
                         f"{ckpt.CHECKPOINT_DIR} did not load and were left as they are.")
    return 0


def _export(args: argparse.Namespace) -> int:
    """Export the newest checkpoint, evaluate it on held-out text (+ QA) and write MODEL_CARD.md."""
    import sys
    from pathlib import Path

    from ..fileio import atomic_write_bytes
    from . import checkpoint as ckpt
    from .evaluate import evaluate_compressor, held_out_windows, squad_test_qa
    from .model_card import write_model_card
    from .pretrain import export_checkpoint

    if not args.out:
        raise SystemExit("--export needs --out DIR")
    found = ckpt.load_run_checkpoint(args.export, args.export_step)
    if found is None:
        raise SystemExit(f"No loadable checkpoint in {args.export}")
    state, step = found.state, found.step
    compressor = export_checkpoint(args.export, args.out, step=step)
    print(f"exported step {step} ({compressor.fingerprint}) to {args.out}")
    backbone = compressor.backbone
    windows = held_out_windows(backbone, args.data_dir, args.eval_windows,
                               args.eval_segment_length or compressor.segment_length, 64)
    qa = squad_test_qa(backbone, args.data_dir, args.qa, compressor.segment_length) if args.qa else None
    metrics = evaluate_compressor(compressor, windows, reader_adapter=compressor.reader_adapter, qa=qa)
    metrics["eval_windows"] = float(len(windows))
    metrics.update(_query_path_eval(args, compressor))
    print(json.dumps(metrics, indent=2))
    # Record the measurement in the shipped config too (``extra`` does not change the fingerprint).
    compressor.config.extra["eval"] = metrics
    atomic_write_bytes(Path(args.out) / defaults.COMPRESSOR_CONFIG_NAME, compressor.config.to_json().encode())
    times = [r["time"] for r in state.get("history", []) if "time" in r]
    card_config = {**state["config"], "reader": compressor.reader_adapter is not None}  # as shipped
    card = write_model_card(args.out, args.export, base_model=backbone.identity, config=card_config,
                            final_eval=metrics, step=step, command="lloco-index pretrain " + " ".join(sys.argv[1:]),
                            wall_hours=(times[-1] - times[0]) / 3600 if len(times) > 1 else None,
                            extra_notes=_read_notes(args.notes), machine=state.get("machine"))
    print(f"wrote {card}")
    return 0


def _query_path_eval(args: argparse.Namespace, compressor) -> dict[str, float]:
    """``--eval-query``: the first ``--eval-query-n`` examples answered through the query path (``query_*`` keys)."""
    if not args.eval_query:
        return {}
    from .evaluate import evaluate_query_path
    from .query_data import load_query_examples

    examples = load_query_examples(args.eval_query)[: args.eval_query_n]
    return {f"query_{k}": v for k, v in evaluate_query_path(compressor, examples, progress=True).items()}


def _read_notes(path: Optional[str]) -> str:
    return open(path).read() if path else ""


def _eval_only(args: argparse.Namespace) -> int:
    from ..compressors.loading import load_compressor
    from .data import load_text_file
    from .evaluate import evaluate_compressor, held_out_windows, squad_test_qa

    compressor = load_compressor(args.compressor, decoder=args.decoder)
    backbone = compressor.backbone
    documents = load_text_file(args.data) if args.data else None
    windows = held_out_windows(backbone, args.data_dir, args.eval_windows, args.eval_segment_length or compressor.segment_length,
                               64, documents=documents)
    qa = squad_test_qa(backbone, args.data_dir, args.qa, compressor.segment_length) if args.qa else None
    metrics = evaluate_compressor(compressor, windows, reader_adapter=compressor.reader_adapter, qa=qa)
    metrics.update(_query_path_eval(args, compressor))
    print(json.dumps({"compressor": compressor.fingerprint, "windows": len(windows), **metrics}, indent=2))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lloco-index pretrain", description="Pretrain, evaluate or export a compressor.")
    add_pretrain_arguments(parser)
    return run_pretrain(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
