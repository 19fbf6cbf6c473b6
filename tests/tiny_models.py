"""Tiny randomly initialised LLaMA backbones on the real SmolLM2 tokenizer, for fast tests."""

from __future__ import annotations

import functools

import torch

from lloco_index.backbone import Backbone


@functools.lru_cache(maxsize=None)
def smollm2_tokenizer():
    """The SmolLM2 tokenizer from the converted cache (converted once from the GGUF, ~20 s)."""
    from transformers import AutoTokenizer

    from lloco_index.models import default_decoder_dir

    tokenizer = AutoTokenizer.from_pretrained(str(default_decoder_dir()))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, max_positions: int = 2048, *,
               tie_word_embeddings: bool = True, initializer_range: float = 0.02, special_tokens: bool = True):
    """The one tiny random LLaMA of the tests (4 heads, 2 KV heads), on SmolLM2's vocabulary.

    ``initializer_range`` 0.2 gives a 64-wide model logits that an adapter can move (at 0.02, tied
    embeddings keep them under ~1.3); ``special_tokens=False`` leaves bos/eos/pad at LlamaConfig's
    defaults (no padding row zeroed), the model some tests were calibrated on.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id) if special_tokens else {}
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings, initializer_range=initializer_range, **ids,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return model


def tiny_backbone(seed: int = 0, identity: str = "tiny-test", **kwargs) -> Backbone:
    """A fresh Backbone (its own model, so adapters never leak between tests); ``kwargs`` go to :func:`tiny_llama`."""
    return Backbone(tiny_llama(seed, **kwargs), smollm2_tokenizer(), identity)


# Tiny random configs of every supported decoder family (docs/models.md), all on SmolLM2's tokenizer so that
# the text side is the same for each; 4 heads of 16, 2 KV heads, 2 layers. Gemma's sliding-window layers get
# a window shorter than the test prompts, so the local-attention path runs too.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")


def tiny_family_model(family: str, seed: int = 0, hidden: int = 64, initializer_range: float = 0.02):
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = smollm2_tokenizer()
    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=2048,
        initializer_range=initializer_range, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    if family in ("mistral", "gemma2", "gemma3_text"):
        common["sliding_window"] = 16
    if family in ("gemma2", "gemma3_text"):
        common["query_pre_attn_scalar"] = hidden // 4
    config = AutoConfig.for_model(family, **common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_family_backbone(family: str, seed: int = 0, identity: str | None = None, **kwargs) -> Backbone:
    return Backbone(tiny_family_model(family, seed, **kwargs), smollm2_tokenizer(), identity or f"tiny-{family}")
