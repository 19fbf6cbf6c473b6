"""The generated sections of docs/*.md (CLI reference, defaults, benchmarks, model cards) match the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="the `docs` extra is not installed")

HOOK = Path(__file__).parents[3] / "docs" / "hooks" / "generated.py"


def _hook():
    spec = importlib.util.spec_from_file_location("lloco_docs_hook", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_sections_are_current():
    hook = _hook()
    with hook._plain_env():
        stale = hook.stale_pages()
    assert not stale, f"stale: {[p.name for p in stale]}; run `python docs/hooks/generated.py --write`"
    assert {p.name for p in hook.generated_pages()} >= {"cli.md", "configuration.md", "limitations.md", "benchmark-results.md"}


def test_a_changed_option_makes_the_cli_page_stale():
    hook = _hook()
    page = (hook.DOCS / "cli.md").read_text(encoding="utf-8")
    edited = page.replace("chunks retrieved (default: 4)", "chunks retrieved (default: 5)")
    assert edited != page
    with hook._plain_env():
        assert hook.render_generated(edited) == page  # regenerating restores the code's text
