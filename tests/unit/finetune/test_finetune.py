"""Finetuning LoRA adapters on compressed contexts, on a tiny random LLaMA and the real local embedder.

Every backbone here is ``tiny_backbone()``: identical base weights and the same identity, so one
index (built once per module) serves fresh backbones -- a fresh backbone is what a new process would load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatStartEvent

from lloco_index import defaults
from lloco_index.adapters import read_adapter_metadata
from lloco_index.compressors import TokenEmbeddingCompressor
from lloco_index.compressors.token_embedding import TokenEmbeddingConfig
from lloco_index.errors import AdapterMismatchError
from lloco_index.finetune import FinetuneConfig, FinetuneResumeError, QAExample, load_qa_examples, split_train_val
from lloco_index.finetune.data import TrainExample, load_instruction_examples, mix_instructions
from lloco_index.llamaindex import LLoCOFinetuneEngine, LLoCOLLM, LLoCOQueryEngine, build_index
from lloco_index.llamaindex.finetune import parse_questions
from lloco_index.generation import find_ids

from helpers import FACTS, fast_finetune_config as fast_config

from helpers import FINETUNE_DOCS as DOCS, FINETUNE_QA as QA, FINETUNE_SEGMENT as SEGMENT
from helpers import cli_storage, finetune_backbone as tiny_backbone


def make_llm(identity: str = "tiny-test", segment: int = SEGMENT, store=None) -> LLoCOLLM:
    backbone = tiny_backbone(identity)
    return LLoCOLLM(TokenEmbeddingCompressor(backbone, TokenEmbeddingConfig(segment_length=segment)), store,
                    max_new_tokens=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    """(index, store) over DOCS, built once; soft prompts are the tiny model's token embeddings."""
    from lloco_index.llamaindex import default_embed_model

    llm = make_llm()
    index, store = build_index(DOCS, llm.compressor, embed_model=default_embed_model())
    return index, store


@pytest.fixture
def qa_file(tmp_path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in QA) + "\n")
    return path


def engine_for(corpus, dataset, output_dir, *, llm=None, **kwargs) -> LLoCOFinetuneEngine:
    index, store = corpus
    llm = llm or make_llm(store=store)
    kwargs.setdefault("config", fast_config())
    return LLoCOFinetuneEngine(index, dataset, llm=llm, adapter_name=kwargs.pop("adapter_name", "domain"),
                               output_dir=output_dir, similarity_top_k=2, show_progress=False, **kwargs)


class _Capture(BaseEventHandler):
    messages: list = []

    @classmethod
    def class_name(cls) -> str:
        return "Capture"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, LLMChatStartEvent):
            self.messages.append([(m.role.value, m.content) for m in event.messages])


def test_examples_are_the_query_time_llm_call(corpus, qa_file, tmp_path):
    """The training prompt is exactly what LLoCOLLM.chat receives when the query engine answers."""
    engine = engine_for(corpus, qa_file, tmp_path / "a", use_gold_contexts=False)
    train, val = engine.build_examples()
    example = next(e for e in train + val if e.meta["question"] == QA[0]["question"])

    index, store = corpus
    query_engine = LLoCOQueryEngine.from_index(index, engine.llm, similarity_top_k=2)
    handler = _Capture(messages=[])
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(handler)
    try:
        query_engine.query(QA[0]["question"])
    finally:
        dispatcher.event_handlers.remove(handler)
    assert len(handler.messages) == 1
    assert [(m["role"], m["content"]) for m in example.messages] == handler.messages[0]
    # Two retrieved chunks: the best expanded to its text (the default expand_top_k=1), the other a placeholder.
    assert len(find_ids(example.messages[-1]["content"])) == 1
    assert example.target == "Ada Quill" and example.meta["target_source"] == "gold"


def test_gold_contexts_map_to_the_index_soft_prompts(corpus, tmp_path):
    engine = engine_for(corpus, [dict(QA[0], contexts=[FACTS[0][1]])], tmp_path / "g", config=fast_config())
    [example], _ = engine.build_examples()
    ids = find_ids(example.messages[-1]["content"])
    lighthouse = [n for n in corpus[0].docstore.docs.values() if "Cape Wrath" in n.text]
    assert ids == [n.metadata["lloco_id"] for n in lighthouse]
    # A context that is in no node is compressed into the store under its content id.
    engine = engine_for(corpus, [dict(QA[0], contexts=["A keeper's log nobody indexed."])], tmp_path / "h")
    [example], _ = engine.build_examples()
    [pid] = find_ids(example.messages[-1]["content"])
    assert pid in corpus[1]


