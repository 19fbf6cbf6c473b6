"""HF vs vLLM backend parity: same greedy answers on the same soft-prompt inputs, with and without LoRA.

Runs only where a CUDA GPU and vLLM (extra ``serve``) are present; skipped, with the reason shown, elsewhere.
The version logic runs everywhere.
"""

from __future__ import annotations

import pytest
import torch

from lloco_index.serving.vllm_backend import _version_tuple, vllm_supports_embeds_with_lora


def test_version_gate():
    assert _version_tuple("0.11.0") == (0, 11, 0) and _version_tuple("0.10.2rc1+cu128") == (0, 10, 2)
    assert vllm_supports_embeds_with_lora("0.11.0") and vllm_supports_embeds_with_lora("0.12.1")
    assert not vllm_supports_embeds_with_lora("0.10.1")


@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("vLLM parity needs a CUDA GPU (none here)")
    pytest.importorskip("vllm", reason="vLLM is not installed: pip install 'lloco-index[serve]'")
    from peft import LoraConfig

    from lloco_index.backbone import Backbone
    from lloco_index.compressors import TokenEmbeddingCompressor
    from lloco_index.generation import SoftPromptReader
    from lloco_index.models import default_decoder_dir
    from lloco_index.serving.vllm_backend import VLLMReader
    from lloco_index.store import SoftPromptStore

    backbone = Backbone.load(dtype=torch.bfloat16)
    backbone.base_model.to("cuda")
    # A small random LoRA on the attention and MLP projections, saved as vLLM loads adapters (peft layout).
    torch.manual_seed(0)
    backbone.add_adapter("probe", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                                             init_lora_weights=False))
    adapter_dir = tmp_path_factory.mktemp("probe-adapter")
    with torch.no_grad():
        for name, param in backbone.peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(0.1)  # keep answers sensible but different from the base model
    backbone.peft_model.save_pretrained(str(adapter_dir), selected_adapters=["probe"])
    compressor = TokenEmbeddingCompressor(backbone)
    store = SoftPromptStore.for_compressor(compressor)
    chunks = ["The Eiffel Tower was finished in 1889 for the World's Fair in Paris.",
              "Honey bees make honey from the nectar of flowers and store it in wax combs.",
              "The lighthouse of Alexandria was one of the seven wonders of the ancient world."]
    ids = store.add(chunks, compressor)
    hf = SoftPromptReader(backbone, store, compressor=compressor, adapter=None, max_new_tokens=24)
    vllm_reader = VLLMReader.from_reader(hf, model=str(default_decoder_dir()),
                                         adapters={"probe": str(adapter_dir / "probe")},
                                         gpu_memory_utilization=0.3, max_model_len=2048, enforce_eager=True)
    questions = ["When was it finished?", "What do they make?", "What was it?"]
    from lloco_index.generation import make_placeholder

    messages = [[{"role": "user", "content": f"Context: {make_placeholder(i)}\nQuestion: {q}"}] for i, q in zip(ids, questions)]
    return hf, vllm_reader, messages


def test_vllm_matches_hf_greedy(gpu_setup):
    hf, vllm_reader, messages = gpu_setup
    assert [r.text for r in vllm_reader.generate_batch(messages, adapter=None)] == \
        [hf.generate(m, adapter=None).text for m in messages]


def test_vllm_matches_hf_greedy_with_lora(gpu_setup):
    hf, vllm_reader, messages = gpu_setup
    got = [r.text for r in vllm_reader.generate_batch(messages, adapter="probe")]
    assert vllm_reader.fallbacks == 0, "prompt embeds + LoRA fell back to HF on this vLLM"
    assert got == [hf.generate(m, adapter="probe").text for m in messages]
