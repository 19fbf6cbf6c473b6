"""Reading the public AutoCompressor-LLaMA checkpoints and converting them into a compressor directory.

:func:`inspect_checkpoint` validates a downloaded checkpoint's layout without reading its weights;
:func:`convert_checkpoint` reads its pickle ``.bin`` shards once (``torch.load(weights_only=True)``,
one shard at a time) into a safetensors compressor directory that
:meth:`~lloco_index.compressors.autocompressor.AutoCompressor.from_directory` loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .. import defaults
from ..errors import ModelNotFoundError
from ..fileio import atomic_write_bytes, read_json
from .base import atomic_save_safetensors

from .autocompressor_config import DECODER_SUBDIR, PAPER_CHECKPOINT, PAPER_SEGMENT_LENGTH, SUMMARY_KEY, AutoCompressorConfig
from .decoder_dir import replace_dir, shard_name, unshare

logger = logging.getLogger(__name__)

# config.json keys that belong to the AutoCompressor, not to the plain LLaMA decoder.
_AC_CONFIG_KEYS = ("summary_length", "accumulate_summary", "segment_gradient_checkpointing", "segment_lengths",
                   "fast_attention", "use_kv")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
_SIGNATURE_CHUNK = 1 << 20


@dataclass
class CheckpointSource:
    """What :func:`inspect_checkpoint` found in a public AutoCompressor checkpoint directory."""

    directory: Path
    config: dict[str, Any]
    weight_files: list[Path]  # in shard order
    index_file: Optional[Path]  # *.index.json when sharded
    kind: str  # "bin" or "safetensors"
    tokenizer_dir: Path
    name: str  # e.g. "AutoCompressor-Llama-2-7b-6k"
    signature: str  # sha256 over config, index, tokenizer and the weight files' sizes, heads and tails

    @property
    def identity(self) -> str:
        return f"autocompressor:{self.name}:{self.signature[:12]}"


def _download_hint(directory: Path, filename: str = "") -> str:
    target = f" {filename}" if filename else ""
    return (f"`hf download {PAPER_CHECKPOINT}{target} --local-dir {directory}` (or `huggingface-cli download ...` with "
            f"older huggingface_hub), or copy it again from where you got the checkpoint")


def inspect_checkpoint(directory: Union[str, Path], *, tokenizer: Optional[Union[str, Path]] = None) -> CheckpointSource:
    """Validate the layout of a public AutoCompressor-LLaMA checkpoint without reading its weights."""
    directory = Path(directory).expanduser().resolve()
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"No AutoCompressor checkpoint at '{directory}' (config.json missing). Download it to a local directory, "
            f"e.g. {_download_hint(directory)}, and pass that directory."
        )
    config = read_json(config_path, lambda exc: ModelNotFoundError(
        f"{config_path} is not valid JSON ({exc}); restore it: {_download_hint(directory, 'config.json')}."))
    if not isinstance(config.get("summary_length"), int) or config["summary_length"] <= 0:
        raise ModelNotFoundError(
            f"'{directory}' is not an AutoCompressor checkpoint: config.json has no positive 'summary_length'. For a plain "
            f"LLaMA model use Backbone.load(dir) with ICAECompressor or TokenEmbeddingCompressor."
        )
    if config.get("model_type") != "llama":
        raise ModelNotFoundError(
            f"'{directory}' is an AutoCompressor of model_type {config.get('model_type')!r}; only the LLaMA variant "
            f"(architectures LlamaAutoCompressorModel, e.g. {PAPER_CHECKPOINT}) is supported."
        )
    weight_files, index_file, kind = _find_weight_files(directory)
    tok_dir = Path(tokenizer).expanduser().resolve() if tokenizer is not None else directory
    if not any((tok_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise ModelNotFoundError(
            f"No tokenizer files (tokenizer.json / tokenizer.model) in '{tok_dir}'. Download them with the checkpoint "
            f"({_download_hint(directory)}) or pass tokenizer=<a LLaMA-2 model directory> (LLoCO uses the tokenizer "
            f"of meta-llama/Llama-2-7b-chat-hf)."
        )
    h = hashlib.sha256()
    h.update(config_path.read_bytes())
    if index_file is not None:
        h.update(index_file.read_bytes())
    for name in _TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            h.update(name.encode())
            h.update((tok_dir / name).read_bytes())
    for path in weight_files:
        h.update(_file_signature(path))
    name = Path(str(config.get("_name_or_path") or directory.name)).name or directory.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    return CheckpointSource(directory, config, weight_files, index_file, kind, tok_dir, name, h.hexdigest())


def _file_signature(path: Path) -> bytes:
    """Name, size, first and last MiB: cheap, and changes when a shard is replaced or truncated."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(_SIGNATURE_CHUNK))
        if size > 2 * _SIGNATURE_CHUNK:
            f.seek(-_SIGNATURE_CHUNK, os.SEEK_END)
            h.update(f.read())
    return h.digest()


