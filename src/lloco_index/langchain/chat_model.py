"""ChatLLoCO: a LangChain chat model that reads soft-prompt placeholders.

A thin adapter over :class:`lloco_index.generation.SoftPromptReader`: it turns
LangChain messages into role dicts, lets the reader apply the chat template,
splice the soft prompts named by ``<|lloco:ID|>`` placeholders and generate
(greedy) with the chosen LoRA adapter, and turns the result back into an
``AIMessage`` with usage metadata that counts decoder *positions* (text tokens
plus soft-prompt vectors).

>>> from langchain_core.output_parsers import StrOutputParser
>>> from langchain_core.prompts import ChatPromptTemplate
>>> from langchain_core.runnables import RunnablePassthrough
>>> retriever = LLoCOLangChainRetriever.from_texts(texts, compressor, persist_dir="./storage")
>>> llm = ChatLLoCO.from_retriever(retriever)            # or ChatLLoCO.from_persist_dir("./storage")
>>> prompt = ChatPromptTemplate.from_template("Context:\\n{context}\\n\\nQuestion: {question}")
>>> def format_docs(docs): return "\\n\\n".join(d.page_content for d in docs)
>>> chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm | StrOutputParser()
>>> chain.invoke("Who built the tower?")
>>> llm.invoke("Context: <|lloco:ab12...|> Summarise.", adapter="legal")   # per-call LoRA adapter
>>> llm.bind(adapter="legal", max_tokens=32)                               # the same, as a Runnable
"""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from .. import defaults
from ..errors import UnknownPlaceholderError
from ..generation import (
    AUTO, RESOLVE_RETRIEVED, SoftPromptReader, SoftPromptRef,
    check_handed_out, check_resolve_choice, find_ids, split_prompt,
)
from ..store import SoftPromptStore

logger = logging.getLogger(__name__)

PROVIDER = "lloco"
# Keyword arguments a call (invoke/stream/bind) may carry.
_CALL_KWARGS = {"adapter", "max_new_tokens", "max_tokens", "model", "stream"}


@dataclass
class _CallOptions:
    adapter: Optional[str]
    max_new_tokens: int
    stop: list[str]


