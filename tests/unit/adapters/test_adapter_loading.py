"""A failed adapter load leaves nothing selectable under its name."""

from __future__ import annotations

import pytest

from lloco_index.errors import ModelNotFoundError


def test_failed_load_adapter_leaves_no_half_loaded_adapter(backbone, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    backbone.add_adapter("good", config)
    backbone.peft_model.save_pretrained(str(tmp_path / "saved"), selected_adapters=["good"])
    saved = tmp_path / "saved" / "good" if (tmp_path / "saved" / "good").is_dir() else tmp_path / "saved"
    weights = next(saved.glob("adapter_model.*"))
    weights.write_bytes(weights.read_bytes()[:30])  # truncated
    with pytest.raises(ModelNotFoundError, match="nothing was loaded under that name"):
        backbone.load_adapter(saved, "broken")
    assert not backbone.has_adapter("broken") and backbone.adapter_names == ["good"]
    with pytest.raises(KeyError, match="not loaded"):
        with backbone.using("broken"):
            pass


def test_failed_first_adapter_on_a_bare_model_leaves_the_model_as_it_was(tmp_path):
    """peft injects the LoRA layers into the base model before it reads the weights: a failed first
    load must take them out again, or every later call runs random LoRA weights."""
    import torch
    from peft import LoraConfig

    from tiny_models import tiny_backbone

    source = tiny_backbone(seed=1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    source.add_adapter("good", config)
    source.peft_model.save_pretrained(str(tmp_path / "saved"), selected_adapters=["good"])
    saved = tmp_path / "saved" / "good" if (tmp_path / "saved" / "good").is_dir() else tmp_path / "saved"
    weights = next(saved.glob("adapter_model.*"))
    weights.write_bytes(weights.read_bytes()[:30])  # truncated

    bare = tiny_backbone(seed=2)
    ids = torch.tensor([bare.tokenize("The lighthouse stood on the rock.")])
    with torch.no_grad():
        before = bare.base_model(input_ids=ids).logits
    names_before = sorted(n for n, _ in bare.base_model.named_modules())
    with pytest.raises(ModelNotFoundError, match="nothing was loaded under that name"):
        bare.load_adapter(saved, "broken")
    assert bare.peft_model is None and bare.adapter_names == []
    assert sorted(n for n, _ in bare.base_model.named_modules()) == names_before  # no LoRA layers left behind
    with torch.no_grad():
        after = bare.base_model(input_ids=ids).logits
    assert torch.equal(before, after)
    # The backbone still takes adapters afterwards.
    bare.add_adapter("fresh", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert bare.adapter_names == ["fresh"]