def _find_weight_files(directory: Path) -> tuple[list[Path], Optional[Path], str]:
    for kind, index_name, single in (("safetensors", "model.safetensors.index.json", "model.safetensors"),
                                     ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin")):
        index_path = directory / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise ModelNotFoundError(
                    f"{index_path} is corrupt ({exc!r}); restore it: {_download_hint(directory, index_name)}."
                ) from exc
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise ModelNotFoundError(
                    f"Checkpoint shard(s) {missing} listed in {index_path} are missing from '{directory}'. Download "
                    f"them: {_download_hint(directory, missing[0])}."
                )
            return [directory / s for s in shards], index_path, kind
        if (directory / single).is_file():
            return [directory / single], None, kind
    raise ModelNotFoundError(
        f"No weights in '{directory}': expected pytorch_model.bin.index.json with pytorch_model-*.bin shards (the "
        f"published layout), pytorch_model.bin, or model.safetensors[.index.json]. Download them: {_download_hint(directory)}."
    )


def _read_shard(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """Read one weight shard; pickle only through ``torch.load(weights_only=True)``."""
    fix = (f"Re-download this file ({_download_hint(path.parent, path.name)}) and compare its size and sha256 with "
           f"the Hugging Face Hub listing.")
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:  # mmap: a 10 GB shard is not copied into memory
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                state = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        if "Weights only load failed" in str(exc):
            # Do not relay torch's advice to retry with weights_only=False: that would run arbitrary code.
            raise ModelNotFoundError(
                f"Checkpoint file {path} holds Python objects other than tensors, which lloco-index never unpickles "
                f"(torch.load(weights_only=True) only). The published shards hold tensors only, so this file is "
                f"damaged or not one of them. {fix}"
            ) from exc
        raise ModelNotFoundError(
            f"Checkpoint file {path} could not be read: it is truncated or corrupt ({type(exc).__name__}: {detail}). {fix}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelNotFoundError(f"Checkpoint file {path} does not hold a name -> tensor mapping. {fix}")
    return state


def _expected_decoder_keys(llama_config: dict) -> set[str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # no memory: only the parameter names
        model = LlamaForCausalLM(LlamaConfig(**llama_config))
    keys = set(model.state_dict())
    if model.config.tie_word_embeddings:
        keys.discard("lm_head.weight")
    return keys


def _decoder_config(config: dict, identity: str, source: Optional[Path]) -> dict:
    plain = {k: v for k, v in config.items() if k not in _AC_CONFIG_KEYS}
    plain["architectures"] = ["LlamaForCausalLM"]  # the decoder half is a standard LLaMA
    plain["lloco_identity"] = identity  # models.resolve_decoder_path reads this
    plain["lloco_autocompressor"] = {k: config[k] for k in _AC_CONFIG_KEYS if k in config}
    if source is not None:
        plain["lloco_autocompressor"]["source"] = str(source)
    return plain


def convert_checkpoint(source: CheckpointSource, target: Union[str, Path]) -> Path:
    """Convert a public checkpoint into a safetensors compressor directory at ``target``.

    One source shard at a time (memory stays at about one shard); everything is written
    into a temporary directory that is renamed into place at the end, so an interrupted
    conversion leaves no half-written copy behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    config = source.config
    logger.info("Converting AutoCompressor checkpoint %s to safetensors at %s (one-off)", source.directory, target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        decoder = tmp / DECODER_SUBDIR
        decoder.mkdir()
        weight_map: dict[str, str] = {}
        summary: Optional[torch.Tensor] = None
        total = 0
        n = len(source.weight_files)
        for i, path in enumerate(source.weight_files):
            state = _read_shard(path, source.kind)
            if SUMMARY_KEY in state:
                summary = state.pop(SUMMARY_KEY).detach().clone()
            # Rotary inverse frequencies are recomputed from the config; older exports saved them.
            state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
            name = shard_name(i, n)
            atomic_save_safetensors(unshare(state), decoder / name, metadata={"format": "pt"})
            for key, value in state.items():
                weight_map[key] = name
                total += value.numel() * value.element_size()
            del state
        if summary is None:
            raise ModelNotFoundError(
                f"'{source.directory}' has no '{SUMMARY_KEY}' tensor (the summary-token embeddings) in "
                f"{[p.name for p in source.weight_files]}: it is not a complete AutoCompressor checkpoint. "
                f"{_download_hint(source.directory)}."
            )
        expected_shape = (config["summary_length"], config.get("hidden_size"))
        if tuple(summary.shape) != expected_shape:
            raise ModelNotFoundError(
                f"'{SUMMARY_KEY}' has shape {tuple(summary.shape)} but config.json says summary_length x hidden_size = "
                f"{expected_shape}; config.json and the weights do not belong together."
            )
        llama_config = _decoder_config(config, source.identity, source.directory)
        missing = sorted(_expected_decoder_keys(llama_config) - set(weight_map))
        if missing:
            raise ModelNotFoundError(
                f"The checkpoint at '{source.directory}' lacks {len(missing)} LLaMA weights (e.g. {missing[:3]}); a shard "
                f"or the index is incomplete. {_download_hint(source.directory)}."
            )
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_bytes(decoder / "model.safetensors.index.json", json.dumps(index, indent=2).encode())
        atomic_write_bytes(decoder / "config.json", json.dumps(llama_config, indent=2, sort_keys=True).encode())
        for name in _TOKENIZER_FILES:
            if (source.tokenizer_dir / name).is_file():
                shutil.copyfile(source.tokenizer_dir / name, decoder / name)
        if (source.directory / "generation_config.json").is_file():
            shutil.copyfile(source.directory / "generation_config.json", decoder / "generation_config.json")
        atomic_save_safetensors({SUMMARY_KEY: summary}, tmp / defaults.COMPRESSOR_WEIGHTS_NAME, metadata={"format": "pt"})
        segment_lengths = config.get("segment_lengths")
        if isinstance(segment_lengths, list) and segment_lengths:
            segment_lengths = segment_lengths[0]
        compressor_config = AutoCompressorConfig(
            base_model=source.identity,
            n_slots=int(config["summary_length"]),
            segment_length=int(segment_lengths) if isinstance(segment_lengths, int) and segment_lengths > 0 else PAPER_SEGMENT_LENGTH,
            accumulate=bool(config.get("accumulate_summary", True)),
            storage_dtype="bfloat16",
            extra={"source": str(source.directory), "source_signature": source.signature, "decoder_dir": DECODER_SUBDIR},
        )
        atomic_write_bytes(tmp / defaults.COMPRESSOR_CONFIG_NAME, compressor_config.to_json().encode())
        if (target / defaults.COMPRESSOR_CONFIG_NAME).is_file():
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same conversion first
        else:
            replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
