"""Every supported decoder family on a tiny random config: compress, splice, generate, stream, pretrain,
finetune, save/load and the identity-compressor parity (docs/models.md lists these families).

The parity test is the guard for families that transform input embeddings: Gemma scales them by
sqrt(hidden) inside its embedding module, so a soft prompt built from the raw table would read differently
from the same text inline.
"""

from __future__ import annotations

import math

import pytest
import torch

from lloco_index.backbone import Backbone
from lloco_index.compressors import ICAECompressor, ICAEConfig, TokenEmbeddingCompressor, load_compressor
from lloco_index.errors import UnsupportedModelError
from lloco_index.families import SUPPORTED_FAMILIES
from lloco_index.generation import SoftPromptReader, make_placeholder
from lloco_index.store import SoftPromptStore

from helpers import FACTS, PROSE as TEXT, greedy_plain as _greedy_plain, pretrain_config
from helpers import fast_finetune_config as fast_config
from tiny_models import FAMILIES, smollm2_tokenizer, tiny_family_backbone

CHUNKS = ["The tower was finished in 1889.", "Its designer was Gustave Eiffel, an engineer from Dijon."]
QUESTION = "\nQuestion: who designed it?"


pytestmark = pytest.mark.usefixtures("one_thread")


def small_icae(backbone, pooling="memory"):
    return ICAECompressor(backbone, ICAEConfig(n_slots=4, segment_length=16, pooling=pooling, lora_r=4, lora_alpha=8))


