"""Which Hugging Face decoder families lloco-index runs on, and the load-time check that refuses the others.

What the package needs from a decoder: an input-embedding module (text and soft prompts are spliced as input
embeddings), an inner ``.model`` decoder with a ``.layers`` list that it runs over
``layers[: config.num_hidden_layers]`` (the ICAE encoder stops early by lowering that count), and the
projection names the LoRA adapters target. Each family listed here passes the tiny-config suite in
``tests/unit/families/test_families.py`` (compress, splice, generate, stream, pretrain, finetune, save/load and the
identity-compressor parity); a family outside the list is refused before anything is trained on it.
"""

from __future__ import annotations

import torch

from .errors import UnsupportedModelError

# config.model_type -> the name the docs use; docs/models.md lists these.
SUPPORTED_FAMILIES = {
    "llama": "LLaMA (LLaMA 2/3, SmolLM2, TinyLlama, ...)",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text-only Gemma3ForCausalLM)",
}

# The projections ICAE's encoder and reader adapters target; finetuning uses the attention subset.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def missing_parts(model: torch.nn.Module) -> list[str]:
    """What ``model`` lacks of the structure lloco-index drives (empty when it has all of it)."""
    missing = []
    try:
        if model.get_input_embeddings() is None:
            missing.append("an input-embedding module (get_input_embeddings() is None)")
    except (AttributeError, NotImplementedError):
        missing.append("get_input_embeddings()")
    inner = getattr(model, "model", None)
    if inner is None or not isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        missing.append("an inner `.model` decoder with a `.layers` list")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [t for t in LORA_TARGETS if t not in names]
    if absent:
        missing.append("the LoRA target projections " + ", ".join(absent))
    return missing


def check_decoder(model: torch.nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is of a supported family."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family in SUPPORTED_FAMILIES:
        return
    missing = missing_parts(model)
    if family == "gemma3":
        why = "this is the multimodal Gemma 3 wrapper; load the text-only Gemma3ForCausalLM instead"
    elif missing:
        why = "it lacks " + "; ".join(missing)
    else:
        why = "it has the modules lloco-index drives, but no test in this package covers the family"
    raise UnsupportedModelError(
        f"Decoder family {family!r} ({type(model).__name__}) is not supported: {why}. Supported families "
        f"(config.model_type): {', '.join(SUPPORTED_FAMILIES)}; see docs/models.md."
    )
