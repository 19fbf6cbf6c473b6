"""The AutoCompressor's own objective: next-token loss conditioned on accumulated summaries.

Chevalier et al. (2023) train an AutoCompressor on documents cut into segments
``s_0 .. s_{K-1}``: step ``k`` reads ``[summaries of s_0..s_{k-1}] [s_k] [summary tokens]``
and is scored on predicting each token of ``s_k``; its summary vectors become the
prefix of step ``k+1``, and the gradient flows back through them into earlier
steps. The same weights write and read the summaries. Here those weights are the
decoder plus one LoRA (:attr:`AutoCompressor.writer_adapter`), trained with the
summary-token embeddings; :func:`lloco_index.training.pretrain.export_checkpoint`
merges the LoRA into a decoder copy, the layout of the public checkpoints.

One difference from the reference implementation: there the segments' hidden
states are joined before the shift, so the first token of segment ``k`` is
predicted from the last token of segment ``k-1``; here each step is scored on
its own and that token is predicted from the last summary vector before it (the
position that precedes it in the sequence the decoder actually reads). Loss
values are therefore not directly comparable with the paper's.

    >>> loss, n = recursive_lm_loss(compressor, [[seg0, seg1], [seg0b, seg1b, seg2b]])
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..compressors.autocompressor import AutoCompressor


def split_segments(tokens: Sequence[int], segment_length: int, n_segments: int) -> list[list[int]]:
    """The first ``n_segments`` segments of ``segment_length`` tokens (fewer when ``tokens`` is shorter)."""
    out = [list(tokens[i : i + segment_length]) for i in range(0, len(tokens), segment_length)]
    return [seg for seg in out[:n_segments] if seg]


def recursive_lm_loss(compressor: AutoCompressor, per_text: Sequence[Sequence[Sequence[int]]],
                      *, score_first_segment: bool = True) -> tuple[torch.Tensor, int]:
    """(mean next-token cross-entropy over every scored segment token, number of scored tokens).

    Call it inside ``backbone.using(compressor.writer_adapter)``. The first token of segment
    ``k > 0`` is predicted from the last summary vector before it; the first token of segment 0
    has nothing before it and is not scored. ``score_first_segment=False`` scores only segments
    that read summaries (the part of the loss that trains the compression).
    """
    lm_head = compressor.backbone.base_model.get_output_embeddings()
    total = None
    count = 0
    for step in compressor.iter_steps(per_text):
        if step.step == 0 and not score_first_segment:
            continue
        for row in range(len(step.active)):
            prefix = step.prefix_lengths[row]
            targets = step.segment_ids[row]
            start = prefix - 1 if prefix > 0 else 0  # position p predicts token p + 1
            first_target = 0 if prefix > 0 else 1
            stop = prefix + len(targets) - 1
            if stop <= start:
                continue
            logits = lm_head(step.hidden[row, start:stop]).float()
            loss = F.cross_entropy(logits, targets[first_target:], reduction="sum")
            total = loss if total is None else total + loss
            count += int(targets.numel() - first_target)
    if total is None:
        return compressor.embed_summary.weight.new_zeros(()), 0
    return total / max(count, 1), count