def test_families_are_the_documented_ones():
    assert set(FAMILIES) == set(SUPPORTED_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_parity_generate_and_stream(family, tmp_path):
    # initializer_range 0.2: at the default 0.02 a 64-wide random model mostly emits special tokens,
    # which would make the comparison vacuous.
    backbone = tiny_family_backbone(family, initializer_range=0.2)
    comp = TokenEmbeddingCompressor(backbone)
    store = SoftPromptStore.open(tmp_path, comp)
    ids = store.add(CHUNKS, comp)
    reader = SoftPromptReader(backbone, store, compressor=comp, max_new_tokens=10)
    messages = [{"role": "user", "content": "Context:\n" + "\n".join(make_placeholder(i) for i in ids) + QUESTION}]
    result = reader.generate(messages)
    plain = reader.render([{"role": "user", "content": "Context:\n" + "\n".join(CHUNKS) + QUESTION}])
    assert result.text and result.text == _greedy_plain(backbone, plain, 10)
    assert result.prompt.soft_positions == sum(len(backbone.tokenize(c)) for c in CHUNKS)
    assert "".join(reader.stream(messages)).strip() == result.text


@pytest.mark.parametrize("family", FAMILIES)
def test_icae_compresses_splices_and_round_trips(family, tmp_path):
    # The decoder goes through save_pretrained and Backbone.load, the path a user's own checkpoint takes.
    model_dir = tmp_path / "model"
    saved = tiny_family_backbone(family)
    saved.base_model.save_pretrained(str(model_dir))
    saved.tokenizer.save_pretrained(str(model_dir))
    backbone = Backbone.load(model_dir)
    assert backbone.config.model_type == family
    comp = small_icae(backbone)
    vectors = comp.compress([TEXT[:300]])
    n_tokens = len(backbone.tokenize(TEXT[:300]))
    assert vectors[0].shape == (4 * math.ceil(n_tokens / 16), 64)
    # The projection targets the norm of the embeddings as the decoder sees them (Gemma's are scaled).
    seen = backbone.embed_ids(torch.arange(100)).float().norm(dim=-1).mean()
    assert float(vectors[0].float().norm(dim=-1).mean()) == pytest.approx(float(seen), rel=0.3)

    store = SoftPromptStore.open(tmp_path / "store", comp)
    [pid] = store.add([TEXT[:300]], comp)
    reader = SoftPromptReader(backbone, store, compressor=comp, max_new_tokens=4)
    result = reader.generate([{"role": "user", "content": f"Context: {make_placeholder(pid)}{QUESTION}"}])
    assert result.prompt.soft_positions == vectors[0].shape[0]

    # A fresh decoder with the same weights (as in a new process) loads the compressor: same vectors.
    comp.save_pretrained(tmp_path / "comp")
    loaded = load_compressor(tmp_path / "comp", backbone=tiny_family_backbone(family, identity=backbone.identity))
    assert loaded.fingerprint == comp.fingerprint
    torch.testing.assert_close(loaded.compress([TEXT[:300]])[0].float(), vectors[0].float())


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrain_a_few_steps(family, tmp_path):
    from lloco_index.training.data import make_windows
    from lloco_index.training.pretrain import pretrain, trainable_state

    tokenizer = smollm2_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    windows = make_windows([ids, ids[7:]], segment_length=32, continuation_length=16)
    backbone = tiny_family_backbone(family)
    before = {k: v.clone() for k, v in trainable_state(small_icae(tiny_family_backbone(family))).items()}
    result = pretrain(pretrain_config(tmp_path, steps=3, checkpoint_every=0), backbone=backbone, windows=windows,
                      progress=False)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    after = trainable_state(result.compressor)
    encoder_b = [k for k in after if k.startswith("lora.") and "lora_B" in k]
    reader_b = [k for k in after if k.startswith("reader.") and "lora_B" in k]
    assert encoder_b and reader_b
    # LoRA B starts at zero: after three steps both the encoder and the reader adapters have moved.
    assert any(after[k].abs().sum() > 0 for k in encoder_b) and any(after[k].abs().sum() > 0 for k in reader_b)
    assert any(not torch.equal(after[k], before[k]) for k in after if k in before and k.startswith("head."))


@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_a_few_steps_and_reload(family, tmp_path):
    from lloco_index.finetune import LoRAFinetuner
    from lloco_index.finetune.data import TrainExample

    backbone = tiny_family_backbone(family, initializer_range=0.2)
    comp = small_icae(backbone, pooling="mean")
    store = SoftPromptStore.for_compressor(comp)
    pids = store.add([text for _, text in FACTS], comp)
    answers = ["Ada Quill", "Tomas Reed", "Mira Stone", "the fishing harbour"]
    examples = [TrainExample([{"role": "user", "content": f"Context: {make_placeholder(pid)}\nWho or where?"}], answer, id=f"q{i}")
                for i, (pid, answer) in enumerate(zip(pids, answers))]
    finetuner = LoRAFinetuner(SoftPromptReader(backbone, store, compressor=comp), examples, adapter_name="domain",
                              output_dir=tmp_path / "a", config=fast_config(epochs=3), progress=False)
    finetuner._setup_adapter()
    before = finetuner.evaluate_loss(examples)
    finetuner.train()
    after = finetuner.evaluate_loss(examples)
    assert math.isfinite(after) and after < before, (before, after)

    fresh = tiny_family_backbone(family, initializer_range=0.2)
    fresh_comp = small_icae(fresh, pooling="mean")
    fresh_comp.load_weights(comp.weights())
    fresh.load_adapter(tmp_path / "a", "domain")
    again = LoRAFinetuner(SoftPromptReader(fresh, store, compressor=fresh_comp), examples, adapter_name="domain",
                          output_dir=tmp_path / "a", config=fast_config(epochs=3), progress=False)
    assert again.evaluate_loss(examples) == pytest.approx(after, rel=1e-4)


def test_unsupported_family_is_refused_at_load_with_what_is_missing(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = smollm2_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError) as err:
        Backbone(model, tokenizer, "tiny-gpt2")
    message = str(err.value)
    assert "'gpt2'" in message and "q_proj" in message and "`.model`" in message and "docs/models.md" in message
    model.save_pretrained(str(tmp_path / "gpt2"))
    tokenizer.save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        Backbone.load(tmp_path / "gpt2")
