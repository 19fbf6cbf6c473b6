"""int8 storage of soft prompts: one absmax scale per row (per soft-prompt vector).

A soft prompt ``x[positions, hidden]`` is stored as ``q = round(x / s)`` in
int8 with ``s = max(|x_row|) / 127`` in float32, one scale per row, and read
back as ``q * s`` in the dtype the compressor produces. A row costs
``hidden + 4`` bytes instead of ``2 * hidden`` (bf16) or ``4 * hidden``
(float32); the error per element is at most ``s / 2``. Per-row scales keep
rows of very different norms (SmolLM2's soft prompts vary a lot across slots)
equally precise.

>>> q, s = quantize_rows(x)               # int8 [n, h], float32 [n]
>>> y = dequantize_rows(q, s, torch.bfloat16)
"""

from __future__ import annotations

import torch

INT8_ROWWISE = "int8-absmax-row"
SCALE_SUFFIX = ".__scale__"  # shard key of a soft prompt's scales: "<id>.__scale__" (ids are hex, never contain dots)
SCHEMES = (None, INT8_ROWWISE)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 values, float32 per-row scales)`` of a 2-D tensor."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows expects [positions, hidden], got shape {tuple(x.shape)}")
    xf = x.detach().float()
    scale = xf.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(xf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def check_scheme(scheme) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"Unknown soft-prompt quantization {scheme!r}; choose one of {list(SCHEMES)}.")
