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
