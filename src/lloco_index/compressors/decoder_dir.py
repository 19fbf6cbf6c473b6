"""Writing a decoder as a safetensors Hugging Face directory that keeps its identity.

Used when a compressor directory carries its own decoder: an AutoCompressor saved with
``decoder="copy"``, one trained as decoder + LoRA and exported with the LoRA merged in
(:func:`merged_state_dict`), and the conversion of the public checkpoints (shards, shared storage,
the directory moved into place only when complete).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..backbone import Backbone
from ..fileio import atomic_write_bytes
from .base import atomic_save_safetensors


def shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage: give repeats their own copy."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in tensors.items():
        value = value.detach()
        ptr = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
        out[key] = value.clone().contiguous() if ptr in seen and value.numel() else value.contiguous()
        seen.add(ptr)
    return out


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a fully written temporary directory into place (rename is atomic on one filesystem)."""
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, trash)
        os.replace(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain LLaMA weights, without any LoRA that peft injected into the modules."""
    state = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


@torch.no_grad()
def merged_state_dict(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The plain LLaMA weights with LoRA ``adapter`` added in (W + scale * B @ A); ``model`` is not changed.

    Used to export an AutoCompressor trained as decoder + LoRA in the public checkpoints' layout.
    """
    from peft.tuners.lora import LoraLayer

    state = {k: v.detach().clone() for k, v in _base_state_dict(model).items()}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            key = f"{name}.weight"
            # Kept in float32: rounding W + dW back to bf16 would lose most of a small dW.
            state[key] = state[key].float() + module.get_delta_weight(adapter).float()
    return state


def write_decoder_dir(backbone: Backbone, target: Union[str, Path], *, max_shard_bytes: int = 4 << 30,
                      state: Optional[dict[str, torch.Tensor]] = None, identity: Optional[str] = None) -> Path:
    """Save a backbone's LLaMA as a safetensors Hugging Face directory that keeps its identity.

    ``state`` replaces the weights written (e.g. :func:`merged_state_dict`); such a decoder is another
    model and must get its own ``identity``.
    """
    if state is not None and identity is None:
        raise ValueError("write_decoder_dir(state=...) writes other weights than the backbone's: pass their identity.")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        state = state if state is not None else _base_state_dict(backbone.base_model)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, value in state.items():
            nbytes = value.numel() * value.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = value
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            name = shard_name(i, len(shards))
            atomic_save_safetensors(unshare(shard), tmp / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        if len(shards) > 1:
            total = sum(v.numel() * v.element_size() for v in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write_bytes(tmp / "model.safetensors.index.json", json.dumps(index, indent=2).encode())
        config = backbone.config.to_dict()
        config["architectures"] = ["LlamaForCausalLM"]
        config["lloco_identity"] = identity or backbone.identity
        atomic_write_bytes(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str).encode())
        backbone.tokenizer.save_pretrained(str(tmp))
        generation_config = getattr(backbone.base_model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(str(tmp))
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
