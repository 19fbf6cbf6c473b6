"""The ``distill`` objective: the compressed reader answers a query as the reader of the text does.

For a :class:`~.query_data.QueryExample` the student reads the query's prompt with its soft prompts
(some chunks expanded to text), the teacher reads the same prompt with every chunk as text; both are
followed by the gold answer's tokens. The loss, on the answer tokens only:

* ``KL(teacher || student)`` of the next-token distributions (dense targets from every question;
  PISCO/xRAG-style token-level distillation from the same model reading the uncompressed context),
* plus ``ce`` x cross-entropy on the gold answer,
* plus ``hidden`` x the mean squared distance of the last hidden states, scaled by the teacher's.

Inputs are built from :meth:`SoftPromptReader.prompt_pieces` and :meth:`SoftPromptReader.answer_ids`,
the functions a query goes through, so what is trained is what queries read.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..generation import SoftPromptReader, embed_pieces
from ..precision import autocast
from .query_data import QueryExample, chunk_ref

MAX_ANSWER_TOKENS = 32


@dataclass
class DistillWeights:
    kl: float = 1.0
    ce: float = 0.5
    hidden: float = 0.0
    temperature: float = 1.0


def chunk_segments(reader: SoftPromptReader, example: QueryExample, segment_length: int) -> list[list[int]]:
    """Token ids of the example's chunks that are soft prompts (in chunk order), cut to one segment."""
    return [reader.text_ids(example.chunks[j])[:segment_length] for j in example.soft_chunks]


def _row(reader: SoftPromptReader, messages, soft: dict[str, torch.Tensor], answer: list[int]) -> tuple[torch.Tensor, int]:
    """``inputs_embeds`` [T, H] of prompt + answer, and where the answer starts."""
    parts = embed_pieces(reader.backbone.embedding_table(), reader.prompt_pieces(messages) + [answer],
                         lambda ref: soft[str(ref)])
    return torch.cat(parts, 0), sum(p.shape[0] for p in parts[:-1])


