"""Data and helpers that several test modules share (import them from here, not from another test module)."""

from __future__ import annotations

from pathlib import Path

import torch
import tiny_models
from llama_index.core import Document

from lloco_index.finetune import FinetuneConfig
from lloco_index.precision import generation_autocast
from lloco_index.training.pretrain import PretrainConfig

# Real prose (the opening of the SQuAD "Normans" article's style of text, written for this test).
PROSE = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under "
    "their leader Rollo, agreed to swear fealty to King Charles III of West Francia. Through generations of "
    "assimilation and mixing with the native Frankish and Roman-Gaulish populations, their descendants would "
    "gradually merge with the Carolingian-based cultures of West Francia. The distinct cultural and ethnic "
    "identity of the Normans emerged initially in the first half of the 10th century, and it continued to "
    "evolve over the succeeding centuries. The Norman dynasty had a major political, cultural and military "
    "impact on medieval Europe and even the Near East. The Normans were famed for their martial spirit and "
    "eventually for their Christian piety, becoming exponents of the Catholic orthodoxy into which they "
    "assimilated. They adopted the Gallo-Romance language of the Frankish land they settled, their dialect "
    "becoming known as Norman, an important literary language. The Duchy of Normandy, which they formed by "
    "treaty with the French crown, was a great fief of medieval France."
)


def pretrain_config(tmp_path, **kw) -> PretrainConfig:
    base = dict(run_dir=str(tmp_path), segment_length=32, n_slots=8, pool_layer=1, lora_r=4, lora_alpha=8,
                reader_r=4, reader_alpha=8, continuation_length=16, batch_size=2, learning_rate=3e-3, head_lr=1e-2,
                warmup_steps=1, steps=6, checkpoint_every=3, eval_every=0, seed=0,
                objectives={"lm": 1.0, "kl": 1.0, "ae": 1.0})
    base.update(kw)
    return PretrainConfig(**base)


FACTS = [
    ("lighthouse", "The lighthouse at Cape Wrath was kept by Ada Quill for forty years. Ships feared the reef below it."),
    ("bees", "Honey bees of the valley gather nectar from heather. The beekeeper is called Tomas Reed."),
    ("bicycle", "The first bicycle in the village belonged to Mira Stone. It had wooden wheels and no brakes."),
    ("volcano", "Mount Karo erupted in the year of the long winter. Its lava reached the fishing harbour."),
]


def fast_finetune_config(**overrides) -> FinetuneConfig:
    """Settings that make a 2-layer random model learn in a second: high lr, small batches."""
    base = dict(lora_r=8, lora_alpha=16, learning_rate=2e-2, epochs=6, micro_batch_size=1, grad_accum_steps=2,
                val_fraction=0.0, patience=0, checkpoint_every=2, max_target_tokens=16, warmup_ratio=0.0)
    base.update(overrides)
    return FinetuneConfig(**base)


def greedy_plain(backbone, text, max_new_tokens):
    ids = backbone.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode(), generation_autocast():
        out = backbone.base_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                           do_sample=False, pad_token_id=backbone.tokenizer.pad_token_id)
    return backbone.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


# Three one-topic documents for the vector-store tests.
TOPICS = ["lighthouses guide ships with lamps", "bees make honey from nectar", "bicycles have two wheels and pedals"]
DOCS = [Document(text=" ".join(f"Fact {i}: {t}." for i in range(12)), metadata={"title": t}) for t in TOPICS]


# Finetuning tests (unit/finetune, unit/cli): four topics, six questions, a tiny model whose adapters can learn.
FINETUNE_SEGMENT = 24
FINETUNE_DOCS = [Document(text=f"{text} " + " ".join(f"Line {i} of the {t} notes is filler." for i in range(6)),
                 metadata={"topic": t}) for t, text in FACTS]
FINETUNE_QA = [
    {"question": "Who kept the lighthouse at Cape Wrath?", "answer": "Ada Quill", "group": "lighthouse"},
    {"question": "What do the valley bees gather?", "answer": "nectar from heather", "group": "bees"},
    {"question": "Who owned the first bicycle?", "answer": "Mira Stone", "group": "bicycle"},
    {"question": "Where did the lava of Mount Karo reach?", "answer": "the fishing harbour", "group": "volcano"},
    {"question": "Who is the beekeeper?", "answer": "Tomas Reed", "group": "bees"},
    {"question": "What were the bicycle's wheels made of?", "answer": "wood", "group": "bicycle"},
]


def finetune_backbone(identity: str = "tiny-test"):
    """A tiny random LLaMA (hidden 64, 2 layers, 4 heads) on SmolLM2's tokenizer.

    initializer_range 0.2 instead of 0.02: with tied 0.02-scale embeddings a 64-wide model's logits cannot
    exceed ~1.3, so no adapter could lower its loss much below log(vocab).
    """
    return tiny_models.tiny_backbone(identity=identity, initializer_range=0.2)


def cli_storage(tmp_path) -> tuple[Path, str]:
    """A persisted index of a tiny decoder saved to disk (what `lloco-index compress` leaves behind): its
    directory, and the fingerprint of the compressor it was built with."""
    from lloco_index.backbone import Backbone
    from lloco_index.compressors import TokenEmbeddingCompressor, TokenEmbeddingConfig
    from lloco_index.llamaindex import build_index
    from lloco_index.llamaindex import default_embed_model

    model_dir = tmp_path / "tiny-model"
    source = finetune_backbone()
    source.base_model.save_pretrained(str(model_dir))
    source.tokenizer.save_pretrained(str(model_dir))
    backbone = Backbone.load(model_dir)
    compressor = TokenEmbeddingCompressor(backbone, TokenEmbeddingConfig(segment_length=FINETUNE_SEGMENT,
                                                                         base_model=backbone.identity))
    # base_model given explicitly: a compressor made in code hashes the config's default base_model into its
    # fingerprint, and save_pretrained rewrites it, so the reloaded compressor would not match its own store.
    build_index(FINETUNE_DOCS, compressor, persist_dir=tmp_path / "storage", embed_model=default_embed_model())
    return tmp_path / "storage", compressor.fingerprint


class CountingCompressor:
    """Wraps a real compressor, records the texts it is asked to compress and can stop it on its Nth call
    (``fail_on_call``, raising ``exc``): what the store's "never recompute" and interruption tests count."""

    def __init__(self, inner, fail_on_call=None, exc=KeyboardInterrupt, on_call=None):
        self.inner, self.calls, self.n = inner, [], 0
        self.fail_on_call, self.exc, self.on_call = fail_on_call, exc, on_call

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def compress(self, texts, **kwargs):
        self.n += 1
        if self.on_call:
            self.on_call(self.n)
        if self.n == self.fail_on_call:
            raise self.exc("stopped")
        self.calls.extend(texts)
        return self.inner.compress(texts, **kwargs)
