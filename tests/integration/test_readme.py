"""The README's code runs as written (on the shipped sample corpus in place of `my_docs/`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

README = Path(__file__).parents[2] / "README.md"
SAMPLE = Path(__file__).parents[2] / "src" / "lloco_index" / "sample_corpus"


def _python_block_after(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_langchain_snippet_runs_as_written(tmp_path, monkeypatch):
    import torch

    torch.set_num_threads(1)
    code = _python_block_after("## LangChain")
    code = code.replace('"my_docs/"', repr(str(SAMPLE)))
    monkeypatch.chdir(tmp_path)  # ./lc-storage goes into a fresh directory
    namespace: dict = {}
    exec(compile(code.replace("chain.invoke(", "answer = chain.invoke("), "README-langchain", "exec"), namespace)
    assert (tmp_path / "lc-storage" / "lloco_index.json").is_file()
    # The chain's answer is the reader's own answer to the prompt built from what the retriever returned.
    from lloco_index.langchain import ChatLLoCO

    question = "What does the report conclude?"
    docs = namespace["retriever"].invoke(question)
    assert any(d.page_content.startswith("<|lloco:") for d in docs)  # soft prompts reach the prompt
    messages = namespace["prompt"].invoke({"context": namespace["format_docs"](docs), "question": question})
    expected = ChatLLoCO.from_persist_dir("./lc-storage").invoke(messages).content
    assert namespace["answer"] == expected and expected.strip()
