"""LLoCOFinetuneEngine: turn an index and a set of questions into a LoRA adapter that reads its soft prompts.

In the shape of the llama-index-finetuning engines (``finetune()``, ``get_finetuned_model()``):

>>> index, store, compressor = load_index("./storage")
>>> llm = LLoCOLLM(compressor, store)
>>> engine = LLoCOFinetuneEngine(index, "questions.jsonl", llm=llm, adapter_name="legal",
...                              output_dir="./adapters/legal")
>>> engine.finetune()                                  # resumable: run it again after an interruption
>>> legal_llm = engine.get_finetuned_model()           # LLoCOLLM with "legal" loaded and selected
>>> LLoCOQueryEngine.from_index(index, legal_llm).query("...")

Datasets: a LlamaIndex ``LabelledRagDataset`` (or its saved JSON), a jsonl of question/answer(/contexts)
records, a list of such records, or ``None`` with ``question_llm=`` (any LlamaIndex LLM) to write
questions from the index's own nodes. Questions without answers get the answer of the same decoder
reading the full text of the same contexts (distillation).

Every example is built the way a query is answered: the same retriever (:class:`LLoCORetriever` over the
index, same ``similarity_top_k`` and position budget) or the gold contexts when the data has them, the
compact synthesizer's own packing and ``text_qa_template``, the LLM's own message extension, and the LLM's
reader (chat template, system prompt, soft prompts from the store). ``llama-index-core`` 0.14 no longer
ships ``llama_index.core.llama_dataset``; datasets of that shape are still read (duck-typed or from JSON),
and questions are generated here with the same approach as its ``RagDatasetGenerator`` (one LLM call per
node: questions from the node's text, then reference answers from the same text).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.prompts import PromptTemplate
from llama_index.core.prompts.prompt_utils import get_biggest_prompt
from llama_index.core.schema import BaseNode, MetadataMode, QueryBundle, TextNode

from .. import defaults
from ..fileio import atomic_write_bytes
from ..finetune.config import FinetuneConfig
from ..finetune.data import (
    TrainExample,
    load_examples,
    load_instruction_examples,
    mix_instructions,
    save_examples,
    split_train_val,
)
from ..finetune.examples import Context, build_train_examples, self_teacher
from ..finetune.trainer import TRAINING_SUBDIR, FinetuneResult, FinetuneResumeError, LoRAFinetuner
from ..generation import make_placeholder
from ..training.data import QAExample, load_qa_examples, write_qa_jsonl
from .llm import LLoCOLLM
from .node_keys import CHUNK_KEY, DOC_KEY, SOFT_PROMPT_KEY, is_compressed
from .query_engine import LLoCOQueryEngine
from .retriever import LLoCORetriever

logger = logging.getLogger(__name__)

QUESTION_GEN_TEMPLATE = PromptTemplate(
    "Context information is below.\n---------------------\n{context_str}\n---------------------\n"
    "Given the context information and not prior knowledge, write {num_questions} questions that this "
    "context answers, as a teacher would for a quiz. Make them diverse and answerable from the context "
    "alone. Write one question per line, without numbering or anything else."
)
ANSWER_GEN_TEMPLATE = PromptTemplate(
    "Context information is below.\n---------------------\n{context_str}\n---------------------\n"
    "Given the context information and not prior knowledge, answer the query in a short phrase.\n"
    "Query: {query_str}\nAnswer: "
)
RUN_SETTINGS_NAME = "run.json"
# Engine arguments recorded in run.json and given back by LLoCOFinetuneEngine.resume.
_RUN_SETTINGS = ("adapter_name", "similarity_top_k", "position_budget", "use_gold_contexts", "instruction_data",
                 "num_questions_per_chunk", "max_question_nodes", "expansion_mix", "policy", "teacher")
# The expansion policy of runs whose run.json predates its being recorded there.
_POLICY_BEFORE_RECORDED = "score"
_NUMBERING = re.compile(r"^\s*(?:[-*\u2022]|\(?\d+[.):]|Q\d*[.:]|Question\s*\d*[.:])\s*", re.IGNORECASE)


def parse_questions(text: str, limit: int) -> list[str]:
    """Questions from an LLM's reply: one per line, numbering and bullets removed, duplicates dropped."""
    seen, out = set(), []
    for line in text.splitlines():
        q = _NUMBERING.sub("", line).strip().strip('"').strip()
        if len(q) < 8 or q.lower() in seen or q.endswith(":"):
            continue
        seen.add(q.lower())
        out.append(q)
    return out[:limit]


