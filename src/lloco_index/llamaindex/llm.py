"""LLoCOLLM: a LlamaIndex CustomLLM that reads soft-prompt placeholders."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar, Union

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_validator
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.retrieval import RetrievalEndEvent
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from .. import defaults
from ..generation import (
    AUTO, GenerationResult, RESOLVE_RETRIEVED, SoftPromptReader,
    check_handed_out, check_resolve_choice, find_ids, hand_out,
)
from ..store import SoftPromptStore

R = TypeVar("R")


def _role(role: MessageRole) -> str:
    value = role.value if hasattr(role, "value") else str(role)
    return value if value in ("system", "user", "assistant") else "user"


def _responses(stream: Iterator[str], make: Callable[[str, str], R]) -> Iterator[R]:
    """``make(text so far, delta)`` for each streamed piece of an answer; one empty response for an empty
    answer, because LlamaIndex's callbacks need at least one."""
    text, yielded = "", False
    for delta in stream:
        text += delta
        yielded = True
        yield make(text, delta)
    if not yielded:
        yield make("", "")


class _HandOutRetrievedIds(BaseEventHandler):
    """Records the soft-prompt ids of every LlamaIndex retrieval, whichever retriever ran it.

    ``index.as_query_engine(llm=LLoCOLLM(...))`` retrieves with LlamaIndex's own retriever, which knows
    nothing of soft prompts; its RetrievalEndEvent is the one place all retrievals pass.
    """

    @classmethod
    def class_name(cls) -> str:
        return "LLoCOHandOutRetrievedIds"

    def handle(self, event, **kwargs: Any) -> None:
        if isinstance(event, RetrievalEndEvent):
            from .node_keys import SOFT_PROMPT_KEY

            for scored in event.nodes or []:
                placeholder = (getattr(scored.node, "metadata", None) or {}).get(SOFT_PROMPT_KEY)
                if isinstance(placeholder, str):
                    hand_out(find_ids(placeholder))


# The root dispatcher sees the events of every module's dispatcher; registered once, on import, so that a
# retrieval run before any LLoCOLLM exists is recorded too.
if not any(isinstance(h, _HandOutRetrievedIds) for h in get_dispatcher().event_handlers):
    get_dispatcher().add_event_handler(_HandOutRetrievedIds())


