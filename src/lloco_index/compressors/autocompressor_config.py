"""The AutoCompressor's compressor config and the names the public checkpoints give their parts.

Shared by the model (:mod:`.autocompressor`) and the conversion of the public checkpoints
(:mod:`.autocompressor_convert`).
"""

from __future__ import annotations

from dataclasses import dataclass


from .base import CompressorConfig

# Defaults of the LLoCO paper: 50 summary vectors per segment (the checkpoint's
# summary_length) and segments of 1536 tokens (LLoCO's preproc_embs.py calls the
# model with segment_lengths=1536; the checkpoint was trained on 6144 tokens in
# 4 compression steps). config.json records no segment length.
PAPER_SUMMARY_LENGTH = 50
PAPER_SEGMENT_LENGTH = 1536
PAPER_CHECKPOINT = "princeton-nlp/AutoCompressor-Llama-2-7b-6k"

SUMMARY_KEY = "embed_summary.weight"  # the summary-token embeddings in the public checkpoints
DECODER_SUBDIR = "decoder"  # where a compressor directory keeps its LLaMA decoder


@dataclass
class AutoCompressorConfig(CompressorConfig):
    mode: str = "autocompressor"
    n_slots: int = PAPER_SUMMARY_LENGTH  # = summary_length
    segment_length: int = PAPER_SEGMENT_LENGTH
    accumulate: bool = True  # prepend the summaries of *all* previous segments (accumulate_summary)
    # extra["decoder_dir"]: the decoder directory, relative to the compressor directory or absolute
    # (default "decoder"). In `extra` because where the weights lie does not change the vectors.