def _forward(reader: SoftPromptReader, adapter: Optional[str], rows: Sequence[tuple[torch.Tensor, int]],
             n_answer: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, vocab] float32, last hidden states [N, H]) at the positions that predict answer tokens,
    all rows in one right-padded pass; only those positions go through the output head."""
    width = max(r.shape[0] for r, _ in rows)
    hidden_size, device = rows[0][0].shape[1], rows[0][0].device
    embeds = torch.zeros(len(rows), width, hidden_size, dtype=rows[0][0].dtype, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    select = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for i, ((r, start), n) in enumerate(zip(rows, n_answer)):
        embeds[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
        select[i, start - 1 : start - 1 + n] = True  # position p predicts token p + 1
    with reader.backbone.using(adapter) as model, autocast(device):
        hidden = model.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[select]
        logits = model.lm_head(hidden)
    return logits.float(), hidden.float()


@dataclass
class DistillReport:
    loss_sum: torch.Tensor  # summed over answer tokens (the caller averages over every scored token)
    n_tokens: int
    parts: dict[str, float]  # per-token means: kl, ce, hidden


def distill_loss(reader: SoftPromptReader, examples: Sequence[QueryExample], soft: Sequence[Sequence[torch.Tensor]], *,
                 student_adapter: Optional[str], teacher_adapter: Optional[str], weights: DistillWeights) -> DistillReport:
    """The objective over a micro-batch; ``soft[i]`` are the soft prompts of ``examples[i].soft_chunks``."""
    students, teachers, answers = [], [], []
    for ex, prompts in zip(examples, soft):
        answer = reader.answer_ids(ex.messages, ex.answers[0], MAX_ANSWER_TOKENS)
        mapping = {chunk_ref(j): p for j, p in zip(ex.soft_chunks, prompts)}
        students.append(_row(reader, ex.messages, mapping, answer))
        teachers.append(_row(reader, ex.teacher_messages, {}, answer))
        answers.append(answer)
    n_answer = [len(a) for a in answers]
    target = torch.tensor([t for a in answers for t in a], device=students[0][0].device)
    with torch.no_grad():
        t_logits, t_hidden = _forward(reader, teacher_adapter, teachers, n_answer)
    s_logits, s_hidden = _forward(reader, student_adapter, students, n_answer)
    temp = weights.temperature
    t_logp = F.log_softmax(t_logits / temp, -1)
    kl = (t_logp.exp() * (t_logp - F.log_softmax(s_logits / temp, -1))).sum(-1) * temp * temp
    ce = F.cross_entropy(s_logits, target, reduction="none")
    scale = t_hidden.pow(2).mean(-1, keepdim=True).clamp_min(1e-6)
    hidden = ((s_hidden - t_hidden).pow(2) / scale).mean(-1)
    per_token = weights.kl * kl + weights.ce * ce + (weights.hidden * hidden if weights.hidden else 0.0)
    parts = {"kl": float(kl.detach().mean()), "ce": float(ce.detach().mean())}
    if weights.hidden:
        parts["hidden"] = float(hidden.detach().mean())
    return DistillReport(per_token.sum(), int(target.numel()), parts)


@torch.no_grad()
def held_out_distill_loss(compressor, examples: Sequence[QueryExample], *, teacher_adapter: Optional[str],
                          weights: Optional[DistillWeights] = None, batch_size: int = 4,
                          controls: bool = False) -> dict[str, float]:
    """Per-token ``distill`` losses on held-out examples, teacher-forced (no generation: cheap enough for
    every checkpoint). ``kl`` is what the compressed reader still misses of the teacher reading the text.

    ``controls`` adds the lines the soft prompts must beat, with the same reader adapter: ``closed_*``
    (the query's template with no context) and ``shuffled_*`` (each soft prompt taken from another example,
    halfway round the list). ``heldout_kl_share`` = (closed KL - KL) / closed KL: the part of the distance
    between the closed-book reader and the reader of the text that the soft prompts close.
    """
    from .evaluate import shuffled_slots

    weights = weights or DistillWeights()
    reader = SoftPromptReader(compressor.backbone, compressor=compressor)
    examples = list(examples)
    soft: list[list[torch.Tensor]] = []
    for ex in examples:  # one example per encode call keeps the compressed batch small; the cost is the decoder's
        segments = chunk_segments(reader, ex, compressor.segment_length)
        soft.append(compressor.encode(segments) if segments else [])
    lines = {"heldout": (examples, soft)}
    if controls:
        closed = [replace(ex, messages=ex.closed_messages, expand=[True] * len(ex.chunks)) for ex in examples]
        lines["heldout_closed"] = (closed, [[] for _ in examples])
        pool = [s for s in soft if s]
        if len(examples) > 1 and pool:
            lines["heldout_shuffled"] = (examples, shuffled_slots(soft, pool[0]))
    out: dict[str, float] = {}
    for prefix, (exs, prompts) in lines.items():
        sums: dict[str, float] = {}
        tokens = 0
        for i in range(0, len(exs), batch_size):
            report = distill_loss(reader, exs[i : i + batch_size], prompts[i : i + batch_size],
                                  student_adapter=compressor.reader_adapter, teacher_adapter=teacher_adapter,
                                  weights=weights)
            for k, v in report.parts.items():
                sums[k] = sums.get(k, 0.0) + v * report.n_tokens
            tokens += report.n_tokens
        out |= {f"{prefix}_{k}": v / max(tokens, 1) for k, v in sums.items()} | {f"{prefix}_tokens": float(tokens)}
    if controls and out.get("heldout_closed_kl", 0) > 0:
        out["heldout_kl_share"] = (out["heldout_closed_kl"] - out["heldout_kl"]) / out["heldout_closed_kl"]
    return out
