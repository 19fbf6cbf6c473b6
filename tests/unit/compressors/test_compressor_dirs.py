"""Incomplete or invalid compressor directories and configs are refused with a precise error at load."""

from __future__ import annotations

import json
import shutil

import pytest

from lloco_index.compressors import ICAECompressor, ICAEConfig, TokenEmbeddingCompressor, load_compressor
from lloco_index.compressors.token_embedding import TokenEmbeddingConfig
from lloco_index.errors import InputError, ModelNotFoundError

from tiny_models import tiny_backbone


def _icae(backbone, **kwargs):
    return ICAECompressor(backbone, ICAEConfig(n_slots=4, segment_length=16, pooling="mean", lora_r=4, lora_alpha=8, **kwargs))


@pytest.fixture
def saved_with_reader(backbone, tmp_path):
    from peft import LoraConfig

    comp = _icae(backbone)
    backbone.add_adapter(comp.reader_adapter_name, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
    comp.save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "lloco_compressor.json").read_text())["has_reader"] is True
    return tmp_path / "c"


def test_complete_directory_loads_with_its_reader(saved_with_reader):
    loaded = load_compressor(saved_with_reader, backbone=tiny_backbone())
    assert loaded.reader_adapter == "lloco_reader"


def test_missing_reader_directory_is_refused(saved_with_reader):
    shutil.rmtree(saved_with_reader / "reader")
    bare = tiny_backbone()
    with pytest.raises(ModelNotFoundError, match=r"has_reader.*reader.*is missing"):
        load_compressor(saved_with_reader, backbone=bare)
    assert bare.adapter_names == []  # nothing of the half-loaded compressor stays on the decoder


def test_reader_directory_without_its_config_is_refused(saved_with_reader):
    (saved_with_reader / "reader" / "adapter_config.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"reader.*adapter_config.json"):
        load_compressor(saved_with_reader, backbone=tiny_backbone())


def test_reader_directory_that_the_config_does_not_name_is_a_warning(backbone, saved_with_reader):
    path = saved_with_reader / "lloco_compressor.json"
    config = json.loads(path.read_text())
    config["has_reader"] = False
    path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"has_reader.*false.*not loaded"):
        loaded = load_compressor(saved_with_reader, backbone=tiny_backbone())
    assert loaded.reader_adapter is None


def test_missing_weights_file_is_refused_not_loaded_untrained(backbone, tmp_path):
    _icae(backbone).save_pretrained(tmp_path / "c")
    (tmp_path / "c" / "compressor.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"compressor.safetensors is missing.*untrained"):
        load_compressor(tmp_path / "c", backbone=tiny_backbone())


def test_weights_file_lacking_tensors_is_refused(backbone, tmp_path):
    from safetensors.torch import load_file, save_file

    _icae(backbone).save_pretrained(tmp_path / "c")
    path = tmp_path / "c" / "compressor.safetensors"
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if not k.startswith("lora.")}, str(path))
    with pytest.raises(ModelNotFoundError, match=r"lacks .* of the tensors"):
        load_compressor(tmp_path / "c", backbone=tiny_backbone())


def test_weights_of_another_shape_are_refused(backbone, tmp_path):
    _icae(backbone).save_pretrained(tmp_path / "c")
    ICAECompressor(tiny_backbone(hidden=32), ICAEConfig(n_slots=4, segment_length=16, pooling="mean", lora_r=4,
                                                        lora_alpha=8)).save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "compressor.safetensors", tmp_path / "c" / "compressor.safetensors")
    with pytest.raises(ModelNotFoundError, match=r"do not fit"):
        load_compressor(tmp_path / "c", backbone=tiny_backbone())


def test_token_embedding_compressor_has_no_weights_to_miss(backbone, tmp_path):
    TokenEmbeddingCompressor(backbone, TokenEmbeddingConfig(segment_length=24)).save_pretrained(tmp_path / "t")
    (tmp_path / "t" / "compressor.safetensors").unlink()
    assert load_compressor(tmp_path / "t", backbone=backbone).segment_length == 24


@pytest.mark.parametrize("field,value,words", [
    ("n_slots", 0, r"n_slots must be a whole number of at least 1, got 0"),
    ("n_slots", -4, r"n_slots must be a whole number of at least 1, got -4"),
    ("n_slots", "4", r"n_slots must be a whole number of at least 1, got '4' \(str\)"),
    ("segment_length", 0, r"segment_length must be a whole number of at least 1, got 0"),
    ("storage_dtype", "float8", r"storage_dtype must be one of bfloat16, float16, float32, got 'float8'"),
])
def test_invalid_config_file_is_refused_precisely(backbone, tmp_path, field, value, words):
    _icae(backbone).save_pretrained(tmp_path / "c")
    path = tmp_path / "c" / "lloco_compressor.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"lloco_compressor.json: " + words):
        load_compressor(tmp_path / "c", backbone=tiny_backbone())


@pytest.mark.parametrize("kwargs,words", [
    (dict(n_slots=0), "n_slots must be a whole number of at least 1, got 0"),
    (dict(n_slots=True), r"n_slots must be a whole number of at least 1, got True \(bool\)"),
    (dict(segment_length=0), "segment_length must be a whole number of at least 1, got 0"),
    (dict(storage_dtype="int8"), "storage_dtype must be one of"),
])
def test_invalid_config_in_code_is_refused_precisely(backbone, kwargs, words):
    config = dict(n_slots=4, segment_length=16, pooling="mean")
    config.update(kwargs)
    with pytest.raises(InputError, match=words):
        ICAECompressor(backbone, ICAEConfig(**config))
    if "n_slots" not in kwargs:
        with pytest.raises(InputError, match=words):
            TokenEmbeddingCompressor(backbone, TokenEmbeddingConfig(**{k: v for k, v in kwargs.items()}))
