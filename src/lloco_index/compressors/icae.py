"""ICAE-style compressor and its window mean-pooling variant.

The encoder is the decoder itself with its own LoRA adapter
(``lloco_compressor``; see :attr:`ICAECompressor.encoder_adapter`). Two ways to read a segment out of it:

* ``pooling="memory"``: ``n_slots`` learned memory-token embeddings are
  appended after the segment's tokens; the soft prompt is the last-layer
  hidden states at those positions (ICAE).
* ``pooling="mean"``: the last-layer hidden states of the segment's own tokens
  are mean-pooled over windows of ``segment_length // n_slots`` tokens (no new
  parameters, any ratio; Feldman & Artzi).

Either way a :class:`SoftPromptProjection` maps the result into the decoder's
input-embedding space. The decoder reads the soft prompts with the compressor
adapter switched off, optionally with a reader adapter trained alongside it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from .. import defaults
from ..backbone import Backbone
from ..errors import ModelNotFoundError
from ..families import LORA_TARGETS
from ..precision import autocast
from .base import BaseCompressor, CompressorConfig, check_compressor_config
from .projection import SoftPromptProjection

ENCODER_ADAPTER = "lloco_compressor"
READER_ADAPTER = "lloco_reader"
# Names for further compressors on the same backbone. They must not contain the first names: peft
# before 0.21 picks an adapter's weights by substring, so "lloco_compressor" would match "lloco_compressor_2".
ENCODER_ADAPTER_N = "lloco_enc_{:04d}"
READER_ADAPTER_N = "lloco_rdr_{:04d}"
READER_SUBDIR = "reader"


@dataclass
class ICAEConfig(CompressorConfig):
    mode: str = "icae"
    pooling: str = "memory"  # "memory" (learned memory tokens) or "mean" (window mean-pooling)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    has_reader: bool = False  # a reader adapter is saved beside the compressor
    # Read the encoder's hidden states after this many layers (None: the last layer). An early layer is
    # cheaper (the encoder runs only those layers) and still close to the input-embedding space.
    pool_layer: Optional[int] = None


class ICAEHead(nn.Module):
    """The compressor's own parameters besides its LoRA: memory tokens and the projection."""

    def __init__(self, hidden: int, n_slots: int, pooling: str, target_norm: float, init_memory: Optional[torch.Tensor]):
        super().__init__()
        if pooling == "memory":
            memory = init_memory if init_memory is not None else torch.randn(n_slots, hidden) * 0.02
            self.memory = nn.Parameter(memory.clone().float())
        self.projection = SoftPromptProjection(hidden, hidden, target_norm=target_norm)