class LLoCOLLM(CustomLLM):
    """A local decoder that reads ``<|lloco:ID|>`` placeholders as soft prompts.

    >>> llm = LLoCOLLM.from_persist_dir("./storage")          # compressor + store of an index
    >>> llm.complete("Context: <|lloco:3f2a...|>\\nQuestion: ...").text
    >>> llm.load_adapter("./adapters/legal", "legal"); llm.complete(prompt, adapter="legal")

    Use it with :class:`LLoCOQueryEngine` (or ``Settings`` from
    :func:`configure_settings`), so that LlamaIndex counts each placeholder as
    the positions its soft prompt really takes.
    """

    model_name: str = Field(default=defaults.DEFAULT_DECODER_NAME, description="Identity of the decoder.")
    adapter: Optional[str] = Field(default=AUTO, description="LoRA adapter to read with: a loaded name, None, or 'auto'.")
    max_new_tokens: int = Field(default=defaults.DEFAULT_MAX_NEW_TOKENS, description="Tokens to generate per call.")
    context_window: int = Field(default=defaults.DEFAULT_CONTEXT_WINDOW, description="Decoder positions per call.")
    system_prompt: Optional[str] = Field(default=None, description="System prompt added when the messages have none.")
    max_batch_size: int = Field(default=defaults.DEFAULT_MAX_BATCH_SIZE, ge=1, description=(
        "Concurrent async calls (acomplete/achat) answered together in one batched generate call, up to this many; "
        "1 keeps one call at a time."))
    resolve_placeholders: str = Field(default=RESOLVE_RETRIEVED, description=(
        "'retrieved': read only soft prompts a retriever handed out in this process (a question naming another "
        "id is refused); 'any': every id in the prompt (prompts built from your own ids)."))

    _reader: SoftPromptReader = PrivateAttr()
    _compressor: Any = PrivateAttr()
    _batcher: Any = PrivateAttr(default=None)

    @field_validator("resolve_placeholders")
    @classmethod
    def _check_resolve(cls, value: str) -> str:
        return check_resolve_choice(value)

    def __init__(self, compressor, store: Optional[SoftPromptStore] = None, **kwargs: Any):
        backbone = compressor.backbone
        kwargs.setdefault("model_name", backbone.identity)
        kwargs.setdefault("context_window", backbone.context_window)
        super().__init__(**kwargs)
        if store is not None:
            store.check_compressor(compressor)
        self._compressor = compressor
        self._reader = SoftPromptReader(backbone, store, compressor=compressor, adapter=self.adapter,
                                        max_new_tokens=self.max_new_tokens, system_prompt=self.system_prompt)

    @classmethod
    def from_persist_dir(cls, persist_dir: Union[str, Path], compressor=None, **kwargs: Any) -> "LLoCOLLM":
        """The LLM for an index persisted with :func:`build_index` (its compressor is reloaded when not given)."""
        from ..manifest import load_compressor_for

        compressor = compressor or load_compressor_for(persist_dir)
        return cls(compressor, SoftPromptStore.open(persist_dir, compressor), **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "LLoCOLLM"

    # ---------------------------------------------------------------- parts
    @property
    def reader(self) -> SoftPromptReader:
        # The fields are the source of truth: a change after construction (llm.max_new_tokens = 8) reaches
        # the reader on its next call.
        self._reader.max_new_tokens = self.max_new_tokens
        self._reader.system_prompt = self.system_prompt
        self._reader.default_adapter = self.adapter
        return self._reader

    @property
    def compressor(self):
        return self._compressor

    @property
    def store(self) -> Optional[SoftPromptStore]:
        return self._reader.store

    @store.setter
    def store(self, store: SoftPromptStore) -> None:
        store.check_compressor(self._compressor)
        self._reader.store = store

    def load_adapter(self, path: Union[str, Path], name: str) -> None:
        """Load a LoRA adapter (peft directory) to select per call with ``adapter=name``."""
        from ..adapters import check_adapter

        check_adapter(path, self._compressor)
        self._compressor.backbone.load_adapter(path, name)

    def count_positions(self, text: str) -> int:
        return self._reader.count_positions(text)

    def position_tokenizer(self):
        """A tokenizer callable for LlamaIndex whose length is the real number of positions."""
        return PositionTokenizer(self._reader)

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            model_name=self.model_name,
            system_role=MessageRole.SYSTEM,
        )

    # ----------------------------------------------------------- generation
    def _raw_messages(self, messages: Sequence[ChatMessage]) -> list[dict]:
        """The reader's messages, every placeholder resolvable (for prompts the package builds itself)."""
        return [{"role": _role(m.role), "content": m.content or ""} for m in messages]

    def _messages(self, messages: Sequence[ChatMessage]) -> list[dict]:
        return self._guard(self._raw_messages(messages))

    def _prompt(self, prompt: str) -> list[dict]:
        return self._guard([{"role": "user", "content": prompt}])

    def _guard(self, messages: list[dict]) -> list[dict]:
        if self.resolve_placeholders == RESOLVE_RETRIEVED:
            # LlamaIndex formats the retrieved nodes and the question into one prompt string, so only the
            # record of what retrieval handed out tells a retrieved placeholder from a typed one.
            check_handed_out([i for m in messages for i in find_ids(m["content"])], "LLoCOLLM")
        return messages

    def _result(self, result: GenerationResult) -> dict:
        p = result.prompt
        return {"positions": p.positions, "text_positions": p.text_positions, "soft_positions": p.soft_positions,
                "soft_prompt_ids": p.soft_prompt_ids, "new_tokens": result.new_tokens, "seconds": result.total_s}

    def _call_kwargs(self, kwargs: dict) -> dict:
        return {"adapter": kwargs.get("adapter", AUTO), "max_new_tokens": kwargs.get("max_new_tokens")}

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        result = self.reader.generate(self._prompt(prompt), **self._call_kwargs(kwargs))
        return CompletionResponse(text=result.text, additional_kwargs=self._result(result))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        stream = self.reader.stream(self._prompt(prompt), **self._call_kwargs(kwargs))
        return _responses(stream, lambda text, delta: CompletionResponse(text=text, delta=delta))

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        result = self.reader.generate(self._messages(messages), **self._call_kwargs(kwargs))
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text),
                            additional_kwargs=self._result(result))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        stream = self.reader.stream(self._messages(messages), **self._call_kwargs(kwargs))
        return _responses(stream, lambda text, delta: ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta))


    # ------------------------------------------------------ async (batched)
    def _batches(self) -> bool:
        return self.max_batch_size > 1 and getattr(self.reader, "queue_batching", False)

    def _batching_queue(self):
        # Created on first use; pydantic private attrs are per instance, so each LLM has its own queue.
        if self._batcher is None:
            from ..serving.batching import BatchingQueue

            self._batcher = BatchingQueue(self.reader, max_batch_size=self.max_batch_size)
        return self._batcher

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """With ``max_batch_size > 1`` (the default), concurrent calls (``asyncio.gather``, async query engines)
        share batches."""
        if not self._batches():
            return self.complete(prompt, formatted=formatted, **kwargs)
        result = await self._batching_queue().agenerate(self._prompt(prompt), **self._call_kwargs(kwargs))
        return CompletionResponse(text=result.text, additional_kwargs=self._result(result))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        if not self._batches():
            return self.chat(messages, **kwargs)
        result = await self._batching_queue().agenerate(self._messages(messages), **self._call_kwargs(kwargs))
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text),
                            additional_kwargs=self._result(result))


class PositionTokenizer:
    """``len(tokenizer(text))`` = decoder positions, a placeholder counted as its soft prompt's length."""

    def __init__(self, reader: SoftPromptReader):
        self.reader = reader

    def __call__(self, text: str) -> list[int]:
        return [0] * self.reader.count_positions(text)