def generate_questions(
    nodes: Sequence[BaseNode],
    llm: Any,
    *,
    num_questions_per_chunk: int = 2,
    answers: bool = True,
    progress: bool = False,
) -> list[QAExample]:
    """Write questions (and, with ``answers=True``, reference answers) from nodes' text with any LlamaIndex LLM.

    The node's plain text is shown (never its placeholder); each question keeps that text as its gold
    context, so training reads exactly that chunk's soft prompt.
    """
    from tqdm.auto import tqdm

    out: list[QAExample] = []
    for node in tqdm(nodes, desc="writing questions", unit="node", disable=not progress):
        text = node.get_content(metadata_mode=MetadataMode.NONE)
        if not text.strip():
            continue
        reply = llm.predict(QUESTION_GEN_TEMPLATE, context_str=text, num_questions=num_questions_per_chunk)
        for q in parse_questions(reply, num_questions_per_chunk):
            answer = llm.predict(ANSWER_GEN_TEMPLATE, context_str=text, query_str=q).strip() if answers else None
            out.append(QAExample(question=q, answer=answer or None, contexts=[text],
                                 group=str(node.metadata.get(DOC_KEY) or node.ref_doc_id or ""),
                                 id=hashlib.sha256(f"{node.node_id}\x00{q}".encode()).hexdigest()[:16]))
    return out


