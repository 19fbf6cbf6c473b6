"""``lloco-index finetune PERSIST_DIR DATA``: a LoRA adapter for an index, from a command line.

DATA is a jsonl of question/answer(/contexts) records, a LabelledRagDataset JSON, or ``generate`` (the
index's own decoder writes questions from its chunks -- weak with a 135M model; prefer a stronger LLM
through the Python API). Interrupt it at any time and run the same command again to resume.

    lloco-index finetune ./storage questions.jsonl --output-dir ./adapters/legal --adapter-name legal
    lloco-index query ./storage "..." --adapter ./adapters/legal --adapter-name legal
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import defaults
from ..selection import POLICIES
from .config import FinetuneConfig


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the ``finetune`` subcommand (defaults from :class:`FinetuneConfig`)."""
    d = FinetuneConfig()
    parser.add_argument("persist_dir", type=Path, help="index persisted by `lloco-index compress` / build_index")
    parser.add_argument("data", help="jsonl of question/answer(/contexts), LabelledRagDataset JSON, or 'generate'")
    parser.add_argument("--output-dir", type=Path, default=None, help="adapter directory (default: PERSIST_DIR/adapters/NAME)")
    parser.add_argument("--adapter-name", default="lloco_domain", help="name recorded in the adapter and used to load it")
    parser.add_argument("--top-k", type=int, default=defaults.DEFAULT_TOP_K, help="retrieval top-k, as used when querying")
    parser.add_argument("--expansion-mix", default=None,
                        help="expand_top_k values cycled over the examples, e.g. 0,1,2,4, so the adapter reads every mix "
                             "of text and soft prompts (default: the retriever's own setting, as when querying)")
    parser.add_argument("--policy", default=defaults.DEFAULT_EXPANSION_POLICY, choices=POLICIES,
                        help="expansion policy that picks the text chunks of those mixes (use the one you query with)")
    parser.add_argument("--position-budget", type=int, default=None, help="most soft-prompt positions per example (default: the retriever's, as when querying)")
    parser.add_argument("--no-gold-contexts", action="store_true", help="retrieve even where the data has contexts")
    parser.add_argument("--instruction-data", type=Path, default=None, help="general instruction data (jsonl) to mix in")
    parser.add_argument("--instruction-ratio", type=float, default=d.instruction_ratio, help="instruction examples mixed in, as a fraction of the QA examples")
    parser.add_argument("--questions-per-chunk", type=int, default=2, help="with DATA=generate")
    parser.add_argument("--max-question-nodes", type=int, default=200, help="with DATA=generate")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training examples")
    parser.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate (AdamW, warmup then cosine decay)")
    parser.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=int, default=d.lora_alpha, help="LoRA scaling alpha")
    parser.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, help="examples per forward pass")
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum_steps, help="micro-batches per optimizer step")
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of documents held out for validation (split by document)")
    parser.add_argument("--patience", type=int, default=d.patience, help="validations without improvement before stopping (0: never stop early)")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="optimizer steps between validations (0: twice per epoch)")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                        help="optimizer steps between resumable checkpoints (also after every validation)")
    parser.add_argument("--max-target-tokens", type=int, default=d.max_target_tokens, help="answer tokens trained on per example (longer answers are cut)")
    parser.add_argument("--no-reader-init", action="store_true", help="start from a fresh LoRA, not the shipped reader")
    parser.add_argument("--no-bf16", action="store_true", help="same as --dtype float32")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the split, shuffling and LoRA init")
    parser.add_argument("--stop-after-steps", type=int, default=None, help="stop (resumably) after N steps this run")
    parser.add_argument("--overwrite", action="store_true", help="discard a previous run's checkpoints")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, learning_rate=args.lr, epochs=args.epochs,
        micro_batch_size=args.micro_batch_size, grad_accum_steps=args.grad_accum, val_fraction=args.val_fraction,
        patience=args.patience, eval_every=args.eval_every, max_target_tokens=args.max_target_tokens,
        init_from_reader=not args.no_reader_init, seed=args.seed,
        dtype="float32" if args.no_bf16 else (getattr(args, "dtype", None) or "auto"),
        instruction_ratio=args.instruction_ratio, checkpoint_every=args.checkpoint_every)


