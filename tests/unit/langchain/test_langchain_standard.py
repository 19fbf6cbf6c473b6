"""langchain-tests standard suites for ChatLLoCO and LLoCOLangChainRetriever.

They run on a tiny random LLaMA (hidden 64, 2 layers, SmolLM2 tokenizer), so
answers are gibberish but every code path is the real one. What ChatLLoCO
does not do is declared honestly below: no tool calling, no structured
output, no JSON mode, no image/audio/PDF inputs, no per-call model switch.
"""

from __future__ import annotations

from typing import Any

from langchain_tests.integration_tests import ChatModelIntegrationTests, RetrieversIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from conftest_langchain import mark_async_tests, tiny_backbone, tiny_chunk_index
from lloco_index.langchain import ChatLLoCO, LLoCOLangChainRetriever


class _Declarations:
    """What the suites read to decide which tests apply (shared by unit and integration)."""

    @property
    def chat_model_class(self) -> type[ChatLLoCO]:
        return ChatLLoCO

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True  # input_tokens = decoder positions (text tokens + soft-prompt vectors)

    @property
    def supports_model_override(self) -> bool:
        return False  # one local decoder per instance; per-call choice is the LoRA adapter

    @property
    def enable_vcr_tests(self) -> bool:
        return False  # no HTTP to record


@mark_async_tests
class TestChatLLoCOUnit(_Declarations, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        # No max_tokens/stop here: test_standard_params passes its own.
        return {"backbone": tiny_backbone()}


@mark_async_tests
class TestChatLLoCOIntegration(_Declarations, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Short answers keep ~40 generations on 2 CPU cores to a few seconds.
        return {"backbone": tiny_backbone(), "max_tokens": 8}


@mark_async_tests
class TestLLoCOLangChainRetriever(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[LLoCOLangChainRetriever]:
        return LLoCOLangChainRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"index": tiny_chunk_index(), "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "How tall is the Eiffel Tower?"
