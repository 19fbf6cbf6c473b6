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


def test_compress_twice_reports_no_new_chunks_and_query_lists_sources_by_score(tmp_path, capsys, caplog):
    import re

    from lloco_index.backbone import Backbone
    from lloco_index.cli import main
    from lloco_index.compressors import TokenEmbeddingCompressor
    from lloco_index.compressors.token_embedding import TokenEmbeddingConfig

    from tiny_models import tiny_family_backbone

    model_dir, comp_dir, docs, storage = tmp_path / "model", tmp_path / "comp", tmp_path / "docs", tmp_path / "storage"
    saved = tiny_family_backbone("llama", initializer_range=0.2)
    saved.base_model.save_pretrained(str(model_dir))
    saved.tokenizer.save_pretrained(str(model_dir))
    backbone = Backbone.load(model_dir)
    TokenEmbeddingCompressor(backbone, TokenEmbeddingConfig(segment_length=24, base_model=backbone.identity)).save_pretrained(comp_dir)
    docs.mkdir()
    for name, fact in [("bees", "Bees make honey from nectar."), ("ships", "Lighthouses warn ships of reefs."),
                       ("wheels", "Bicycles have two wheels.")]:
        (docs / f"{name}.txt").write_text(" ".join([fact] * 8))
    argv = ["compress", str(docs), "--persist-dir", str(storage), "--compressor", str(comp_dir), "--decoder", str(model_dir)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    first = captured.out
    # A folder of .txt files needs no optional reader package: no warning about one, no note.
    assert "llama-index-readers-file" not in caplog.text + captured.err
    n = int(re.search(r"-> (\d+) soft prompts", first).group(1))
    assert f"{n} new chunks compressed, 0 already stored" in first
    assert main(argv) == 0
    assert f"0 new chunks compressed, {n} already stored and not recompressed" in capsys.readouterr().out

    assert main(["query", str(storage), "What do bees make?", "--top-k", "4", "--max-new-tokens", "2"]) == 0
    scores = [float(s) for s in re.findall(r"^  \[(-?[0-9.]+)\]", capsys.readouterr().out, re.M)]
    assert len(scores) >= 2 and scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("command", [["query", "no-such-dir", "Who?"], ["demo"]])
def test_negative_expand_top_k_is_refused_before_any_model_loads(command, capsys):
    from lloco_index.cli import main

    assert main([*command, "--expand-top-k", "-1"]) == 2
    assert "--expand-top-k must be 0 or more (got -1)" in capsys.readouterr().err