def test_finetune_lowers_training_loss_and_round_trips(corpus, qa_file, tmp_path):
    engine = engine_for(corpus, qa_file, tmp_path / "adapter", config=fast_config(epochs=15))
    train, _ = engine.build_examples()
    finetuner = engine.make_finetuner()
    finetuner._setup_adapter()
    before = finetuner.evaluate_loss(train)
    assert before == pytest.approx(finetuner.evaluate_loss(train, adapter=None), abs=1e-4)  # LoRA B starts at 0
    result = engine.finetune()
    after = finetuner.evaluate_loss(train)
    assert result.finished and result.step == result.total_steps == 45
    assert after < 0.6 * before, (before, after)  # measured: 12.26 -> 5.72 nats per answer token
    assert result.positions_per_second > 0 and result.adapter_bytes > 0

    meta = read_adapter_metadata(tmp_path / "adapter")
    assert meta["base_model"] == "tiny-test"
    assert meta["compressor_fingerprint"] == engine.llm.compressor.fingerprint
    assert meta["data_hash"] == result.data_hash and meta["metrics"]["step"] == 45
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    # Round trip: a fresh decoder (as in a new process) loads the adapter and gets the same weights and loss.
    trained = finetuner.adapter_state()
    llm2 = make_llm(store=corpus[1])
    llm2.load_adapter(tmp_path / "adapter", "domain")
    loaded = llm2.compressor.backbone.adapter_state_dict("domain")
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    again = LLoCOFinetuneEngine(corpus[0], qa_file, llm=llm2, adapter_name="domain", output_dir=tmp_path / "adapter",
                                config=fast_config(), similarity_top_k=2, show_progress=False).make_finetuner()
    assert again.evaluate_loss(train) == pytest.approx(after, rel=1e-5)
    # get_finetuned_model: the adapter selected by default, the plain decoder still one call away.
    tuned = engine.get_finetuned_model()
    assert tuned.adapter == "domain" and tuned.compressor is engine.llm.compressor


def test_resume_after_interruption_is_exact(corpus, qa_file, tmp_path):
    config = fast_config(lora_dropout=0.1, val_fraction=0.34, patience=5, eval_every=2, epochs=4)
    full = engine_for(corpus, qa_file, tmp_path / "full", config=config).finetune()

    interrupted = engine_for(corpus, qa_file, tmp_path / "resumed", config=config)
    part = interrupted.finetune(stop_after_steps=3)
    assert not part.finished and part.step == 3
    assert not (tmp_path / "resumed" / "adapter_model.safetensors").exists()
    # Written as versions before the shared checkpoint module did (torch's generator only, named 'cpu'):
    # such a run still resumes exactly.
    checkpoints = tmp_path / "resumed" / "training" / "checkpoints"
    rng_file = checkpoints / (checkpoints / "LATEST").read_text().strip() / "rng.pt"
    torch.save({"cpu": torch.load(str(rng_file), weights_only=True)["torch"]}, str(rng_file))
    # A new process: fresh decoder, fresh engine, same command.
    resumed = engine_for(corpus, qa_file, tmp_path / "resumed", config=config).finetune()
    assert resumed.finished and resumed.step == full.step

    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h.get("val_loss") for h in full.history] == [h.get("val_loss") for h in resumed.history]
    assert full.best_step == resumed.best_step

    # Other settings in the same directory are refused, not silently mixed.
    with pytest.raises(FinetuneResumeError, match=r"other settings: learning_rate=0.02 \(this call: 0.001\)\."):
        engine_for(corpus, qa_file, tmp_path / "resumed", config=fast_config(learning_rate=1e-3, lora_dropout=0.1,
                   val_fraction=0.34, patience=5, eval_every=2, epochs=4)).finetune()


def test_early_stopping_keeps_the_best_adapter(corpus, qa_file, tmp_path):
    # A learning rate this high overshoots quickly: validation loss rises and the run stops early.
    config = fast_config(learning_rate=0.3, val_fraction=0.34, patience=1, eval_every=1, epochs=8)
    result = engine_for(corpus, qa_file, tmp_path / "es", config=config).finetune()
    vals = [h["val_loss"] for h in result.history if "val_loss" in h]
    assert result.stopped_early and result.step < result.total_steps
    assert result.best_val_loss == min(vals)
    assert result.best_step == result.history[[h.get("val_loss") for h in result.history].index(min(vals))]["step"]


