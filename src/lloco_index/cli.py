"""The ``lloco-index`` command: demo, compress, query, pretrain, finetune, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import defaults
from .selection import POLICIES


def _check_expand_top_k(value: int) -> None:
    """Refused before any model loads (tens of seconds), with what the valid values do."""
    from .errors import InputError

    if value < 0:
        raise InputError(f"--expand-top-k must be 0 or more (got {value}): 0 reads soft prompts only, and a value "
                         f"above --top-k reads every retrieved chunk as text.")


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    _check_expand_top_k(args.expand_top_k)
    run_demo(args.persist_dir, max_questions=args.questions, top_k=args.top_k, compare_full=not args.no_compare,
             expand_top_k=args.expand_top_k)


def _compress(args: argparse.Namespace) -> None:
    from .compressors import load_compressor
    from .fileio import exclusive_lock
    from .llamaindex import build_index
    from .llamaindex.documents import read_documents
    from .store import SoftPromptStore

    # Inputs and the persist dir are checked before any model is loaded (that takes tens of seconds).
    docs = read_documents(args.directory, args.ext)
    with exclusive_lock(args.persist_dir):
        before = _indexed_documents(args.persist_dir)
        compressor = load_compressor(args.compressor, decoder=args.decoder)
        stored = (set(SoftPromptStore.open(args.persist_dir, compressor).ids())
                  if (args.persist_dir / defaults.STORE_SUBDIR).is_dir() else set())
    # build_index takes the lock again for the whole build; between the two another writer may start, and
    # then build_index refuses with the same "locked" error.
    quiet = _DropStoreInterruptNote()  # the command's own line below says it, with the totals
    logging.getLogger("lloco_index.store").addFilter(quiet)
    try:
        index, store = build_index(docs, compressor, persist_dir=args.persist_dir, show_progress=True)
    except KeyboardInterrupt:
        raise _compress_interrupted(args.persist_dir, compressor, stored) from None
    finally:
        logging.getLogger("lloco_index.store").removeFilter(quiet)
    total = len(index.ref_doc_info)
    new = len(set(store.ids()) - stored)
    print(f"{len(docs)} documents read, {total - before} added to the index ({total} in all) -> {len(store)} soft "
          f"prompts in {args.persist_dir} (compressor {compressor.fingerprint}): {new} new chunks compressed, "
          f"{len(store) - new} already stored and not recompressed")


class _DropStoreInterruptNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("interrupted:")


def _compress_interrupted(persist_dir: Path, compressor, stored: set) -> KeyboardInterrupt:
    """The line a Ctrl-C during ``compress`` ends with: how many chunks are safe on disk, and how to go on."""
    from .errors import Interrupted
    from .store import SoftPromptStore

    try:
        now = set(SoftPromptStore.open(persist_dir, compressor).ids())
    except Exception:  # the line must not fail: without a count it still says how to go on
        return Interrupted(f"interrupted: the chunks compressed so far are stored in {persist_dir}; run the same "
                           f"command again to go on (stored chunks are not compressed again).")
    return Interrupted(
        f"interrupted: {len(now - stored)} new chunks compressed and stored in {persist_dir} ({len(now)} in all), the "
        f"index not written yet; run the same command again to go on (stored chunks are not compressed again).")


def _indexed_documents(persist_dir: Path) -> int:
    """How many documents the persist dir's docstore already has (0 when there is none yet)."""
    import json

    path = persist_dir / "docstore.json"
    if not path.is_file():
        return 0
    try:
        return len(json.loads(path.read_text()).get("docstore/ref_doc_info", {}))
    except (ValueError, AttributeError):
        return 0  # build_index reports a damaged docstore precisely


def _check_query_args(args: argparse.Namespace) -> None:
    from .errors import InputError

    if not args.question.strip():
        raise InputError("The question is empty. Pass the question to answer as the second argument, in quotes.")
    if args.top_k < 1:
        raise InputError(f"--top-k must be at least 1 (got {args.top_k}): it is how many chunks to retrieve.")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens}): it bounds the answer's length.")
    _check_expand_top_k(args.expand_top_k)
    if not args.persist_dir.is_dir():
        raise InputError(
            f"No persist dir at '{args.persist_dir}'. Build it first: `lloco-index compress DIR --persist-dir "
            f"{args.persist_dir}`."
        )


def _query(args: argparse.Namespace) -> None:
    from .llamaindex import LLoCOLLM, LLoCOQueryEngine, load_index
    from .llamaindex.node_keys import EXPANDED_KEY, ID_KEY

    _check_query_args(args)
    index, store, compressor = load_index(args.persist_dir)
    llm = LLoCOLLM(compressor, store, max_new_tokens=args.max_new_tokens, adapter=args.adapter_name if args.adapter else "auto")
    if args.adapter:
        llm.load_adapter(args.adapter, args.adapter_name)
    engine = LLoCOQueryEngine.from_index(index, llm, response_mode=args.mode, similarity_top_k=args.top_k,
                                         expand_top_k=args.expand_top_k, policy=args.policy)
    response = engine.query(args.question)
    print(str(response).strip())
    for n in sorted(response.source_nodes, key=lambda n: -(n.score or 0.0)):
        prompt_id = n.node.metadata[ID_KEY]
        form = (f"as text ({llm.count_positions(n.node.text)} positions)" if n.node.metadata.get(EXPANDED_KEY)
                else f"as soft prompt {prompt_id} ({store.num_positions(prompt_id)} positions)")
        print(f"  [{n.score:.3f}] {n.node.metadata.get('file_name', '')} {form}: {n.node.text[:80]!r}...")


def _precision(args: argparse.Namespace) -> None:
    from .models import select_device
    from .precision import describe

    print(describe(select_device()))


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
    p.add_argument("--expand-top-k", type=int, default=defaults.DEFAULT_EXPAND_TOP_K,
                   help="retrieved chunks the hybrid answer reads as text (default: %(default)s)")
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
    p.add_argument("--expand-top-k", type=int, default=defaults.DEFAULT_EXPAND_TOP_K,
                   help="best retrieved chunks read as text, the rest as soft prompts; 0: soft prompts only")
    p.add_argument("--policy", default=defaults.DEFAULT_EXPANSION_POLICY, choices=POLICIES,
                   help="which chunks to expand: the retriever's ranking (score), the question's words in the chunks "
                        "(lexical) or the decoder's likelihood of the question")
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
    p = add("precision", "print the compute precision this machine uses, and why")
    p.set_defaults(func=_precision)
    for p in sub.choices.values():
        p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16"],
                       help=f"compute precision (default: ${defaults.DTYPE_ENV} or auto: bf16 autocast only on CPUs "
                            f"with AMX/AVX512-BF16 and on GPUs; see `lloco-index precision`)")
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
    from .precision import set_precision

    set_precision(args.dtype)
    try:
        args.func(args)
    except LLoCOError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        from .errors import Interrupted

        line = str(exc) if isinstance(exc, Interrupted) and str(exc) else (
            "interrupted: the finished work is saved; run the same command again to resume where it stopped.")
        print(line, file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