class ICAECompressor(BaseCompressor):
    """Compress chunks with the decoder + a LoRA encoder adapter.

    >>> backbone = Backbone.load()
    >>> compressor = ICAECompressor(backbone, ICAEConfig(n_slots=32, segment_length=256, pooling="mean"))
    >>> soft_prompts = compressor.compress(["chunk one ...", "chunk two ..."])

    Each compressor has adapters of its own on the backbone: the first one made
    on a backbone uses ``lloco_compressor`` (encoder) and ``lloco_reader``
    (reader), further live ones ``lloco_enc_0002``/``lloco_rdr_0002`` and so on.
    Saved weights do not record these names.
    """

    mode = "icae"
    config_class = ICAEConfig

    def __init__(self, backbone: Backbone, config: Optional[ICAEConfig] = None):
        config = config or ICAEConfig()
        check_compressor_config(config, f"{type(self).__name__} config")  # before n_slots divides anything
        if config.pooling not in ("memory", "mean"):
            raise ValueError(f"pooling must be 'memory' or 'mean', got {config.pooling!r}")
        if config.segment_length % config.n_slots and config.pooling == "mean":
            raise ValueError("mean pooling needs segment_length to be a multiple of n_slots")
        super().__init__(backbone, config)
        from peft import LoraConfig

        # Two compressors on one backbone must never share (and overwrite) each other's LoRA weights.
        self.encoder_adapter = backbone.reserve_adapter_name(self, ENCODER_ADAPTER, ENCODER_ADAPTER_N)
        self.reader_adapter_name = backbone.reserve_adapter_name(self, READER_ADAPTER, READER_ADAPTER_N)
        # With an early pool layer the later layers never run for the encoder: no LoRA there.
        layers = list(range(config.pool_layer)) if config.pool_layer is not None else None
        backbone.add_adapter(
            self.encoder_adapter,
            LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=config.lora_targets,
                       layers_to_transform=layers),
        )
        # The rows as the decoder sees them: Gemma's embedding module scales them by sqrt(hidden).
        table = backbone.embedding_table().weight.detach() * backbone.embedding_scale
        target_norm = float(table.float().norm(dim=-1).mean())
        # Memory tokens start as real token embeddings: in-distribution inputs for the encoder.
        init = table[torch.randint(0, table.shape[0], (config.n_slots,), generator=torch.Generator().manual_seed(0))]
        self.head = ICAEHead(backbone.hidden_size, config.n_slots, config.pooling, target_norm, init.float()).to(backbone.device)

    @property
    def window(self) -> int:
        return self.segment_length // self.n_slots

    @property
    def reader_adapter(self) -> Optional[str]:
        """Name of the reader adapter the decoder should use with these soft prompts, if any.

        The adapter, once added, lives under :attr:`reader_adapter_name`.
        """
        return self.reader_adapter_name if self.backbone.has_adapter(self.reader_adapter_name) else None

    def _segment_positions(self, n_tokens: int) -> int:
        return self.n_slots if self.config.pooling == "memory" else math.ceil(n_tokens / self.window)

    # ------------------------------------------------------------ encoder
    def encode(self, segments: list[list[int]]) -> list[torch.Tensor]:
        """Differentiable encoder: token-id segments -> soft prompts (used by training and compress)."""
        return [self.head.projection(p) for p in self.pooled(segments)]

    def pooled(self, segments: list[list[int]]) -> list[torch.Tensor]:
        """The encoder's pooled states before the projection, one [slots, hidden] tensor per segment.

        With the encoder LoRA frozen these are fixed per segment: training can compute them once and
        train the projection (and the reader) on the cache, one decoder pass per step.
        """
        device = self.backbone.device
        emb = self.backbone.embedding_table()
        lengths = [len(s) for s in segments]
        width = max(lengths)
        pad_id = self.backbone.tokenizer.pad_token_id or 0
        if self.config.pooling == "memory":
            # Left padding puts every segment's memory tokens at the same final positions.
            ids = torch.tensor([[pad_id] * (width - n) + s for s, n in zip(segments, lengths)], device=device)
            tok_mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=device)
            mem = self.head.memory.unsqueeze(0).expand(len(segments), -1, -1)
            inputs = torch.cat([emb(ids), mem.to(emb.weight.dtype)], dim=1)
            mask = torch.cat([tok_mask, torch.ones(len(segments), self.n_slots, dtype=tok_mask.dtype, device=device)], 1)
        else:
            ids = torch.tensor([s + [pad_id] * (width - n) for s, n in zip(segments, lengths)], device=device)
            mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], device=device)
            inputs = emb(ids)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with self.backbone.using(self.encoder_adapter) as model, autocast(device), _first_layers(model, self.config.pool_layer):
            hidden = model.model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions).last_hidden_state
        if self.config.pooling == "memory":
            return [h for h in hidden[:, -self.n_slots :]]
        return [self._mean_windows(h[:n]) for h, n in zip(hidden, lengths)]

    def _mean_windows(self, hidden: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[0]
        slots = math.ceil(n / self.window)
        padded = torch.zeros(slots * self.window, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        padded[:n] = hidden
        counts = torch.full((slots,), float(self.window), device=hidden.device)
        counts[-1] = n - (slots - 1) * self.window
        return padded.view(slots, self.window, -1).sum(1) / counts.unsqueeze(-1).to(hidden.dtype)

    def _compress_segments(self, segments: list[list[int]]) -> list[torch.Tensor]:
        return self.encode(segments)

    # -------------------------------------------------------- persistence
    def weights(self) -> dict[str, torch.Tensor]:
        tensors = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        tensors.update({f"lora.{k}": v for k, v in self.backbone.adapter_state_dict(self.encoder_adapter).items()})
        return tensors

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        head = {k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")}
        lora = {k[len("lora.") :]: v for k, v in tensors.items() if k.startswith("lora.")}
        self.head.load_state_dict(head)
        if lora:
            self.backbone.set_adapter_state_dict(self.encoder_adapter, lora)
        self.invalidate_fingerprint()

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        self.config.has_reader = self.reader_adapter is not None
        super().save_pretrained(directory)
        if self.config.has_reader:
            name = self.reader_adapter_name
            # save_embedding_layers=False: see Backbone.adapter_state_dict (the vocabulary is never resized).
            self.backbone.peft_model.save_pretrained(str(directory / "_peft_tmp"), selected_adapters=[name],
                                                     save_embedding_layers=False)
            _move_adapter_dir(directory / "_peft_tmp", name, directory / READER_SUBDIR)

    @classmethod
    def _check_directory(cls, directory: Path, config_dict: dict) -> None:
        reader = directory / READER_SUBDIR
        if config_dict.get("has_reader") and not reader.is_dir():
            # The fingerprint covers the encoder only: without this check the store would still open
            # and every answer would change with the reader gone.
            raise ModelNotFoundError(
                f"{directory / defaults.COMPRESSOR_CONFIG_NAME} says a reader adapter is saved beside the compressor "
                f"(has_reader: true), but '{reader}' is missing; without it the decoder would read the soft prompts "
                f"unadapted and answers would change. Restore the reader/ directory from where the compressor was "
                f"saved, or save the compressor again."
            )
        if not config_dict.get("has_reader") and reader.is_dir():
            warnings.warn(
                f"'{reader}' is present but {directory / defaults.COMPRESSOR_CONFIG_NAME} says has_reader: false, so "
                f"the reader adapter is not loaded. Set has_reader to true if it belongs to this compressor, or "
                f"remove the directory.", UserWarning, stacklevel=4,
            )

    def _load_directory_extras(self, directory: Path) -> None:
        if self.config.has_reader:
            self.backbone.load_adapter(directory / READER_SUBDIR, self.reader_adapter_name)

    def _release(self) -> None:
        for name in (self.encoder_adapter, self.reader_adapter_name):
            if self.backbone.has_adapter(name):
                self.backbone.delete_adapter(name)


@contextlib.contextmanager
def _first_layers(model: nn.Module, n_layers: Optional[int]) -> Iterator[None]:
    """Run only the first ``n_layers`` decoder layers (LLaMA-family models loop over
    ``layers[: config.num_hidden_layers]``). Callers hold the backbone lock, so no other call sees it."""
    config = model.config
    full = config.num_hidden_layers
    if n_layers is None or n_layers >= full:
        yield
        return
    config.num_hidden_layers = n_layers
    try:
        yield
    finally:
        config.num_hidden_layers = full


def _move_adapter_dir(tmp: Path, adapter: str, target: Path) -> None:
    """peft saves non-default adapters under a subfolder; flatten it to ``target`` atomically."""
    import os
    import shutil

    source = tmp / adapter if (tmp / adapter).is_dir() else tmp
    if target.exists():
        shutil.rmtree(target)
    os.replace(source, target)
    shutil.rmtree(tmp, ignore_errors=True)
