"""What the reader and the batched generator exchange: prepared prompts and generation results.

Kept apart from :mod:`lloco_index.generation` so that :mod:`lloco_index.serving.batching`
can build results without importing the reader that calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PreparedPrompt:
    """What the decoder will read, and how the positions split between text and soft prompts."""

    inputs_embeds: torch.Tensor  # [1, positions, hidden]
    text_positions: int
    soft_positions: int
    soft_prompt_ids: list[str] = field(default_factory=list)

    @property
    def positions(self) -> int:
        return self.text_positions + self.soft_positions


@dataclass
class GenerationResult:
    text: str
    prompt: PreparedPrompt
    new_tokens: int
    prefill_s: float = 0.0
    total_s: float = 0.0


Message = dict  # {"role": "user" | "system" | "assistant", "content": str}
