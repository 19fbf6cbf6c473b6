"""The ``lloco-index`` command: demo, compress, query, pretrain, finetune, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import defaults


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.persist_dir, max_questions=args.questions, top_k=args.top_k, compare_full=not args.no_compare)


def _compress(args: argparse.Namespace) -> None:
    from llama_index.core import SimpleDirectoryReader

    from .compressors import load_compressor
    from .llamaindex import build_index

    from .store import SoftPromptStore

    compressor = load_compressor(args.compressor, decoder=args.decoder)
    with _quiet_optional_readers():
        docs = SimpleDirectoryReader(str(args.directory), recursive=True, required_exts=args.ext or None).load_data()
    rich = sorted({Path(d.metadata.get("file_path", "")).suffix for d in docs} & _RICH_FORMATS)
    if rich:
        print(f"note: {', '.join(rich)} files were read as plain text; `pip install llama-index-readers-file` "
              f"reads them properly", file=sys.stderr)
    stored = args.persist_dir / defaults.STORE_SUBDIR
    before = set(SoftPromptStore.open(args.persist_dir, compressor).ids()) if stored.is_dir() else set()
    index, store = build_index(docs, compressor, persist_dir=args.persist_dir, show_progress=True)
    new = len(set(store.ids()) - before)
    print(f"{len(docs)} documents -> {len(store)} soft prompts in {args.persist_dir} (compressor {compressor.fingerprint}): "
          f"{new} new chunks compressed, {len(store) - new} already stored and not recompressed")


# Formats that SimpleDirectoryReader reads properly only with llama-index-readers-file installed.
_RICH_FORMATS = {".pdf", ".docx", ".pptx", ".epub", ".hwp", ".ipynb", ".mbox", ".xlsx", ".csv", ".jpg", ".png", ".mp3", ".mp4"}


class _quiet_optional_readers:
    """Drop SimpleDirectoryReader's "`llama-index-readers-file` package not found" warning, logged once per
    reader it builds (three times per compress): plain-text folders do not need the package, and the one
    line printed after loading says when a folder does."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "llama-index-readers-file" not in record.getMessage()

    def __enter__(self):
        self.filter = self._Filter()
        self.logger = logging.getLogger("llama_index.core.readers.file.base")
        self.logger.addFilter(self.filter)

    def __exit__(self, *exc):
        self.logger.removeFilter(self.filter)


def _query(args: argparse.Namespace) -> None:
    from .llamaindex import LLoCOLLM, LLoCOQueryEngine, load_index
    from .llamaindex.node_keys import ID_KEY

    index, store, compressor = load_index(args.persist_dir)
    llm = LLoCOLLM(compressor, store, max_new_tokens=args.max_new_tokens, adapter=args.adapter_name if args.adapter else "auto")
    if args.adapter:
        llm.load_adapter(args.adapter, args.adapter_name)
    engine = LLoCOQueryEngine.from_index(index, llm, response_mode=args.mode, similarity_top_k=args.top_k)
    response = engine.query(args.question)
    print(str(response).strip())
    # The retriever hands chunks to the LLM in reading order; the listing is by relevance, best first.
    for n in sorted(response.source_nodes, key=lambda n: n.score or 0.0, reverse=True):
        print(f"  [{n.score:.3f}] {n.node.metadata.get('file_name', '')} soft prompt {n.node.metadata[ID_KEY]} "
              f"({store.num_positions(n.node.metadata[ID_KEY])} positions): {n.node.text[:80]!r}...")


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, except flags (off unless given) and unset (None) defaults,
    whose help says what happens instead."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or isinstance(
                action, (argparse._StoreTrueAction, argparse._HelpAction)) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lloco-index", description=__doc__.replace("``", ""), formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level (default: warnings only)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".",
                              formatter_class=HelpFormatter)

    p = add("demo", "compress the shipped sample corpus and answer questions over it")
    p.add_argument("--persist-dir", type=Path, default=None,
                   help=f"where the demo index is kept and reused (default: {defaults.cache_dir() / 'demo-storage'})")
    p.add_argument("--questions", type=int, default=6, help="sample questions to answer")
    p.add_argument("--top-k", type=int, default=3, help="chunks retrieved per question")
    p.add_argument("--no-compare", action="store_true", help="skip the full-text baseline answers")
    p.set_defaults(func=_demo)

    p = add("compress", "compress a directory of documents into a persisted index")
    p.add_argument("directory", type=Path, help="folder of documents, read recursively (SimpleDirectoryReader)")
    p.add_argument("--persist-dir", type=Path, required=True,
                   help="index directory to create or extend; chunks already in its store are not compressed again")
    p.add_argument("--compressor", type=Path, default=None, help="compressor directory (default: the shipped one)")
    p.add_argument("--decoder", default=None, help="local decoder directory (default: embedded SmolLM2)")
    p.add_argument("--ext", action="append", help="file extensions to read, e.g. --ext .txt (repeatable; default: all)")
    p.set_defaults(func=_compress)

    p = add("query", "ask a question over a persisted index")
    p.add_argument("persist_dir", type=Path, help="index directory written by `lloco-index compress`")
    p.add_argument("question", help="the question, quoted")
    p.add_argument("--mode", default="compact", choices=["compact", "refine", "tree_summarize", "simple_summarize"],
                   help="LlamaIndex response mode: how retrieved chunks are packed into LLM calls")
    p.add_argument("--top-k", type=int, default=defaults.DEFAULT_TOP_K, help="chunks retrieved")
    p.add_argument("--max-new-tokens", type=int, default=defaults.DEFAULT_MAX_NEW_TOKENS, help="longest answer, in tokens")
    p.add_argument("--adapter", type=Path, default=None, help="a LoRA adapter directory to read with (default: the "
                   "compressor's reader adapter, if it has one)")
    p.add_argument("--adapter-name", default="user_adapter", help="name the --adapter is loaded under")
    p.set_defaults(func=_query)

    from .eval.cli import add_bench_arguments, run_bench

    add_bench_arguments(add("bench", "benchmarks against the baselines (lloco_index.eval)"))
    sub.choices["bench"].set_defaults(func=run_bench)
    _add_subcommand(add, "pretrain", "train a compressor (lloco_index.training)", "lloco_index.training.cli",
                    "add_pretrain_arguments", "run_pretrain")
    _add_subcommand(add, "finetune", "finetune a LoRA adapter from an index (lloco_index.finetune)",
                    "lloco_index.finetune.cli", "add_finetune_arguments", "run_finetune")
    return parser


def _add_subcommand(add, name: str, help_text: str, module: str, add_arguments: str, run: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    p = add(name, help_text)
    getattr(mod, add_arguments)(p)
    p.set_defaults(func=getattr(mod, run))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import LLoCOError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except LLoCOError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
