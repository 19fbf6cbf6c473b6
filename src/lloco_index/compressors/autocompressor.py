"""AutoCompressor: recursive summary vectors, the LLoCO paper's context encoder.

An AutoCompressor (Chevalier et al., 2023; github.com/princeton-nlp/AutoCompressors)
is a causal LM fine-tuned to write ``summary_length`` *summary vectors* per segment
of text. Segment ``k`` is read as::

    [summary vectors of segments 0..k-1]  [segment k tokens]  [summary tokens 1..S]
     positions 0 .. P-1                     P .. P+n-1          P+n .. P+n+S-1

with ordinary causal attention and contiguous positions (the LLaMA variant
overrides nothing about positions), and the summary vectors of segment ``k``
are the final hidden states (after the last RMSNorm) at the ``S`` summary-token
positions. With ``accumulate`` (true for the public checkpoints) the summaries
of all previous segments are prepended, oldest first; otherwise only the last
one. A text's soft prompt is the concatenation of its segments' summaries
(``n_segments * summary_length`` positions), which the *same* LLaMA weights
read back as input embeddings (LLoCO adds a LoRA adapter on top for reading).

Loading the public checkpoint (e.g. ``princeton-nlp/AutoCompressor-Llama-2-7b-6k``
downloaded to a local directory)::

    >>> from lloco_index.compressors.autocompressor import AutoCompressor
    >>> compressor = AutoCompressor.from_checkpoint("/models/AutoCompressor-Llama-2-7b-6k")
    >>> [prompt] = compressor.compress([long_text])        # [50 * n_segments, 4096]
    >>> compressor.save_pretrained("runs/autocompressor")  # safetensors only
    >>> load_compressor("runs/autocompressor")              # back again

The checkpoint ships pickle ``.bin`` shards. They are read once with
``torch.load(weights_only=True)`` and converted into a safetensors compressor
directory under :func:`lloco_index.defaults.cache_dir` (``autocompressors/``);
later loads of the same checkpoint read only that copy.

This module is the model. Its config lives in :mod:`.autocompressor_config`, the reading and
conversion of the public checkpoints in :mod:`.autocompressor_convert`, and the writing of a
decoder directory (``save_pretrained(decoder="copy")``, ``save_merged``) in :mod:`.decoder_dir`;
their public names are importable from here as well.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import defaults
from ..backbone import Backbone
from ..errors import ModelNotFoundError, StoreMismatchError
from ..precision import autocast
from ..fileio import atomic_write_bytes
from ..models import select_device, select_dtype
from .base import BaseCompressor, atomic_save_safetensors, read_compressor_config, tensors_digest
from .autocompressor_config import (  # noqa: F401  (re-exported: the names a caller of this module knows)
    DECODER_SUBDIR,
    PAPER_CHECKPOINT,
    PAPER_SEGMENT_LENGTH,
    PAPER_SUMMARY_LENGTH,
    SUMMARY_KEY,
    AutoCompressorConfig,
)
from .autocompressor_convert import CheckpointSource, convert_checkpoint, inspect_checkpoint  # noqa: F401
from .decoder_dir import merged_state_dict, write_decoder_dir  # noqa: F401

logger = logging.getLogger(__name__)

WRITER_PREFIX = "writer."  # a training-time writer LoRA's tensors in weights()
READER_ADAPTER = "lloco_reader"  # same name as the ICAE reader, so SoftPromptReader(adapter="auto") finds it
CACHE_SUBDIR = "autocompressors"


@dataclass
class SummaryStep:
    """One step of the recursion: segment ``step`` of the texts in ``active``, run as one batch.

    Row ``r`` of ``hidden`` reads ``[prefix (prefix_lengths[r] summary vectors)] [segment_ids[r]]
    [summary tokens]``, right-padded to the widest row.
    """

    step: int
    active: list[int]  # indices of the texts that have a segment at this step
    hidden: torch.Tensor  # [rows, width, hidden], after the final RMSNorm
    lengths: list[int]
    prefix_lengths: list[int]
    segment_ids: list[torch.Tensor]
    n_slots: int

    def summaries(self, row: int) -> torch.Tensor:
        end = self.lengths[row]
        return self.hidden[row, end - self.n_slots : end]


class AutoCompressor(BaseCompressor):
    """Recursive summary-vector compressor over a LLaMA decoder that reads its own summaries.

    >>> compressor = AutoCompressor.from_checkpoint("/models/AutoCompressor-Llama-2-7b-6k")
    >>> prompts = compressor.compress(["chapter one ...", "chapter two ..."])
    >>> prompts[0].shape          # (50 * n_segments, 4096)
    >>> reader = SoftPromptReader(compressor.backbone, store, compressor=compressor)

    A fresh, untrained one for training the recursive objective::

    >>> compressor = AutoCompressor(Backbone.load(), AutoCompressorConfig(n_slots=32, segment_length=256))
    """

    mode = "autocompressor"
    config_class = AutoCompressorConfig
    prompt_format = "plain"  # LLoCO: summaries at positions 0..P-1, then the prompt text, no BOS, no template

    def __init__(self, backbone: Backbone, config: Optional[AutoCompressorConfig] = None,
                 summary_embeddings: Optional[torch.Tensor] = None):
        config = config or AutoCompressorConfig()
        # The decoder is part of this compressor: record it now, so the fingerprint does not change on save.
        config.base_model = backbone.identity
        super().__init__(backbone, config)
        hidden = backbone.hidden_size
        self.embed_summary = nn.Embedding(config.n_slots, hidden)
        with torch.no_grad():
            if summary_embeddings is None:
                # The reference initialises every summary token to the EOS embedding.
                table = backbone.embedding_table().weight
                eos = backbone.tokenizer.eos_token_id if backbone.tokenizer.eos_token_id is not None else 0
                self.embed_summary.weight.copy_(table[eos].detach().float().expand(config.n_slots, -1))
            else:
                self._check_summary_shape(summary_embeddings)
                self.embed_summary.weight.copy_(summary_embeddings.float())
        # float32 master copy: bf16 -> f32 is exact, so fingerprints agree across save/load.
        self.embed_summary.to(backbone.device)
        # The adapter the summaries are written (and read) with while a LoRA is being trained on the recursive
        # objective (lloco_index.training); None for saved compressors, whose decoder weights do both.
        self.writer_adapter: Optional[str] = None

    def _check_summary_shape(self, tensor: torch.Tensor) -> None:
        expected = (self.config.n_slots, self.backbone.hidden_size)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"summary embeddings have shape {tuple(tensor.shape)}, expected {expected} "
                             f"(summary_length x hidden_size).")

    @property
    def accumulate(self) -> bool:
        return bool(self.config.accumulate)

    @property
    def reader_adapter(self) -> Optional[str]:
        """The LoRA the decoder reads summaries with (LLoCO's finetuned adapter), when one is loaded."""
        return READER_ADAPTER if self.backbone.has_adapter(READER_ADAPTER) else None

    def load_reader_adapter(self, path: Union[str, Path]) -> None:
        """Load a peft LoRA for reading summaries (e.g. a LLoCO adapter trained on this checkpoint).

        >>> compressor.load_reader_adapter("/adapters/lloco-quality")  # then SoftPromptReader(adapter="auto")
        """
        self.backbone.load_adapter(path, READER_ADAPTER)

    def num_positions(self, n_tokens: int) -> int:
        if n_tokens <= 0:
            return 0
        if self.accumulate:
            return super().num_positions(n_tokens)
        return self.n_slots  # without accumulation only the last segment's summary is the soft prompt

    # ---------------------------------------------------------- compression
    def summarize(self, per_text: Sequence[Sequence[Sequence[int]]]) -> list[torch.Tensor]:
        """Summary vectors of each text, given as token-id segments. Differentiable (used by training).

        Run it inside ``backbone.using(compressor.writer_adapter)``, or call :meth:`encode` or
        :meth:`compress`, which do so.
        """
        history: list[list[torch.Tensor]] = [[] for _ in per_text]
        for step in self.iter_steps(per_text):
            for row, i in enumerate(step.active):
                history[i].append(step.summaries(row))
        return [torch.cat(h, dim=0) if self.accumulate else h[-1] for h in history]

    def iter_steps(self, per_text: Sequence[Sequence[Sequence[int]]]) -> Iterator["SummaryStep"]:
        """Run the recursion one segment index at a time and yield each step's hidden states.

        Step ``k`` runs segment ``k`` of every text that has one, as one batch. Rows are
        right-padded: real positions never see the padding under the causal mask, so a
        text's summaries do not depend on what it is batched with, and positions stay
        contiguous from 0 like the reference's (which unpads for flash attention).
        The summaries of step ``k`` (``SummaryStep.summaries``) are the prefix of step ``k+1``;
        the recursive training objective reads the segment positions of the same hidden states.
        """
        if not per_text:
            return
        if any(len(segments) == 0 or any(len(seg) == 0 for seg in segments) for segments in per_text):
            raise ValueError("summarize() needs at least one non-empty segment per text (empty texts have no summary).")
        backbone = self.backbone
        device = backbone.device
        table = backbone.embedding_table()
        dtype = table.weight.dtype
        summary_tokens = self.embed_summary.weight.to(device=device, dtype=dtype)
        empty = table.weight.new_zeros(0, table.weight.shape[1])
        history: list[list[torch.Tensor]] = [[] for _ in per_text]
        for step in range(max(len(segments) for segments in per_text)):
            active = [i for i, segments in enumerate(per_text) if len(segments) > step]
            rows, prefix_lengths, segment_ids = [], [], []
            for i in active:
                ids = torch.tensor(list(per_text[i][step]), dtype=torch.long, device=device)
                prefix = self._prefix(history[i], empty).to(dtype)
                rows.append(torch.cat([prefix, table(ids), summary_tokens], dim=0))
                prefix_lengths.append(prefix.shape[0])
                segment_ids.append(ids)
            lengths = [row.shape[0] for row in rows]
            width = max(lengths)
            inputs = torch.stack([nn.functional.pad(row, (0, 0, 0, width - row.shape[0])) for row in rows])
            arange = torch.arange(width, device=device)
            mask = (arange.unsqueeze(0) < torch.tensor(lengths, device=device).unsqueeze(1)).long()
            positions = arange.unsqueeze(0).expand(len(rows), -1)
            with autocast(device):
                # last_hidden_state is after the final RMSNorm, as in the reference.
                hidden = backbone.base_model.model(
                    inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=False
                ).last_hidden_state
            out = SummaryStep(step, active, hidden, lengths, prefix_lengths, segment_ids, self.n_slots)
            for row, i in enumerate(active):
                history[i].append(out.summaries(row))
            yield out

    def encode(self, segments: list[list[int]]) -> list[torch.Tensor]:
        """Each segment's summary vectors on its own (no history), under :attr:`writer_adapter`.

        Differentiable: the training objectives and held-out evaluation that ICAE compressors
        share call this.
        """
        with self.backbone.using(self.writer_adapter):
            return self.summarize([[s] for s in segments])

    def _prefix(self, summaries: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
        if not summaries:
            return empty
        return torch.cat(summaries, dim=0) if self.accumulate else summaries[-1]

    def _compress_texts(self, per_text: list[list[list[int]]], *, batch_size: int, progress: bool) -> list[torch.Tensor]:
        # Texts with similar segment counts together: fewer idle rows in later steps.
        order = sorted(range(len(per_text)), key=lambda i: (len(per_text[i]), len(per_text[i][-1])))
        outputs: list[Optional[torch.Tensor]] = [None] * len(per_text)
        bar = tqdm(total=sum(len(s) for s in per_text), desc="compressing", unit="seg", disable=not progress)
        # Summaries come from the decoder weights themselves (the public checkpoints are fully finetuned),
        # or from the LoRA they were trained with, never from a reader adapter loaded on top.
        with torch.inference_mode(), self.backbone.using(self.writer_adapter):
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                for i, summary in zip(idx, self.summarize([per_text[i] for i in idx])):
                    outputs[i] = summary.to(self.storage_dtype).cpu()
                bar.update(sum(len(per_text[i]) for i in idx))
        bar.close()
        return outputs  # type: ignore[return-value]

    # -------------------------------------------------------- persistence
    def weights(self) -> dict[str, torch.Tensor]:
        # The decoder weights are identified by the backbone identity (derived from the checkpoint
        # files), not hashed: hashing 13 GB on every load would cost more than the load. A writer LoRA
        # (training) changes the summaries, so it is part of the weights (and of the fingerprint).
        tensors = {SUMMARY_KEY: self.embed_summary.weight.detach()}
        if self.writer_adapter is not None:
            tensors.update({f"{WRITER_PREFIX}{k}": v for k, v in self.backbone.adapter_state_dict(self.writer_adapter).items()})
        return tensors

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        if SUMMARY_KEY not in tensors:
            raise ModelNotFoundError(f"The compressor weights hold no '{SUMMARY_KEY}' (found {sorted(tensors)[:5]}); "
                                     f"re-save the compressor or convert the checkpoint again.")
        self._check_summary_shape(tensors[SUMMARY_KEY])
        writer = {k[len(WRITER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(WRITER_PREFIX)}
        if writer and self.writer_adapter is None:
            raise ValueError("These weights include a writer LoRA, but this AutoCompressor has no writer adapter; "
                             "load them into the compressor built for training (lloco_index.training), or export "
                             "the run with `lloco-index pretrain --export`, which merges the LoRA into the decoder.")
        with torch.no_grad():
            self.embed_summary.weight.copy_(tensors[SUMMARY_KEY].float())
        if writer:
            self.backbone.set_adapter_state_dict(self.writer_adapter, writer)
        self.invalidate_fingerprint()

    def save_pretrained(self, directory: Union[str, Path], *, decoder: str = "copy") -> None:
        """Write ``lloco_compressor.json``, ``compressor.safetensors`` and the decoder (safetensors).

        ``decoder="copy"`` writes the LLaMA weights and tokenizer into ``directory/decoder``
        (self-contained; ~13.5 GB for the 7B model). ``decoder="reference"`` records the
        absolute path of the decoder directory this compressor was loaded from instead.
        The decoder keeps ``backbone.identity``: code that changes the decoder weights in place
        (full fine-tuning) must give the backbone a new identity first, or stores written before
        would be accepted for the changed model.
        """
        if self.writer_adapter is not None:
            raise ValueError("This AutoCompressor writes its summaries with a LoRA that save_pretrained would drop; "
                             "export the training run with `lloco-index pretrain --export RUN_DIR --out DIR` (or call "
                             "save_merged(dir)), which merges the LoRA into a decoder copy with its own identity.")
        directory = Path(directory).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        if decoder == "reference":
            source = self._decoder_path()
            if source is None:
                raise ValueError("decoder='reference' needs a compressor loaded from a directory; use decoder='copy'.")
            self.config.extra["decoder_dir"] = str(source)
        elif decoder == "copy":
            target = directory / DECODER_SUBDIR
            if self._decoder_path() != target:
                write_decoder_dir(self.backbone, target)
            self.config.extra["decoder_dir"] = DECODER_SUBDIR
        else:
            raise ValueError(f"decoder must be 'copy' or 'reference', got {decoder!r}")
        # Weights, then the JSON last: its presence marks a complete directory.
        super().save_pretrained(directory)

    def save_merged(self, directory: Union[str, Path]) -> str:
        """Write a compressor trained with a writer LoRA in the public checkpoints' layout; returns the new identity.

        The LoRA is merged into a float32 copy of the decoder (``directory/decoder``) that gets an identity of
        its own (the base identity + a digest of the trained weights), next to the summary embeddings. Load it
        back with ``load_compressor(directory)``; ``lloco-index pretrain --export`` calls this.
        """
        if self.writer_adapter is None:
            raise ValueError("save_merged() writes a compressor trained with a writer LoRA; this one has none, so "
                             "use save_pretrained(dir).")
        directory = Path(directory)
        identity = f"autocompressor:{self.backbone.identity}:{tensors_digest(self.weights())[:12]}"
        write_decoder_dir(self.backbone, directory / DECODER_SUBDIR, identity=identity,
                          state=merged_state_dict(self.backbone.base_model, self.writer_adapter))
        config = replace(self.config, base_model=identity,
                         extra={**self.config.extra, "decoder_dir": DECODER_SUBDIR})
        # Weights, then the JSON last: its presence marks a complete directory.
        atomic_save_safetensors({SUMMARY_KEY: self.embed_summary.weight.detach().contiguous()},
                                directory / defaults.COMPRESSOR_WEIGHTS_NAME, metadata={"format": "pt"})
        atomic_write_bytes(directory / defaults.COMPRESSOR_CONFIG_NAME, config.to_json().encode())
        return identity

    def _decoder_path(self) -> Optional[Path]:
        if self.source_dir is None:
            return None
        path = Path(self.config.extra.get("decoder_dir", DECODER_SUBDIR))
        return (path if path.is_absolute() else self.source_dir / path).resolve()

    @classmethod
    def from_directory(cls, directory: Union[str, Path], config_dict: Optional[dict] = None, *,
                       backbone: Optional[Backbone] = None, decoder: Optional[Union[str, Path]] = None,
                       dtype: Optional[torch.dtype] = None,
                       device: Optional[Union[str, torch.device]] = None) -> "AutoCompressor":
        """Load a directory written by :meth:`save_pretrained` (``load_compressor`` calls this).

        The decoder is part of an AutoCompressor: by default it is loaded from the directory the
        config records (``decoder/``). ``decoder`` loads it from another directory, ``backbone``
        reuses one already loaded; either must hold the decoder the compressor was saved with.
        ``dtype``/``device`` default to :func:`lloco_index.models.select_device` (``$LLOCO_DEVICE``,
        else a GPU when there is one) and :func:`~lloco_index.models.select_dtype`.
        """
        from safetensors.torch import load_file

        directory = Path(directory).resolve()
        if config_dict is None:
            config_dict = read_compressor_config(directory)
        from .base import check_compressor_config

        check_compressor_config(config_dict, str(directory / defaults.COMPRESSOR_CONFIG_NAME))  # before the decoder loads
        fields = {k: v for k, v in config_dict.items() if k in AutoCompressorConfig.__dataclass_fields__}
        config = AutoCompressorConfig(**fields)
        if backbone is not None:
            if dtype is not None or device is not None:
                raise ValueError("AutoCompressor.from_directory: pass backbone= or dtype=/device=, not both "
                                 "(the backbone is already loaded with its own dtype and device).")
            decoder_path = Path(backbone.source_path) if backbone.source_path else None
        else:
            if decoder is not None:
                decoder_path = Path(decoder).expanduser().resolve()
            else:
                decoder_path = Path(config.extra.get("decoder_dir", DECODER_SUBDIR))
                decoder_path = decoder_path if decoder_path.is_absolute() else directory / decoder_path
            if not (decoder_path / "config.json").is_file():
                raise ModelNotFoundError(
                    f"The AutoCompressor at '{directory}' has no decoder at '{decoder_path}' (config.json missing). Save it "
                    f"again with save_pretrained(dir) (decoder='copy'), or convert the original checkpoint again with "
                    f"AutoCompressor.from_checkpoint(<checkpoint dir>)."
                )
            device = select_device(device)
            # Loaded straight onto its device: moving a cached decoder afterwards would leave the
            # cache entry for one device holding a model on another.
            backbone = Backbone.load(decoder_path, dtype=select_dtype(device, dtype), device=device)
        if config.base_model and config.base_model != backbone.identity:
            raise StoreMismatchError(
                f"The AutoCompressor at '{directory}' was saved with decoder '{config.base_model}', but '{decoder_path}' "
                f"holds '{backbone.identity}'. Restore the matching decoder directory or re-save the compressor."
            )
        weights_path = directory / defaults.COMPRESSOR_WEIGHTS_NAME
        if not weights_path.is_file():
            raise ModelNotFoundError(f"{weights_path} is missing (it holds the summary-token embeddings); re-save the "
                                     f"compressor or convert the checkpoint again with AutoCompressor.from_checkpoint.")
        try:
            tensors = load_file(str(weights_path))
        except Exception as exc:
            raise ModelNotFoundError(f"{weights_path} is corrupt or truncated ({exc}); re-save the compressor or "
                                     f"convert the checkpoint again with AutoCompressor.from_checkpoint.") from exc
        compressor = cls(backbone, config, summary_embeddings=tensors.get(SUMMARY_KEY))
        compressor.load_weights(tensors)
        compressor.source_dir = directory
        return compressor

    @classmethod
    def from_checkpoint(cls, local_dir: Union[str, Path], *, segment_length: Optional[int] = None,
                        tokenizer: Optional[Union[str, Path]] = None, cache_dir: Optional[Union[str, Path]] = None,
                        dtype: Optional[torch.dtype] = None,
                        device: Optional[Union[str, torch.device]] = None) -> "AutoCompressor":
        """Load a public AutoCompressor-LLaMA checkpoint directory (or an already converted one).

        The first call converts the pickle shards (``torch.load(weights_only=True)`` only) into a
        safetensors compressor directory under ``cache_dir`` (default
        ``lloco_index.defaults.cache_dir()/autocompressors``); later calls load that copy and never
        touch pickle. ``tokenizer`` points at a directory with tokenizer files when the checkpoint has
        none (LLoCO loads the tokenizer of ``meta-llama/Llama-2-7b-chat-hf``, the same LLaMA-2 vocabulary).
        ``segment_length`` overrides the tokens per segment (default 1536, LLoCO's setting).
        """
        local_dir = Path(local_dir).expanduser().resolve()
        if (local_dir / defaults.COMPRESSOR_CONFIG_NAME).is_file():  # already a compressor directory
            compressor = cls.from_directory(local_dir, dtype=dtype, device=device)
        else:
            source = inspect_checkpoint(local_dir, tokenizer=tokenizer)
            root = Path(cache_dir).expanduser() if cache_dir is not None else defaults.cache_dir() / CACHE_SUBDIR
            target = root / f"{source.name}-{source.signature[:16]}"
            if not (target / defaults.COMPRESSOR_CONFIG_NAME).is_file():
                convert_checkpoint(source, target)
            compressor = cls.from_directory(target, dtype=dtype, device=device)
        if segment_length is not None and segment_length != compressor.config.segment_length:
            if segment_length <= 0:
                raise ValueError(f"segment_length must be positive, got {segment_length}")
            compressor.config.segment_length = int(segment_length)
            compressor.invalidate_fingerprint()
        return compressor
