"""Learned map from encoder hidden states into the decoder's input-embedding space.

SmolLM2's last hidden states have norm ~47 against ~2.7 for its input
embeddings; normalising first and starting from a scaled identity keeps the
soft prompts at the scale the decoder expects from step 0.
"""

from __future__ import annotations

import torch
from torch import nn


class SoftPromptProjection(nn.Module):
    def __init__(self, hidden_in: int, hidden_out: int, target_norm: float = 1.0, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(hidden_in))
        self.linear = nn.Linear(hidden_in, hidden_out, bias=True)
        with torch.no_grad():
            self.linear.weight.zero_()
            n = min(hidden_in, hidden_out)
            # RMS-normalised input has norm sqrt(hidden_in); scale so outputs have target_norm.
            self.linear.weight[:n, :n] = torch.eye(n) * (target_norm / hidden_in**0.5)
            self.linear.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight
        return self.linear(x.to(self.linear.weight.dtype))
