"""An answer length of zero is refused, per call too (it used to mean the default, or an empty answer)."""

from __future__ import annotations

import pytest
from lloco_index.errors import ContextBudgetError
from lloco_index.generation import SoftPromptReader


@pytest.mark.parametrize("default, per_call", [(0, None), (8, 0), (8, -3)])
def test_zero_answer_length_is_refused(backbone, default, per_call):
    reader = SoftPromptReader(backbone, None, max_new_tokens=default)
    with pytest.raises(ContextBudgetError, match="max_new_tokens must be a whole number of at least 1"):
        reader.generate([{"role": "user", "content": "Hello"}], adapter=None, max_new_tokens=per_call)


# ------------------------------------------------- texts that are not text: named, never called "empty"
@pytest.mark.parametrize("text,words", [
    (None, r"Text is a NoneType, not a str: drop it"),
    (b"bytes about bees", r"Text is a bytes, not a str: decode it first"),
    ("bees \ud800 honey", r"Text contains a lone surrogate \(U\+D800 at character 5, near 'bees '\)"),
])
def test_texts_that_are_not_valid_str_are_named_precisely(backbone, text, words):
    from lloco_index.compressors import TokenEmbeddingCompressor
    from lloco_index.errors import InputError
    from lloco_index.store import SoftPromptStore

    compressor = TokenEmbeddingCompressor(backbone)
    with pytest.raises(InputError, match=words):
        compressor.compress([text])
    with pytest.raises(InputError, match=words):  # the content hash is computed first
        SoftPromptStore.for_compressor(compressor).add([text], compressor)


def test_a_document_with_a_lone_surrogate_is_named_by_its_file(backbone):
    from llama_index.core import Document

    from lloco_index.compressors import TokenEmbeddingCompressor
    from lloco_index.errors import InputError
    from lloco_index.llamaindex import build_index

    docs = [Document(text="Bees make honey.", metadata={"file_name": "bees.txt"}),
            Document(text="Bicycles \udcff have wheels.", metadata={"file_name": "bikes.txt"})]
    with pytest.raises(InputError, match=r"Document 'bikes.txt' contains a lone surrogate \(U\+DCFF at character 9"):
        build_index(docs, TokenEmbeddingCompressor(backbone))


def test_langchain_text_with_a_lone_surrogate_is_refused_precisely():
    from conftest_langchain import tiny_compressor
    from lloco_index.errors import InputError
    from lloco_index.langchain import LLoCOLangChainRetriever

    with pytest.raises(InputError, match="lone surrogate"):
        LLoCOLangChainRetriever.from_texts(["Fine text.", "Broken \udcff text."], tiny_compressor(), None)