class ChatLLoCO(BaseChatModel):
    """LangChain chat model over a decoder that reads LLoCO soft prompts.

    Give it the pieces of a reader: a ``compressor`` (its backbone is the decoder;
    it also names the reader adapter used with ``adapter="auto"``) or a bare
    ``backbone``, and the ``store`` the placeholders refer to (or ``persist_dir``
    to open it). Heavy loading is deferred to the first call, so constructing
    one is cheap.

    Construction helpers: :meth:`from_retriever`, :meth:`from_persist_dir`, :meth:`default`.

    Decoding is greedy (deterministic): ``temperature`` is accepted as a
    standard parameter but not used. Tool calling, structured output and
    non-text inputs (images, audio, files) are not supported.

    Per call: ``adapter`` (a loaded LoRA adapter name, ``None`` for the plain
    decoder, or ``"auto"``), ``max_tokens``/``max_new_tokens`` and ``stop``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=())

    compressor: Optional[Any] = Field(default=None, exclude=True, description="The compressor whose soft prompts are read.")
    backbone: Optional[Any] = Field(default=None, exclude=True, description="The decoder (default: the compressor's).")
    store: Optional[Any] = Field(default=None, exclude=True, description="SoftPromptStore the placeholders refer to.")
    persist_dir: Optional[str] = Field(default=None, description="Open the store (and, if needed, the compressor) here.")
    adapter: Optional[str] = Field(default=AUTO, description="LoRA adapter: a loaded name, None (plain decoder) or 'auto'.")
    adapters: dict[str, str] = Field(default_factory=dict, description="LoRA adapters to load on first use: name -> peft dir.")
    max_new_tokens: int = Field(default=defaults.DEFAULT_MAX_NEW_TOKENS, ge=1, alias="max_tokens",
                                description="Most tokens generated per call (alias max_tokens).")
    system_prompt: Optional[str] = Field(default=None, description="System message added when the messages have none.")
    stop: Optional[list[str]] = Field(default=None, description="Stop sequences: the answer ends before the first one.")
    temperature: Optional[float] = Field(default=None, description="Accepted for compatibility; decoding is greedy.")
    timeout: Optional[float] = Field(default=None, description="Accepted for compatibility; generation is local.")
    max_retries: int = Field(default=0, description="Accepted for compatibility; generation is local.")
    streaming: bool = Field(default=False, description="Use the streaming path for invoke too.")
    max_batch_size: int = Field(default=defaults.DEFAULT_MAX_BATCH_SIZE, ge=1, description=(
        "Concurrent calls (batch()/abatch(), concurrent ainvoke) answered together in one batched generate call, "
        "up to this many; 1 keeps one call at a time."))
    model_name: Optional[str] = Field(default=None, description="Name reported in metadata (default: the decoder's identity).")
    resolve_placeholders: str = Field(default=RESOLVE_RETRIEVED, description=(
        "'retrieved': read only soft prompts a retriever handed out in this process (a question naming another "
        "id is refused); 'any': every id in the messages (prompts built from your own ids)."))

    _reader: Optional[SoftPromptReader] = PrivateAttr(default=None)
    _init_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _batcher: Any = PrivateAttr(default=None)

    # ------------------------------------------------------------ validation
    @model_validator(mode="after")
    def _check_pieces(self) -> "ChatLLoCO":
        if self.compressor is None and self.backbone is None and self.persist_dir is None:
            raise ValueError(
                "ChatLLoCO needs compressor=, backbone= or persist_dir= (or use ChatLLoCO.default() for the embedded "
                "SmolLM2 with the shipped compressor)."
            )
        if self.compressor is not None and self.backbone is not None and self.compressor.backbone is not self.backbone:
            raise ValueError("backbone= is not the compressor's backbone: soft prompts must be read by the decoder they were made for.")
        if self.store is not None and self.compressor is not None:
            self.store.check_compressor(self.compressor)
        check_resolve_choice(self.resolve_placeholders)
        if self.temperature:
            warnings.warn("ChatLLoCO decodes greedily; temperature is ignored.", stacklevel=2)
        return self

    # ---------------------------------------------------------- construction
    @classmethod
    def from_retriever(cls, retriever: Any, **kwargs: Any) -> "ChatLLoCO":
        """A chat model reading the store behind ``retriever`` (a :class:`LLoCOLangChainRetriever`)."""
        index = retriever.index
        compressor = kwargs.pop("compressor", None) or index.compressor or getattr(retriever, "compressor", None)
        if compressor is None and kwargs.get("backbone") is None and retriever.persist_dir is not None:
            # A retriever reopened for search only: find the compressor through the persist dir's manifest.
            return cls.from_persist_dir(retriever.persist_dir, store=index.store, **kwargs)
        return cls(compressor=compressor, store=index.store, persist_dir=retriever.persist_dir, **kwargs)

    @classmethod
    def from_persist_dir(cls, persist_dir: Union[str, Path], compressor: Any = None, **kwargs: Any) -> "ChatLLoCO":
        """Open the store in ``persist_dir``; the compressor is reloaded from its manifest when not given."""
        from ..manifest import load_compressor_for

        if compressor is None:
            compressor = load_compressor_for(persist_dir)
        store = kwargs.pop("store", None) or SoftPromptStore.open(persist_dir, compressor)
        return cls(compressor=compressor, store=store, persist_dir=str(persist_dir), **kwargs)

    @classmethod
    def default(cls, persist_dir: Optional[Union[str, Path]] = None, *, compressor: Any = None, **kwargs: Any) -> "ChatLLoCO":
        """The embedded SmolLM2-135M-Instruct with the compressor shipped for it.

        When the shipped compressor cannot be loaded, this falls back (with a
        warning) to the identity :class:`TokenEmbeddingCompressor`
        (:func:`lloco_index.compressors.default_compressor`): answers are
        exactly those of the plain model reading the text, but nothing is
        compressed. Pass ``compressor=`` to choose.
        """
        if compressor is None:
            from ..compressors import default_compressor

            compressor, notice = default_compressor()
            if notice:
                warnings.warn(notice, stacklevel=2)
        if persist_dir is not None and "store" not in kwargs:
            kwargs["store"] = SoftPromptStore.open(persist_dir, compressor)
        return cls(compressor=compressor, persist_dir=str(persist_dir) if persist_dir is not None else None, **kwargs)

    # ------------------------------------------------------------ the reader
    @property
    def reader(self) -> SoftPromptReader:
        """The core reader (built on first use: this is where models and stores are opened)."""
        if self._reader is None:
            with self._init_lock:
                if self._reader is None:
                    self._reader = self._build_reader()
        return self._reader

    def _build_reader(self) -> SoftPromptReader:
        compressor, store = self.compressor, self.store
        if store is None and self.persist_dir is not None:
            if compressor is None and self.backbone is None:
                from ..manifest import load_compressor_for

                compressor = load_compressor_for(self.persist_dir)
            store = SoftPromptStore.open(self.persist_dir, compressor)
        backbone = self.backbone if self.backbone is not None else (compressor.backbone if compressor is not None else None)
        if backbone is None:
            raise ValueError(f"No decoder for the store in '{self.persist_dir}': pass compressor= or backbone=.")
        if store is not None and store.compressor_info.get("base_model") not in (None, backbone.identity):
            from ..errors import StoreMismatchError

            raise StoreMismatchError(
                f"The soft-prompt store was made for decoder '{store.compressor_info.get('base_model')}', but ChatLLoCO "
                f"reads with '{backbone.identity}'. Pass the compressor (or backbone) that made the store."
            )
        for name, path in self.adapters.items():
            if compressor is not None:
                from ..adapters import check_adapter

                check_adapter(path, compressor)
            backbone.load_adapter(path, name)
        return SoftPromptReader(backbone, store, compressor=compressor, adapter=self.adapter,
                                max_new_tokens=self.max_new_tokens, system_prompt=self.system_prompt)

    def load_adapter(self, path: Union[str, Path], name: str) -> None:
        """Load a LoRA adapter (peft directory) to select per call with ``adapter=name``."""
        reader = self.reader
        if reader.compressor is not None:
            from ..adapters import check_adapter

            check_adapter(path, reader.compressor)
        reader.backbone.load_adapter(path, name)

    def _resolved_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        backbone = self.backbone if self.backbone is not None else getattr(self.compressor, "backbone", None)
        if backbone is None and self._reader is not None:
            backbone = self._reader.backbone
        if backbone is not None:
            return str(backbone.identity)
        if self.store is not None:
            return str(self.store.compressor_info.get("base_model") or "lloco")
        return "lloco"

    # -------------------------------------------------------- LangChain hooks
    @property
    def _llm_type(self) -> str:
        return "lloco-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        compressor = self.compressor if self.compressor is not None else getattr(self._reader, "compressor", None)
        return {
            "model_name": self._resolved_model_name(),
            "compressor": getattr(compressor, "fingerprint", None),
            "persist_dir": self.persist_dir,
            "adapter": self.adapter,
            "max_new_tokens": self.max_new_tokens,
            "system_prompt": self.system_prompt,
            "stop": self.stop,
        }

    def _get_ls_params(self, stop: Optional[list[str]] = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider=PROVIDER, ls_model_type="chat",
                                 ls_model_name=kwargs.get("model") or self._resolved_model_name(),
                                 ls_max_tokens=int(kwargs.get("max_tokens") or kwargs.get("max_new_tokens") or self.max_new_tokens),
                                 ls_temperature=0.0)  # greedy, whatever temperature says
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    # ---------------------------------------------------------- conversions
    def _options(self, stop: Optional[list[str]], kwargs: dict[str, Any]) -> _CallOptions:
        unknown = set(kwargs) - _CALL_KWARGS
        if unknown:
            raise TypeError(
                f"ChatLLoCO got unsupported call arguments {sorted(unknown)}; it accepts adapter=, max_tokens= "
                f"(max_new_tokens=) and stop= (no tool calling or structured output)."
            )
        model = kwargs.get("model")
        if model is not None and model != self._resolved_model_name():
            raise ValueError(
                f"ChatLLoCO serves one local decoder ('{self._resolved_model_name()}') and cannot switch to model "
                f"'{model}' per call; select a LoRA adapter with adapter=... or build another ChatLLoCO."
            )
        max_new = kwargs.get("max_new_tokens") or kwargs.get("max_tokens") or self.max_new_tokens
        return _CallOptions(adapter=kwargs.get("adapter", self.adapter), max_new_tokens=int(max_new),
                            stop=[s for s in (stop if stop is not None else self.stop) or [] if s])

    @staticmethod
    def to_reader_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
        """LangChain messages -> the reader's ``{"role", "content"}`` dicts (text only)."""
        out = []
        for message in messages:
            if isinstance(message, (ToolMessage, FunctionMessage)) or getattr(message, "tool_calls", None):
                raise NotImplementedError("ChatLLoCO does not support tool calling (got a tool call or tool result message).")
            if isinstance(message, SystemMessage):
                role = "system"
            elif isinstance(message, HumanMessage):
                role = "user"
            elif isinstance(message, AIMessage):
                role = "assistant"
            elif isinstance(message, ChatMessage):
                role = {"human": "user", "ai": "assistant"}.get(message.role, message.role)
            else:
                raise ValueError(f"ChatLLoCO cannot read a {type(message).__name__}.")
            out.append({"role": role, "content": _text_content(message)})
        return out

    def _inspect(self, reader: SoftPromptReader, messages: list[dict[str, str]]) -> tuple[int, int, list[str]]:
        """(text positions, soft-prompt positions, ids) of the rendered prompt; unknown ids raise first.

        Counted without building embeddings, exactly as ``reader.prepare``
        counts them (each text piece tokenised on its own).
        """
        text = reader.render(messages)
        ids = find_ids(text)
        if ids:
            self._require_ids(reader, ids)
        text_positions = soft_positions = 0
        for piece in split_prompt(text):
            if isinstance(piece, SoftPromptRef):
                soft_positions += reader.store.num_positions(piece)
            else:
                text_positions += len(reader.text_ids(piece))
        return text_positions, soft_positions, ids

    def _require_ids(self, reader: SoftPromptReader, ids: list[str]) -> None:
        store = reader.store
        if store is None:
            raise UnknownPlaceholderError(
                f"The prompt names soft prompt '{ids[0]}' but ChatLLoCO has no soft-prompt store: pass store= "
                f"(e.g. ChatLLoCO.from_retriever(retriever)) or persist_dir=."
            )
        if self.resolve_placeholders == RESOLVE_RETRIEVED:
            # The template puts the retriever's placeholders and the question into one human message, so
            # the message a placeholder came in says nothing about who wrote it; the retriever's record does.
            check_handed_out(ids, "ChatLLoCO")
        missing = [i for i in ids if i not in store]
        if missing and store.path is not None:
            # Another process (or another store object) may have added chunks since we opened it: look again once.
            fresh = SoftPromptStore.open(store.path.parent, reader.compressor)
            if all(i in fresh for i in missing):
                reader.store = fresh
                return
            store = fresh
        if missing:
            store.num_positions(missing[0])  # raises the store's UnknownPlaceholderError, which names the store

    def _usage(self, reader: SoftPromptReader, options: _CallOptions, text_positions: int, soft_positions: int,
               ids: list[str], new_tokens: int, stopped: bool, seconds: Optional[float] = None) -> tuple[UsageMetadata, dict]:
        positions = text_positions + soft_positions
        usage = UsageMetadata(input_tokens=positions, output_tokens=new_tokens, total_tokens=positions + new_tokens)
        finish = "stop" if stopped or new_tokens < options.max_new_tokens else "length"
        lloco: dict[str, Any] = {
            "text_positions": text_positions,
            "soft_prompt_positions": soft_positions,
            "soft_prompt_ids": ids,
            "adapter": reader.resolve_adapter(options.adapter),
        }
        if seconds is not None:
            lloco["seconds"] = seconds
        metadata = {"model_name": self._resolved_model_name(), "finish_reason": finish, "lloco": lloco}
        return usage, metadata

    # ----------------------------------------------------------- generation
    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        options = self._options(stop, kwargs)
        reader = self.reader
        chat = self.to_reader_messages(messages)
        self._inspect(reader, chat)  # unknown placeholders fail here, with the store's message
        if self._batches(reader):  # batch() runs this in a thread pool: concurrent calls share batches
            result = self._batching_queue(reader).generate(chat, adapter=options.adapter, max_new_tokens=options.max_new_tokens)
        else:
            result = reader.generate(chat, adapter=options.adapter, max_new_tokens=options.max_new_tokens)
        return self._chat_result(reader, options, result)

    async def _agenerate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                         run_manager: Any = None, **kwargs: Any) -> ChatResult:
        if not self._batches(self.reader):
            return await super()._agenerate(messages, stop=stop, run_manager=run_manager, **kwargs)
        options = self._options(stop, kwargs)
        reader = self.reader
        chat = self.to_reader_messages(messages)
        self._inspect(reader, chat)
        result = await self._batching_queue(reader).agenerate(chat, adapter=options.adapter,
                                                               max_new_tokens=options.max_new_tokens)
        return self._chat_result(reader, options, result)

    def _batches(self, reader: SoftPromptReader) -> bool:
        return self.max_batch_size > 1 and getattr(reader, "queue_batching", False)

    def _batching_queue(self, reader: SoftPromptReader):
        with self._init_lock:
            if self._batcher is None or self._batcher.reader is not reader:
                from ..serving.batching import BatchingQueue

                self._batcher = BatchingQueue(reader, max_batch_size=self.max_batch_size)
            return self._batcher

    def _chat_result(self, reader: SoftPromptReader, options: _CallOptions, result: Any) -> ChatResult:
        text, stopped = _cut_at_stop(result.text, options.stop)
        prompt = result.prompt
        usage, metadata = self._usage(reader, options, prompt.text_positions, prompt.soft_positions,
                                      list(prompt.soft_prompt_ids), result.new_tokens, stopped, result.total_s)
        message = AIMessage(content=text, usage_metadata=usage, response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message, generation_info={"finish_reason": metadata["finish_reason"]})],
                          llm_output={"model_name": metadata["model_name"]})

    def _stream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        # No run_manager.on_llm_new_token here: BaseChatModel.stream reports every chunk we yield.
        options = self._options(stop, kwargs)
        reader = self.reader
        chat = self.to_reader_messages(messages)
        text_positions, soft_positions, ids = self._inspect(reader, chat)
        buffer = _StopBuffer(options.stop)
        generated: list[str] = []
        for delta in reader.stream(chat, adapter=options.adapter, max_new_tokens=options.max_new_tokens):
            generated.append(delta)
            # After a stop sequence we keep draining: the generation thread holds the decoder until it ends.
            out = buffer.push(delta)
            if out:
                yield ChatGenerationChunk(message=AIMessageChunk(content=out))
        tail = buffer.finish()
        # The reader streams text, not token ids: count the output by re-tokenising what was generated.
        new_tokens = len(reader.text_ids("".join(generated)))
        usage, metadata = self._usage(reader, options, text_positions, soft_positions, ids, new_tokens, buffer.stopped)
        yield ChatGenerationChunk(
            message=AIMessageChunk(content=tail, usage_metadata=usage, response_metadata=metadata, chunk_position="last"),
            generation_info={"finish_reason": metadata["finish_reason"]},
        )