def finetune_interrupted(output_dir: Path, config: FinetuneConfig) -> KeyboardInterrupt:
    """The line a Ctrl-C during ``finetune`` ends with: the checkpoint that is saved, and how to resume from it."""
    from ..errors import Interrupted
    from ..training.checkpoint import CheckpointDir
    from .trainer import TRAINING_SUBDIR

    training = Path(output_dir) / TRAINING_SUBDIR
    latest = CheckpointDir(training / "checkpoints").latest_name()
    python = f"from Python: LLoCOFinetuneEngine.resume('{output_dir}').finetune()"
    if latest is not None:
        step = int(latest.split("-")[-1])
        return Interrupted(f"interrupted: the checkpoint of step {step} is saved in {training / 'checkpoints'}; run "
                           f"the same command again to resume from it ({python}).")
    if (training / "examples.jsonl").is_file():
        return Interrupted(f"interrupted before the first checkpoint (every {config.checkpoint_every} steps): the "
                           f"training examples are saved in {training}; run the same command again to train without "
                           f"building them again ({python}).")
    return Interrupted("interrupted while building the training examples: nothing is saved yet; run the same "
                       "command again to start over.")


def run_finetune(args: argparse.Namespace) -> None:
    """Build the examples, train (or resume), print the result as JSON."""
    import torch

    from ..llamaindex import LLoCOLLM, load_index
    from ..llamaindex.finetune import LLoCOFinetuneEngine

    from ..errors import InputError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # every option is checked before a model is loaded
        config = config_from_args(args)
        mix = [int(v) for v in args.expansion_mix.split(",")] if args.expansion_mix else None
    except ValueError as exc:
        raise InputError(f"lloco-index finetune: {exc}. Fix that option and run again.") from exc
    if args.position_budget is not None and args.position_budget < 1:
        raise InputError(f"--position-budget must be at least 1 (got {args.position_budget}): a budget of 0 positions "
                         f"leaves room for no chunk. Omit it for the retriever's default.")
    generate = args.data == "generate"
    if not generate and not Path(args.data).is_file():
        raise InputError(f"No data file at '{args.data}': pass a jsonl of question/answer records, or 'generate'.")
    index, store, compressor = load_index(args.persist_dir)
    llm = LLoCOLLM(compressor, store)
    output_dir = args.output_dir or args.persist_dir / "adapters" / args.adapter_name
    engine = LLoCOFinetuneEngine(
        index, None if generate else args.data, llm=llm, adapter_name=args.adapter_name, output_dir=output_dir,
        config=config, similarity_top_k=args.top_k, position_budget=args.position_budget,
        use_gold_contexts=not args.no_gold_contexts, instruction_data=args.instruction_data,
        question_llm=llm if generate else None, num_questions_per_chunk=args.questions_per_chunk,
        max_question_nodes=args.max_question_nodes, expansion_mix=mix, policy=args.policy,
        show_progress=not args.no_progress,
        persist_dir=args.persist_dir)
    try:
        result = engine.finetune(stop_after_steps=args.stop_after_steps, overwrite=args.overwrite)
    except KeyboardInterrupt:
        raise finetune_interrupted(output_dir, config) from None
    print(json.dumps(result.metrics(), indent=2))
    if result.finished:
        print(f"adapter saved to {output_dir}; query with: lloco-index query {args.persist_dir} \"...\" "
              f"--adapter {output_dir} --adapter-name {args.adapter_name}")
    else:
        print(f"stopped at step {result.step}/{result.total_steps}; run the same command again to resume "
              f"(or, from Python, LLoCOFinetuneEngine.resume('{output_dir}').finetune())")
