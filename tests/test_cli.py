"""The `lloco-index` command as a new user meets it: --help explains every argument and shows defaults."""

from __future__ import annotations

import argparse

import pytest

from lloco_index import defaults
from lloco_index.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, name: str = "lloco-index"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, sub_name)


def test_every_argument_has_help():
    undocumented = [(name, a.option_strings or a.dest) for name, p in _parsers(build_parser()) for a in p._actions
                    if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert not undocumented


def test_help_shows_defaults():
    import re

    parsers = dict(_parsers(build_parser()))
    query = " ".join(parsers["query"].format_help().split())  # one line: wrapping does not matter
    assert "persist_dir index directory written by" in query
    assert f"--top-k TOP_K chunks retrieved (default: {defaults.DEFAULT_TOP_K})" in query
    assert f"longest answer, in tokens (default: {defaults.DEFAULT_MAX_NEW_TOKENS})" in query
    assert re.search(r"--mode \{[^}]*\} LlamaIndex response mode[^(]*\(default: compact\)", query)
    # Flags are off unless given: no "(default: False)" noise.
    assert "default: False" not in parsers["demo"].format_help()
    assert "(default: " in parsers["finetune"].format_help() and "(default: " in parsers["pretrain"].format_help()


def test_subcommand_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["compress", "--help"])
    assert exc.value.code == 0
    assert "folder of documents" in capsys.readouterr().out
