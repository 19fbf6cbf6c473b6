"""Data and helpers that several test modules share (import them from here, not from another test module)."""

from __future__ import annotations

import torch
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