def test_adapter_mismatch_is_refused(corpus, qa_file, tmp_path):
    engine = engine_for(corpus, qa_file, tmp_path / "adapter", config=fast_config(epochs=1))
    engine.finetune()
    other_compressor = make_llm(segment=SEGMENT * 2)  # same decoder, other compressor fingerprint
    with pytest.raises(AdapterMismatchError, match="compressor"):
        other_compressor.load_adapter(tmp_path / "adapter", "domain")
    other_model = make_llm(identity="tiny-other")
    with pytest.raises(AdapterMismatchError, match="base model 'tiny-test'"):
        other_model.load_adapter(tmp_path / "adapter", "domain")


def test_several_adapters_chosen_per_query(corpus, tmp_path):
    """Two domain adapters on one decoder; each query picks one (LLoCO's per-domain LoRA groups)."""
    index, store = corpus
    llm = make_llm(store=store)
    questions = [q["question"] for q in QA]
    config = fast_config(epochs=10)
    for name, answer in (("alpha", "Alpha"), ("beta", "Beta")):
        data = [{"question": q, "answer": answer} for q in questions]
        engine = engine_for(corpus, data, tmp_path / name, llm=llm, adapter_name=name, config=config)
        engine.finetune()
    llm.load_adapter(tmp_path / "alpha", "alpha")
    llm.load_adapter(tmp_path / "beta", "beta")
    assert {"alpha", "beta"} <= set(llm.compressor.backbone.adapter_names)
    query_engine = LLoCOQueryEngine.from_index(index, llm, similarity_top_k=2)
    messages = engine.query_messages(questions[0], [n.node.get_content(metadata_mode="llm")
                                                    for n in query_engine.retrieve(questions[0])])
    prompt = messages[-1]["content"]
    assert llm.complete(prompt, adapter="alpha").text.startswith("Alpha")
    assert llm.complete(prompt, adapter="beta").text.startswith("Beta")
    plain = llm.complete(prompt, adapter=None).text
    assert not plain.startswith(("Alpha", "Beta"))
    # A whole query engine on one adapter, the other still selectable per call.
    beta_llm = LLoCOLLM(llm.compressor, store, adapter="beta", max_new_tokens=8)
    assert str(LLoCOQueryEngine.from_index(index, beta_llm, similarity_top_k=2).query(questions[1])).startswith("Beta")


def test_distillation_targets_for_questions_without_answers(corpus, tmp_path):
    data = [{"question": QA[0]["question"], "contexts": [FACTS[0][1]]}]
    engine = engine_for(corpus, data, tmp_path / "d")
    [example], _ = engine.build_examples()
    assert example.meta["target_source"] == "distilled"
    # The teacher is the plain decoder reading the same prompt with the chunks' text in place of placeholders.
    lighthouse = [n for n in corpus[0].docstore.docs.values() if "Cape Wrath" in n.text]
    text_messages = engine.query_messages(QA[0]["question"], [n.text for n in lighthouse])
    expected = engine.llm.reader.generate(text_messages, adapter=None, max_new_tokens=16).text
    assert example.target == expected.strip() and not find_ids(text_messages[-1]["content"])


