"""MODEL_CARD.md for an exported compressor, written from the run's own records.

Every number in the card comes from ``<run_dir>/metrics.jsonl`` (evaluations
logged during training) or from an evaluation passed in by the caller; the
card says plainly whether the soft prompts beat the two control lines.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .vocabulary import upgrade_names

DATA_LICENCES = {
    "squad": "SQuAD v1.1 dev articles 1-30 (Wikipedia), CC BY-SA 4.0",
    "quality": "QuALITY train (L-Eval repackaging; Gutenberg/Slate articles), CC BY 4.0",
    "squality": "SQuALITY dev stories (Project Gutenberg licence; summaries CC BY 4.0)",
    "qmsum": "QMSum val meeting transcripts (repo MIT; AMI/ICSI CC BY 4.0)",
}


def eval_history(run_dir: str) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [r for r in records if "eval" in r]


def verdict(metrics: dict[str, float], margin: float = 0.02) -> str:
    """Whether the own slots beat both controls on continuation loss by at least ``margin`` nats."""
    own, shuffled, none = metrics["cont_own"], metrics["cont_shuffled"], metrics["cont_none"]
    beats = own < shuffled - margin and own < none - margin
    if beats:
        return (f"The soft prompts carry information: continuation loss with a chunk's own slots ({own:.3f}) is below "
                f"both the shuffled-slot control ({shuffled:.3f}) and the no-context line ({none:.3f}).")
    return (f"**These soft prompts do not yet carry (enough) information about their chunk**: continuation loss with "
            f"the chunk's own slots is {own:.3f} against {shuffled:.3f} with another chunk's slots and {none:.3f} "
            f"with no context (margin required: {margin}). Treat this compressor as a placeholder until retrained.")


def qa_table(metrics: dict[str, float]) -> list[str]:
    """Markdown lines for the QA part of an evaluation (none when it has no QA)."""
    if "qa_soft_f1" not in metrics:
        return []
    rows = [("soft prompt, reader adapter", "soft"), ("full text, base model", "full"),
            ("closed book, base model", "closed"), ("full text, reader adapter", "full_reader"),
            ("closed book, reader adapter", "closed_reader")]
    lines = ["", f"Answers to {int(metrics['qa_n'])} SQuAD test questions (greedy, same prompt template, read through the query path):", "",
             "| condition | EM | F1 |", "| --- | --- | --- |"]
    lines += [f"| {label} | {metrics[f'qa_{k}_em']:.3f} | {metrics[f'qa_{k}_f1']:.3f} |"
              for label, k in rows if f"qa_{k}_f1" in metrics]
    lines += ["", f"Normalised F1 (soft - closed) / (full - closed), base-model lines: **{metrics['qa_normalised_f1']:.2f}**."]
    if "qa_normalised_f1_reader" in metrics:
        lines.append(f"The same with the reader adapter's own lines (what the soft prompt itself adds): "
                     f"**{metrics['qa_normalised_f1_reader']:.2f}**.")
    return lines


def describe_method(config: dict[str, Any]) -> str:
    """One paragraph: how this compressor makes soft prompts and what reads them."""
    ratio = config["segment_length"] / config["n_slots"]
    shape = f"{config['segment_length']} tokens -> {config['n_slots']} slots, {ratio:g}x"
    if config.get("method") == "autocompressor":
        return (f"AutoCompressor (recursive summary vectors, {shape}): each segment is read after the summaries of "
                f"the segments before it, followed by {config['n_slots']} summary tokens whose final hidden states "
                f"are its summary vectors. A LoRA (r={config['lora_r']}) trained on the recursive objective is merged "
                f"into the decoder copy in `decoder/`: the same weights write and read the summaries, as in the "
                f"public AutoCompressor checkpoints. The final evaluation's `raw` and `none` lines are that merged "
                f"decoder's; the lines logged during training are the original base model's.")
    layer = config.get("pool_layer") or "last"
    if config.get("pooling") == "memory":
        how = (f"the encoder's hidden states after layer {layer} at {config['n_slots']} learned memory tokens "
               f"appended to each segment ({shape})")
    else:
        how = f"mean of the encoder's hidden states after layer {layer} over windows of {int(ratio)} tokens ({shape})"
    reader = (f"a LoRA adapter (r={config['reader_r']}) on the decoder, in `reader/`, used with these soft prompts."
              if config.get("reader") else "the frozen decoder (no reader adapter).")
    return (f"Soft prompts: {how}, through a learned projection into the decoder's input-embedding space. Encoder: "
            f"the base model with its own LoRA (r={config['lora_r']}) on the first "
            f"{config.get('pool_layer') or 'all'} layers. Reader: {reader}")


def describe_machine(device: Optional[Union[str, torch.device]] = None) -> str:
    """What a run trains on, for the model card: the GPU, or the CPU with its cores and torch threads."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return f"a {torch.cuda.get_device_name(device)} GPU"
    name = platform.processor() or platform.machine() or "an unnamed CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def write_model_card(out_dir: str, run_dir: str, *, base_model: str, config: dict[str, Any],
                     final_eval: Optional[dict[str, float]], command: str, step: int,
                     wall_hours: Optional[float] = None, extra_notes: str = "",
                     machine: Optional[str] = None) -> Path:
    """``machine``: what the run trained on (:func:`describe_machine`, recorded in its checkpoints)."""
    config = upgrade_names(config)  # a run saved under the older names
    history = [r for r in eval_history(run_dir) if r["step"] <= step]
    lines = [
        f"# {Path(out_dir).name}",
        "",
        f"Compressor for **{base_model}** (lloco-index). " + describe_method(config),
        "",
        "## Training",
        (f"- method `autocompressor`, {config.get('ac_segments')} segments per `ac` example (curriculum "
         f"{config.get('chunks_curriculum') or 'none'}), " if config.get("method") == "autocompressor"
         else f"- pooling `{config['pooling']}`, ")
        + (f"all weights initialised from `{config['init_from']}`" if config.get("init_from")
           else f"projection init `{config['init_projection']}`")
        + ", objectives (sampling shares) "
        f"`{config['objectives']}`, continuation {config['continuation_length']} tokens",
        f"- AdamW, lr {config['learning_rate']} (encoder LoRA), {config.get('reader_lr') or config['learning_rate']} "
        f"(reader), {config['head_lr']} (projection), {config['lr_schedule']} schedule over {config['steps']} steps, "
        f"warmup {config['warmup_steps']}, batch {config['batch_size']} x accumulation {config['grad_accum_steps']}, "
        "bf16 autocast",
        f"- segment-length curriculum {config.get('segment_curriculum') or 'none'}",
        f"- steps trained: **{step}**" + (f", wall time {wall_hours:.2f} h on {machine or 'a machine the run did not record'}"
                                        if wall_hours else ""),
        "- data (train splits only): " + "; ".join(DATA_LICENCES[s] for s in config["sources"] if s in DATA_LICENCES),
        "",
        "## Measured (held-out text: SQuAD test articles 31-38 + QuALITY test)",
        f"During training: {config.get('eval_windows')} windows of {config.get('eval_segment_length') or config['segment_length']} "
        f"tokens + {config.get('eval_continuation_length', 64)} continuation tokens, at the ratio in force at that step "
        f"(ratio curriculum: {config.get('slots_curriculum') or 'none'}, n_slots per {config['segment_length']} tokens). "
        "Per-token continuation loss on the same tokens in every condition; `own` = this chunk's soft prompt with "
        "the reader, `shuffled` = another chunk's soft prompt (control), `raw` = base model reading the full text, "
        "`none` = base model with no context (floor line); `ae_acc` = teacher-forced reconstruction accuracy.",
        "",
        "| step | own | shuffled | none | raw | slot gain | ae_acc | ae_acc shuffled |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in history:
        m = r["eval"]
        lines.append(f"| {r['step']} | {m['cont_own']:.3f} | {m['cont_shuffled']:.3f} | {m['cont_none']:.3f} | "
                     f"{m['cont_raw']:.3f} | {m['slot_gain']:+.3f} | {m.get('ae_acc', float('nan')):.3f} | "
                     f"{m.get('ae_acc_shuffled', float('nan')):.3f} |")
    if final_eval:
        lines += ["", "Final evaluation of the exported weights:", "", "```json",
                  json.dumps(final_eval, indent=2, sort_keys=True), "```"]
        lines += qa_table(final_eval)
        lines += ["", "## Verdict", verdict(final_eval)]
    lines += ["", "## Reproduce", "```", command, "```", ""]
    if extra_notes:
        lines += [extra_notes, ""]
    path = Path(out_dir) / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path
