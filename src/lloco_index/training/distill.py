"""Sequence-level distillation targets: the uncompressed model's own answers (PISCO-style).

The teacher (the base decoder, no adapters) reads each question with the full
context and answers greedily; those answers, not the gold labels, become the
``qa`` objective's targets, so the compressed reader learns to answer as the
full-text reader does.

    python -m lloco_index.training.distill --out runs/distill/squad_train.jsonl --n 500
    lloco-index pretrain ... --objectives lm=0.3,kl=0.3,ae=0.2,qa=0.2 --qa-file runs/distill/squad_train.jsonl
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .. import defaults
from ..backbone import Backbone
from ..generation import SoftPromptReader
from .data import QAExample, context_text, load_squad_qa, write_qa_jsonl
from .objectives import qa_messages


@torch.no_grad()
def teacher_answers(backbone: Backbone, examples: Sequence[QAExample], *, segment_length: int,
                    max_new_tokens: int = 24, progress: bool = True) -> list[QAExample]:
    """Each example with the teacher's answer as its ``answer``, first of its ``references`` (the gold answers
    follow it). The teacher reads the ``qa`` objective's messages with the context as text (cut to
    ``segment_length`` tokens, what the student's soft prompt holds), rendered by the reader as a query's are."""
    reader = SoftPromptReader(backbone, adapter=None)
    out = []
    for ex in tqdm(examples, desc="teacher answers", disable=not progress):
        context, ids = context_text(ex), backbone.tokenize(context_text(ex))
        if len(ids) > segment_length:
            context = backbone.tokenizer.decode(ids[:segment_length])
        answer = reader.generate(qa_messages(ex.question, context), max_new_tokens=max_new_tokens).text
        if answer:
            out.append(QAExample(question=ex.question, answer=answer, references=[answer] + list(ex.references),
                                 contexts=ex.contexts, id=ex.id, group=ex.group))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Write teacher answers for SQuAD train questions (JSONL).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data-dir", default=str(defaults.data_dir()))
    parser.add_argument("--n", type=int, default=500, help="questions (a seeded random sample)")
    parser.add_argument("--segment-length", type=int, default=defaults.DEFAULT_SEGMENT_LENGTH)
    parser.add_argument("--decoder", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = Backbone.load(args.decoder)
    pool = load_squad_qa(Path(args.data_dir) / "squad/train.json", args.segment_length, backbone.tokenize)
    sample = random.Random(args.seed).sample(pool, min(args.n, len(pool)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_qa_jsonl(args.out, teacher_answers(backbone, sample, segment_length=args.segment_length))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