def test_instruction_mixing_and_loaders(corpus, tmp_path):
    rag = tmp_path / "rag_dataset.json"  # LabelledRagDataset.save_json layout
    rag.write_text(json.dumps({"examples": [{"query": "Who?", "reference_answer": "Ada", "reference_contexts": ["c"],
                                             "query_by": None, "reference_answer_by": None}]}))
    [ex] = load_qa_examples(rag)
    assert (ex.question, ex.answer, ex.contexts) == ("Who?", "Ada", ["c"])
    [squad] = load_qa_examples([{"query": "When?", "answers": [{"text": "1901"}, {"text": "in 1901"}]}])
    assert squad.answer == "1901" and squad.references == ["1901", "in 1901"]
    instr = load_instruction_examples([{"instruction": "Add", "input": "2+2", "output": "4"},
                                       {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])
    assert instr[0].messages == [{"role": "user", "content": "Add\n\n2+2"}] and instr[1].target == "Hello"

    engine = engine_for(corpus, QA, tmp_path / "mix", instruction_data=[{"prompt": f"Say {i}", "response": str(i)}
                                                                         for i in range(10)],
                        config=fast_config(instruction_ratio=0.5, epochs=1))
    train, val = engine.build_examples()
    assert sum(e.kind == "instruction" for e in train) == 3 and not val
    assert engine.finetune().finished


def test_split_is_by_document_and_stable():
    examples = [TrainExample([{"role": "user", "content": str(i)}], "a", id=f"e{i}", meta={"group": f"doc{i % 6}"})
                for i in range(30)]
    train, val = split_train_val(examples, 0.2, seed=1)
    assert {e.meta["group"] for e in train}.isdisjoint({e.meta["group"] for e in val}) and val
    again, val2 = split_train_val(list(reversed(examples)), 0.2, seed=1)
    assert {e.id for e in val} == {e.id for e in val2}
    assert mix_instructions(train, [], 0.5) == train
    with pytest.raises(ValueError, match="empty question"):
        QAExample(question="  ")


def test_parse_questions():
    reply = "Here are questions:\n1. Who kept the light?\n2) Where is the reef?\n- Who kept the light?\n\nQ3: Why?"
    assert parse_questions(reply, 5) == ["Who kept the light?", "Where is the reef?"]


def test_question_generation_with_any_llamaindex_llm(corpus, tmp_path):
    """No dataset: questions and answers are written from the index's nodes by an LLM (here the tiny decoder)."""
    index, store = corpus
    llm = make_llm(store=store)
    writer = LLoCOLLM(llm.compressor, store, max_new_tokens=24)
    engine = engine_for(corpus, None, tmp_path / "gen", llm=llm, question_llm=writer, num_questions_per_chunk=1,
                        max_question_nodes=3)
    qa = engine.load_qa()
    assert qa and all(q.contexts and q.answer for q in qa)
    train, _ = engine.build_examples()
    by_text = {n.text: n.metadata["lloco_id"] for n in index.docstore.docs.values()}
    for example, q in zip(train, qa):
        assert find_ids(example.messages[-1]["content"]) == [by_text[q.contexts[0]]]
    assert (tmp_path / "gen" / "training" / "generated_questions.jsonl").is_file()


def test_cli_finetune(tmp_path, qa_file):
    """`lloco-index finetune PERSIST_DIR DATA` on an index of a decoder saved to disk."""
    from lloco_index.cli import main

    storage, fingerprint = cli_storage(tmp_path)
    out = tmp_path / "adapters" / "cli"
    argv = ["finetune", str(storage), str(qa_file), "--output-dir", str(out), "--adapter-name", "cli",
            "--epochs", "1", "--grad-accum", "2", "--lr", "1e-2", "--val-fraction", "0", "--no-progress", "--top-k", "2"]
    assert main(argv + ["--stop-after-steps", "1"]) == 0
    assert not (out / "adapter_config.json").exists()
    assert main(argv) == 0
    meta = read_adapter_metadata(out)
    assert meta["compressor_fingerprint"] == fingerprint and meta["metrics"]["finished"]


def test_starts_from_the_compressors_reader_adapter(tmp_path):
    """With a compressor that ships a reader adapter, the new adapter starts as a copy of it (same LoRA shape)."""
    from peft import LoraConfig

    from lloco_index.compressors import ICAECompressor, ICAEConfig
    from lloco_index.finetune import LoRAFinetuner
    from lloco_index.generation import SoftPromptReader
    from lloco_index.generation import make_placeholder
    from lloco_index.store import SoftPromptStore

    backbone = tiny_backbone()
    compressor = ICAECompressor(backbone, ICAEConfig(n_slots=4, segment_length=SEGMENT, pooling="mean", lora_r=4, lora_alpha=8))
    backbone.add_adapter("lloco_reader", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a "trained" reader: non-zero B matrices
        for name, p in backbone.peft_model.named_parameters():
            if ".lloco_reader." in name:
                p.normal_(0, 0.05)
    assert compressor.reader_adapter == "lloco_reader"
    store = SoftPromptStore.for_compressor(compressor)
    [pid] = store.add([FACTS[0][1]], compressor)
    example = TrainExample([{"role": "user", "content": f"Context: {make_placeholder(pid)}\nWho kept the lighthouse?"}],
                           "Ada Quill", id="q0")
    finetuner = LoRAFinetuner(SoftPromptReader(backbone, store, compressor=compressor), [example],
                              adapter_name="domain", output_dir=tmp_path / "a", config=fast_config(epochs=1), progress=False)
    finetuner._setup_adapter()
    reader = {k: v.clone() for k, v in backbone.adapter_state_dict("lloco_reader").items()}
    copied = finetuner.adapter_state()
    assert copied.keys() == reader.keys() and all(torch.equal(copied[k], reader[k]) for k in reader)
    assert finetuner.evaluate_loss([example]) == pytest.approx(finetuner.evaluate_loss([example], adapter="lloco_reader"))
    finetuner.train()
    meta = read_adapter_metadata(tmp_path / "a")
    assert meta["init_from"] == "reader:lloco_reader" and meta["compressor_fingerprint"] == compressor.fingerprint
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4
    # The reader adapter itself is untouched by training.
    assert all(torch.equal(reader[k], backbone.adapter_state_dict("lloco_reader")[k]) for k in reader)


def test_expansion_mix_trains_on_text_soft_and_mixed_contexts(corpus, tmp_path):
    engine = engine_for(corpus, QA, tmp_path / "mix", use_gold_contexts=False, expansion_mix=(0, 1, 2))
    train, val = engine.build_examples()
    placeholders = {len(find_ids(e.messages[-1]["content"])) for e in train + val}
    assert placeholders == {0, 1, 2}  # all text, one of each, all soft prompts (2 retrieved chunks)
    again = engine_for(corpus, QA, tmp_path / "mix", use_gold_contexts=False, expansion_mix=(0, 1, 2))
    assert [e.messages for e in again.build_examples()[0]] == [e.messages for e in train]  # a stable pick per question
    with pytest.raises(ValueError, match="expansion_mix must list expand_top_k values >= 0"):
        engine_for(corpus, QA, tmp_path / "bad", expansion_mix=(-1,))


def test_cli_finetune_resumes_from_python(tmp_path, qa_file):
    """A finetune started with `lloco-index finetune` resumes from Python given the same settings: the CLI's
    defaults are the Python defaults, and the run directory remembers the settings it was started with."""
    from lloco_index.cli import main

    storage, _ = cli_storage(tmp_path)
    out = storage / "adapters" / "lloco_domain"
    assert main(["finetune", str(storage), str(qa_file), "--epochs", "1", "--grad-accum", "2", "--val-fraction", "0",
                 "--no-progress", "--stop-after-steps", "1"]) == 0
    assert not (out / "adapter_config.json").exists()
    # Other settings: the error names them instead of two hashes.
    other = LLoCOFinetuneEngine.from_persist_dir(
        storage, qa_file, output_dir=out, config=FinetuneConfig(epochs=2, grad_accum_steps=2, val_fraction=0.0),
        show_progress=False)
    with pytest.raises(FinetuneResumeError, match=r"epochs=1 \(this call: 2\)"):
        other.finetune()
    # The same settings, written the Python way.
    engine = LLoCOFinetuneEngine.from_persist_dir(
        storage, qa_file, output_dir=out, config=FinetuneConfig(epochs=1, grad_accum_steps=2, val_fraction=0.0),
        show_progress=False)
    result = engine.finetune()
    assert result.finished and result.step == result.total_steps > 1
    # Or no settings at all: the engine takes the ones recorded by the run it resumes.
    out2 = storage / "adapters" / "second"
    assert main(["finetune", str(storage), str(qa_file), "--adapter-name", "second", "--epochs", "1", "--grad-accum",
                 "2", "--lr", "1e-2", "--val-fraction", "0", "--top-k", "2", "--no-progress", "--stop-after-steps", "1"]) == 0
    resumed = LLoCOFinetuneEngine.resume(out2, show_progress=False)
    assert resumed.config.learning_rate == 1e-2 and resumed.similarity_top_k == 2 and resumed.adapter_name == "second"
    assert resumed.policy == defaults.DEFAULT_EXPANSION_POLICY  # recorded in run.json with the rest
    result = resumed.finetune()
    assert result.finished and result.step == result.total_steps
    # A run.json written before the policy was recorded there: its runs chose their text chunks by score.
    settings_path = out2 / "training" / "run.json"
    settings = json.loads(settings_path.read_text())
    del settings["policy"]
    settings_path.write_text(json.dumps(settings))
    assert LLoCOFinetuneEngine.resume(out2, show_progress=False).policy == "score"