class LLoCOFinetuneEngine:
    """Finetune a LoRA adapter that teaches the decoder to read this index's soft prompts.

    Args:
        index_or_retriever: a VectorStoreIndex of compressed nodes (retrieval as
            :meth:`LLoCOQueryEngine.from_index` does it), or any retriever (wrapped in an
            :class:`LLoCORetriever` with the LLM's store unless it is one).
        dataset: ``LabelledRagDataset`` / its JSON path / a jsonl path / records / ``None`` (generate).
        llm: the :class:`LLoCOLLM` that will answer queries (its compressor, store and reader are used).
        adapter_name: name to load the adapter under and select per query.
        output_dir: the adapter directory; built examples and checkpoints go to ``output_dir/training``.
        config: :class:`FinetuneConfig`; keyword overrides (``learning_rate=...``) are applied on top.
        similarity_top_k, position_budget: the query engine's retrieval settings (keep them equal to the
            ones you query with).
        use_gold_contexts: read the data's gold contexts (mapped to the index's soft prompts) instead of
            retrieving, for examples that have them.
        instruction_data: general instruction data (path or records) mixed in at ``config.instruction_ratio``.
        question_llm: any LlamaIndex LLM that writes questions when ``dataset`` is None.
        num_questions_per_chunk, max_question_nodes: question generation size.
        teacher: ``"self"`` (default: the decoder reading the full text) or a LlamaIndex LLM that answers
            questions that have no answer, from the same contexts in plain text.
        expansion_mix: ``expand_top_k`` values cycled over the retrieved examples (e.g. ``(0, 1, 2, 4)``), so the
            adapter learns to read every mix of text and soft prompts the selection policy can produce; default:
            the retriever's own setting for every example (what queries see).
        policy: the expansion policy that picks those text chunks (:mod:`lloco_index.selection`); train with the
            one queries will use. Ignored when a ready ``LLoCORetriever`` is passed (it has its own).
    """

    def __init__(
        self,
        index_or_retriever: Any,
        dataset: Any = None,
        *,
        llm: LLoCOLLM,
        adapter_name: str = "lloco_domain",
        output_dir: Union[str, Path] = "lloco_adapter",
        config: Optional[FinetuneConfig] = None,
        response_mode: str = "compact",
        similarity_top_k: int = defaults.DEFAULT_TOP_K,
        position_budget: Optional[int] = None,
        use_gold_contexts: bool = True,
        instruction_data: Any = None,
        question_llm: Any = None,
        num_questions_per_chunk: int = 2,
        max_question_nodes: Optional[int] = None,
        teacher: Any = "self",
        expansion_mix: Optional[Sequence[int]] = None,
        policy: str = defaults.DEFAULT_EXPANSION_POLICY,
        show_progress: bool = True,
        persist_dir: Optional[Union[str, Path]] = None,
        **config_overrides: Any,
    ):
        if response_mode != "compact":
            raise ValueError("Training examples reproduce the 'compact' response mode (LLoCOQueryEngine's default); "
                             f"got {response_mode!r}.")
        if llm.store is None:
            raise ValueError("The LLoCOLLM needs the index's SoftPromptStore (LLoCOLLM(compressor, store)).")
        if dataset is None and question_llm is None:
            raise ValueError("Pass a dataset, or question_llm=<any LlamaIndex LLM> to write questions from the index.")
        base = config or FinetuneConfig()
        self.config = FinetuneConfig.from_dict({**base.to_dict(), **config_overrides}) if config_overrides else base
        self.llm = llm
        self.adapter_name = adapter_name
        self.output_dir = Path(output_dir)
        self.dataset = dataset
        self.use_gold_contexts = use_gold_contexts
        self.instruction_data = instruction_data
        self.question_llm = question_llm
        self.num_questions_per_chunk = num_questions_per_chunk
        self.max_question_nodes = max_question_nodes
        self.teacher = teacher
        self.expansion_mix = list(expansion_mix) if expansion_mix is not None else None
        self.policy = policy
        if self.expansion_mix is not None and (not self.expansion_mix or min(self.expansion_mix) < 0):
            raise ValueError(f"expansion_mix must list expand_top_k values >= 0, got {expansion_mix!r}.")
        self.show_progress = show_progress
        self.persist_dir = Path(persist_dir) if persist_dir is not None else None  # recorded so resume() can reopen it
        self.similarity_top_k = similarity_top_k
        self.position_budget = position_budget

        self.index = None if isinstance(index_or_retriever, BaseRetriever) else index_or_retriever
        if self.index is not None:
            engine = LLoCOQueryEngine.from_index(self.index, llm, response_mode=response_mode,
                                                 similarity_top_k=similarity_top_k, position_budget=position_budget,
                                                 policy=policy)
        else:
            retriever = index_or_retriever
            if not isinstance(retriever, LLoCORetriever):
                budget = position_budget if position_budget is not None else min(
                    defaults.DEFAULT_POSITION_BUDGET, llm.metadata.context_window // 2)  # 0 is refused, not the default
                retriever = LLoCORetriever(retriever, llm.store, position_budget=budget, text_positions=llm.count_positions,
                                           policy=policy)
            # The synthesizer LLoCOQueryEngine.from_index builds, over this retriever.
            from llama_index.core import get_response_synthesizer

            from .query_engine import LLoCOPromptHelper

            synth = get_response_synthesizer(llm=llm, prompt_helper=LLoCOPromptHelper.from_llm(llm),
                                             response_mode=response_mode)
            engine = LLoCOQueryEngine(retriever=retriever, response_synthesizer=synth)
        self.query_engine: LLoCOQueryEngine = engine
        self._nodes_by_text: Optional[dict[str, TextNode]] = None
        self._multi_pack = 0
        self.result: Optional[FinetuneResult] = None
        self.train_examples: list[TrainExample] = []
        self.val_examples: list[TrainExample] = []

    @classmethod
    def from_persist_dir(cls, persist_dir: Union[str, Path], dataset: Any = None, *, llm_kwargs: Optional[dict] = None,
                         **kwargs: Any) -> "LLoCOFinetuneEngine":
        """Open an index persisted with :func:`build_index` and finetune on it."""
        from .index import load_index

        index, store, compressor = load_index(persist_dir)
        return cls(index, dataset, llm=LLoCOLLM(compressor, store, **(llm_kwargs or {})), persist_dir=persist_dir,
                   **kwargs)

    @classmethod
    def resume(cls, output_dir: Union[str, Path], dataset: Any = None, **overrides: Any) -> "LLoCOFinetuneEngine":
        """The engine of the run in ``output_dir`` with the settings it was started with, however it was started
        (``lloco-index finetune`` or Python): the index's persist dir, the data file, the adapter name, the
        :class:`FinetuneConfig` and the retrieval settings are read from ``output_dir/training/run.json``.

        >>> engine = LLoCOFinetuneEngine.resume("./storage/adapters/lloco_domain")
        >>> engine.finetune()                                   # goes on from the last checkpoint

        ``dataset`` is needed only when the run was started with records given in Python; keyword
        ``overrides`` replace recorded settings (``show_progress=False``, ``teacher=...``).
        """
        output_dir = Path(output_dir)
        path = output_dir / TRAINING_SUBDIR / RUN_SETTINGS_NAME
        if not path.is_file():
            raise FinetuneResumeError(
                f"No finetuning run to resume in '{output_dir}' (no {TRAINING_SUBDIR}/{RUN_SETTINGS_NAME}): pass the "
                f"output_dir of a run started by `lloco-index finetune` or LLoCOFinetuneEngine.finetune().")
        settings = json.loads(path.read_text(encoding="utf-8"))
        if settings.get("persist_dir") is None:
            raise FinetuneResumeError(
                f"The run in '{output_dir}' was started on an index held in memory, not a persist dir: build the "
                f"engine as it was built, LLoCOFinetuneEngine(index, dataset, llm=..., output_dir='{output_dir}', "
                f"config=...), with the settings in {path}.")
        generated = output_dir / TRAINING_SUBDIR / "generated_questions.jsonl"
        data = dataset if dataset is not None else settings.get("dataset")
        if data is None and generated.is_file():  # questions written by an LLM: resume on the same questions
            data = generated
        if data is None:
            raise FinetuneResumeError(
                f"The run in '{output_dir}' was started with records given in Python, which it does not keep: pass "
                f"them again, LLoCOFinetuneEngine.resume('{output_dir}', dataset=records).")
        kwargs: dict[str, Any] = {k: settings[k] for k in _RUN_SETTINGS if k in settings}
        kwargs.setdefault("policy", _POLICY_BEFORE_RECORDED)
        kwargs["config"] = FinetuneConfig.from_dict(settings["config"])
        if settings.get("teacher") not in (None, "self"):
            kwargs.pop("teacher", None)  # another LLM answered: it cannot be reopened from a name
        kwargs.update(overrides)
        llm_kwargs = {k: v for k, v in (settings.get("llm") or {}).items() if v is not None}
        return cls.from_persist_dir(settings["persist_dir"], data, llm_kwargs=llm_kwargs, output_dir=output_dir,
                                    **kwargs)

    def _record_run_settings(self, overwrite: bool) -> None:
        """What :meth:`resume` needs to rebuild this engine, written when the run starts (kept on resume)."""
        path = self.output_dir / TRAINING_SUBDIR / RUN_SETTINGS_NAME
        if path.is_file() and not overwrite:
            return

        def as_path(value: Any) -> Optional[str]:
            return str(Path(value).resolve()) if isinstance(value, (str, Path)) else None

        settings = {
            "persist_dir": as_path(self.persist_dir), "dataset": as_path(self.dataset),
            "adapter_name": self.adapter_name, "config": self.config.to_dict(),
            "similarity_top_k": self.similarity_top_k, "position_budget": self.position_budget,
            "use_gold_contexts": self.use_gold_contexts, "instruction_data": as_path(self.instruction_data),
            "num_questions_per_chunk": self.num_questions_per_chunk, "max_question_nodes": self.max_question_nodes,
            "expansion_mix": self.expansion_mix, "policy": self.policy,
            "teacher": self.teacher if self.teacher in (None, "self") else type(self.teacher).__name__,
            "llm": {"system_prompt": self.llm.system_prompt, "max_new_tokens": self.llm.max_new_tokens},
        }
        atomic_write_bytes(path, json.dumps(settings, indent=1).encode())

    # ------------------------------------------------------- query path
    @property
    def retriever(self) -> BaseRetriever:
        return self.query_engine.retriever

    def query_messages(self, question: str, chunks: Sequence[str]) -> list[dict]:
        """The chat messages the compact synthesizer sends LLoCOLLM for ``question`` over ``chunks``."""
        messages, packs = synthesizer_messages(self.query_engine._response_synthesizer, self.llm, question, chunks)
        if packs > 1:
            self._multi_pack += 1  # refine calls follow at query time; the example is the first call
        return messages

    def retrieve_contexts(self, question: str, expand_top_k: Optional[int] = None) -> list[Context]:
        """The contexts a query for ``question`` reads (with ``expand_top_k`` instead of the retriever's own)."""
        if expand_top_k is None or not isinstance(self.retriever, LLoCORetriever):
            nodes = self.retriever.retrieve(QueryBundle(question))
        else:
            nodes = self.retriever.select(self.retriever.retriever.retrieve(QueryBundle(question)), question,
                                          expand_top_k=expand_top_k)
        return [Context(n.node.get_content(metadata_mode=MetadataMode.LLM), _node_text(n.node), n.node.node_id)
                for n in nodes]

    def _index_nodes(self) -> dict[str, TextNode]:
        if self._nodes_by_text is None:
            docs = self.index.docstore.docs.values() if self.index is not None else []
            self._nodes_by_text = {n.text: n for n in docs if isinstance(n, TextNode) and is_compressed(n)}
        return self._nodes_by_text

    def gold_contexts(self, texts: Sequence[str]) -> list[Context]:
        """Map gold context texts onto soft prompts: the index's node with that text, the nodes that overlap
        it (a paragraph cut across chunks), or else the text compressed into the store (same content id a
        node of that text would get)."""
        nodes = self._index_nodes()
        picked: dict[str, TextNode] = {}
        extra: list[Context] = []
        for text in texts:
            text = text.strip()
            if not text:
                continue
            exact = nodes.get(text)
            matches = [exact] if exact is not None else [n for t, n in nodes.items() if _overlaps(t, text)]
            if matches:
                for n in matches:
                    picked.setdefault(n.node_id, n)
                continue
            [prompt_id] = self.llm.store.add([text], self.llm.compressor)
            extra.append(Context(make_placeholder(prompt_id), text, prompt_id))
        ordered = sorted(picked.values(), key=lambda n: (str(n.metadata.get(DOC_KEY)), n.metadata.get(CHUNK_KEY, 0)))
        return [Context(n.metadata[SOFT_PROMPT_KEY], n.text, n.node_id) for n in ordered] + extra

    def _contexts_for(self, example: QAExample) -> list[Context]:
        if self.use_gold_contexts and example.contexts:
            return self.gold_contexts(example.contexts)
        if self.expansion_mix:
            # A stable pick per question, so rebuilding the examples gives the same data.
            pick = int(hashlib.sha256(example.id.encode()).hexdigest(), 16) % len(self.expansion_mix)
            return self.retrieve_contexts(example.question, self.expansion_mix[pick])
        return self.retrieve_contexts(example.question)

    # ----------------------------------------------------------- data
    def load_qa(self) -> list[QAExample]:
        """The QA records: the given dataset, or questions written from the index's nodes (cached)."""
        if self.dataset is not None:
            return load_qa_examples(self.dataset)
        cache = self.output_dir / TRAINING_SUBDIR / "generated_questions.jsonl"
        if cache.is_file():
            return load_qa_examples(cache)
        if self.index is None:
            raise ValueError("Question generation reads the index's nodes: pass the index, not a retriever.")
        nodes = sorted(self._index_nodes().values(), key=lambda n: (str(n.metadata.get(DOC_KEY)), n.metadata.get(CHUNK_KEY, 0)))
        if self.max_question_nodes is not None and len(nodes) > self.max_question_nodes:
            step = len(nodes) / self.max_question_nodes  # spread over the corpus, deterministically
            nodes = [nodes[int(i * step)] for i in range(self.max_question_nodes)]
        qa = generate_questions(nodes, self.question_llm, num_questions_per_chunk=self.num_questions_per_chunk,
                                progress=self.show_progress)
        write_qa_jsonl(cache, qa)
        return qa

    def _source_hash(self, qa: Sequence[QAExample], instructions: Sequence[TrainExample]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([asdict(q) for q in qa], sort_keys=True).encode())
        h.update(json.dumps([i.to_json() for i in instructions], sort_keys=True).encode())
        cfg = self.config
        h.update(json.dumps({
            "fingerprint": self.llm.compressor.fingerprint, "top_k": self.similarity_top_k,
            "budget": self.position_budget, "gold": self.use_gold_contexts, "val": cfg.val_fraction,
            "max_val": cfg.max_val_examples, "seed": cfg.seed, "instr": cfg.instruction_ratio,
            "teacher": self.teacher if isinstance(self.teacher, str) else type(self.teacher).__name__,
            "system": self.llm.system_prompt, "max_target": cfg.max_target_tokens,
            "selection": getattr(self.retriever, "selection", None).__dict__ if hasattr(self.retriever, "selection") else None,
            "expansion_mix": self.expansion_mix}, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def build_examples(self) -> tuple[list[TrainExample], list[TrainExample]]:
        """Build (or reload) the train/validation examples; they are kept in ``output_dir/training``."""
        qa = self.load_qa()
        instructions = load_instruction_examples(self.instruction_data) if self.instruction_data is not None else []
        source = self._source_hash(qa, instructions)
        cache = self.output_dir / TRAINING_SUBDIR / "examples.jsonl"
        meta = cache.with_suffix(".meta.json")
        if cache.is_file() and meta.is_file() and json.loads(meta.read_text()).get("source_hash") == source:
            splits = load_examples(cache)
            self.train_examples, self.val_examples = splits.get("train", []), splits.get("val", [])
            return self.train_examples, self.val_examples
        examples = build_train_examples(qa, contexts_for=self._contexts_for, messages_for=self.query_messages,
                                        teacher=self._teacher_fn(), progress=self.show_progress)
        if self._multi_pack:
            logger.warning("%d questions needed several LLM calls (compact + refine); their example is the first "
                           "call. Lower similarity_top_k or the position budget to make one call per query.",
                           self._multi_pack)
        cfg = self.config
        train, val = split_train_val(examples, cfg.val_fraction, max_val=cfg.max_val_examples, seed=cfg.seed)
        train = mix_instructions(train, instructions, cfg.instruction_ratio, seed=cfg.seed)
        save_examples(cache, {"train": train, "val": val})
        atomic_write_bytes(meta, json.dumps({"source_hash": source, "train": len(train), "val": len(val)}).encode())
        self.train_examples, self.val_examples = train, val
        return train, val

    def _teacher_fn(self):
        if self.teacher == "self":
            return self_teacher(self.llm.reader, self.config.max_target_tokens)
        if self.teacher is None:
            return None
        teacher_llm = self.teacher

        def answer(messages: list[dict]) -> str:
            from llama_index.core.base.llms.types import ChatMessage

            return teacher_llm.chat([ChatMessage(role=m["role"], content=m["content"]) for m in messages]).message.content or ""

        return answer

    # ------------------------------------------------------- finetune
    def make_finetuner(self) -> LoRAFinetuner:
        if not self.train_examples:
            self.build_examples()
        return LoRAFinetuner(self.llm.reader, self.train_examples, self.val_examples, adapter_name=self.adapter_name,
                             output_dir=self.output_dir, config=self.config, progress=self.show_progress,
                             extra_metadata={"similarity_top_k": self.similarity_top_k,
                                             "response_mode": "compact"})

    def finetune(self, *, stop_after_steps: Optional[int] = None, overwrite: bool = False) -> FinetuneResult:
        """Build the examples, train (resuming a checkpoint in ``output_dir``), and save the best adapter."""
        finetuner = self.make_finetuner()
        self._record_run_settings(overwrite)
        self.result = finetuner.train(stop_after_steps=stop_after_steps, overwrite=overwrite)
        return self.result

    def get_finetuned_model(self, **model_kwargs: Any) -> LLoCOLLM:
        """An :class:`LLoCOLLM` on the same decoder and store with this adapter loaded and selected.

        The adapter is checked against the compressor (:class:`AdapterMismatchError` on a mismatch); other
        adapters stay loaded, so several LLMs (or ``adapter=`` per call) can share one decoder.
        """
        if not (self.output_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"No adapter in '{self.output_dir}' yet: call finetune() first.")
        self.llm.load_adapter(self.output_dir, self.adapter_name)
        kwargs = {"max_new_tokens": self.llm.max_new_tokens, "system_prompt": self.llm.system_prompt,
                  "context_window": self.llm.context_window, **model_kwargs, "adapter": self.adapter_name}
        return LLoCOLLM(self.llm.compressor, self.llm.store, **kwargs)


def synthesizer_messages(synth, llm: LLoCOLLM, question: str, chunks: Sequence[str]) -> tuple[list[dict], int]:
    """The first LLM call of a compact synthesizer's answer to ``question`` over ``chunks``, and its pack count.

    Replays :class:`CompactAndRefine`: pack the chunks, repack the first pack for the largest prompt,
    format ``text_qa_template`` (its chat variant, selected for the LLM), extend with the LLM's system
    prompt -- the first (and with the default budget, only) LLM call of a query.
    """
    packs = synth._make_compact_text_chunks(question, [c for c in chunks if c.strip()])
    max_prompt = get_biggest_prompt([synth._text_qa_template, synth._refine_template])
    # No chunks: the same template with an empty context (a closed-book line in the query's own format).
    first = synth._prompt_helper.repack(max_prompt, [packs[0]], llm=synth._llm,
                                        padding=synth._response_padding_size)[0] if packs else ""
    prompt = synth._text_qa_template.partial_format(query_str=question)
    return llm._raw_messages(llm._get_messages(prompt, context_str=first)), len(packs)  # training data, not user text


def text_qa_messages_fn(llm: Optional[LLoCOLLM] = None):
    """``messages_for(question, chunks)`` in the prompt ``LLoCOQueryEngine`` sends by default (compact mode,
    LlamaIndex's default text-QA template), for :mod:`lloco_index.training.query_data`.

    ``llm`` sets the system prompt and window; default: an ``LLoCOLLM`` on the shipped compressor.
    """
    from llama_index.core import get_response_synthesizer

    from ..compressors import load_compressor

    llm = llm or LLoCOLLM(load_compressor())
    synth = get_response_synthesizer(llm=llm, response_mode="compact")

    def messages_for(question: str, chunks: Sequence[str]) -> list[dict]:
        return synthesizer_messages(synth, llm, question, chunks)[0]

    return messages_for


def _node_text(node: BaseNode) -> str:
    return node.text if isinstance(node, TextNode) else node.get_content(metadata_mode=MetadataMode.NONE)


def _overlaps(node_text: str, gold: str, probe: int = 80) -> bool:
    """A node belongs to a gold context if one contains the other, or the node holds the gold text's start or end."""
    if gold in node_text or (len(node_text) > probe and node_text in gold):
        return True
    head, tail = gold[:probe], gold[-probe:]
    return len(gold) > 2 * probe and (head in node_text or tail in node_text)