# ---------------------------------------------------------------- helpers
def _text_content(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") in ("text", "text-plain"):
            parts.append(str(block.get("text", "")))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"ChatLLoCO reads text only; got a '{kind}' content block (images, audio and files are not supported).")
    return "".join(parts)


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop sequence (trailing whitespace dropped, as the stream does)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut < 0:
        return text, False
    return text[:cut].rstrip(), True


class _StopBuffer:
    """Turns generated deltas into emitted text, ending before the first stop sequence.

    It drops leading whitespace and holds back the last ``len(longest stop) - 1``
    characters (they may be the start of a stop sequence split across deltas)
    and any trailing whitespace (the non-streaming answer is stripped), so the
    concatenated stream equals the ``invoke`` answer.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        if not self.text:
            # The answer is stripped, so leading whitespace is never emitted (the reader's stream can start
            # with an empty delta and then a space-prefixed one).
            delta = delta.lstrip()
        self.text += delta
        # Every stop starting before `emitted` would have been complete (and found) already.
        cut = min((i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(len(self.text[:cut].rstrip()))
        return self._emit(min(len(self.text) - self.hold, len(self.text.rstrip())))

    def finish(self) -> str:
        return "" if self.stopped else self._emit(len(self.text.rstrip()))

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted : end], end
        return out
