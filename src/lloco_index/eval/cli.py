"""``lloco-index bench``: argument definitions and the entry point the main CLI hooks in.

>>> parser = argparse.ArgumentParser(); add_bench_arguments(parser); run_bench(parser.parse_args(["--suite", "quick"]))

Usage::

    lloco-index bench --suite quick                         # minutes on a CPU
    lloco-index bench --suite full --compressor-dir runs/compressor --adapter runs/reader
    lloco-index bench --suite quick --compressors icae-untrained token_embedding --systems rag lloco
"""

from __future__ import annotations

import argparse

from .. import defaults
from ..selection import POLICIES
from .runner import SUITES
from .systems import BASE_SYSTEMS


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick", help="quick: minutes (CI smoke); full: the real run")
    parser.add_argument("--data-dir", default=None, help=f"shared data directory (default ${defaults.DATA_DIR_ENV} or ../shared/data)")
    parser.add_argument("--out-dir", default="docs/benchmarks", help="where results JSONL, markdown and plots go")
    parser.add_argument("--compressor-dir", default=None,
                        help="compressor under test (default: the shipped one, else an untrained ICAE control)")
    parser.add_argument("--compressors", nargs="+", default=None,
                        help="explicit compressor list: directories, 'default', 'token_embedding', 'icae-untrained'")
    parser.add_argument("--adapter", default=None, help="finetuned LoRA adapter directory: adds the lloco+adapter system")
    parser.add_argument("--decoder", default=None, help="local Hugging Face decoder directory (default: embedded SmolLM2)")
    parser.add_argument("--systems", nargs="+", choices=list(BASE_SYSTEMS), default=None, help="subset of systems")
    parser.add_argument("--datasets", nargs="+", choices=["squad", "quality", "needle"], default=None, help="subset of data sets (default: the suite's)")
    parser.add_argument("--top-k", type=int, default=defaults.DEFAULT_TOP_K, help="retrieved chunks for rag/llmlingua/lloco")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="longest answer (default: per data set)")
    parser.add_argument("--llmlingua-rate", type=float, default=None, help="default: slots / segment length of the compressor")
    parser.add_argument("--peer-max-examples", type=int, default=-1,
                        help="LLMLingua examples per dataset (-1: the suite's own limit; 0 or more: that many)")
    parser.add_argument("--needle-lengths", type=int, nargs="+", default=None, help="needle haystack lengths in tokens (default: the suite's)")
    parser.add_argument("--needle-depths", type=float, nargs="+", default=None, help="needle depths in [0, 1] (default: the suite's)")
    parser.add_argument("--max-questions", type=int, default=None, help="SQuAD questions per article (default: the suite's)")
    parser.add_argument("--expand-top-k", type=int, nargs="+", default=[],
                        help="add hybrid<n> systems: the lloco systems with the n best chunks read as text")
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=[],
                        help="expansion policies for the hybrid systems (default: the package's; with several, "
                             "hybrid<n>-<policy> for each)")
    parser.add_argument("--rag-top-k", type=int, nargs="+", default=[],
                        help="add rag_top<n> systems: text RAG on the n best chunks (with rag in --systems)")
    parser.add_argument("--rag-cut", action="store_true",
                        help="add rag_cut<n> systems: text RAG cut to the positions hybrid<n> read on the same question")
    parser.add_argument("--same-reader", action="store_true",
                        help="text systems (closed book, full context, text RAG) read with the reader adapter of the "
                             "compressor under test, as the lloco systems do; their names end in +reader")
    parser.add_argument("--tag", default=None, help="name of the result files (default: the suite)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plots from an existing results file")
    return parser


def run_bench(args: argparse.Namespace) -> dict:
    """Run the benchmark the parsed arguments describe and print where the outputs are."""
    if args.report_only:
        from pathlib import Path

        from .report import write_report

        tag = args.tag or args.suite
        summary = write_report(Path(args.out_dir) / f"results-{tag}.jsonl", args.out_dir, tag)
    else:
        import dataclasses

        from .runner import SUITES, run_benchmark

        spec = SUITES[args.suite]
        needle = dict(spec.needle or {})
        needle.update({k: v for k, v in (("lengths", args.needle_lengths), ("depths", args.needle_depths)) if v})
        squad = dict(spec.squad or {}, **({"max_questions": args.max_questions} if args.max_questions else {}))
        overridden = needle != (spec.needle or {}) or squad != (spec.squad or {})
        spec = dataclasses.replace(spec, needle=needle or spec.needle, squad=squad or spec.squad)
        summary = run_benchmark(
            suite=spec if overridden else args.suite, data_dir=args.data_dir, out_dir=args.out_dir, compressor_dir=args.compressor_dir,
            adapter=args.adapter, compressors=args.compressors, systems=args.systems, datasets=args.datasets,
            decoder=args.decoder, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
            llmlingua_rate=args.llmlingua_rate, peer_max_examples=args.peer_max_examples,
            tag=args.tag or (args.suite if not overridden else f"{args.suite}-custom"), expand_top_k=args.expand_top_k,
            rag_top_k=args.rag_top_k, rag_cut=args.rag_cut, same_reader=args.same_reader, policies=args.policies,
        )
    for key in ("results", "table"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    for plot in summary.get("plots", []):
        print(f"plot: {plot}")
    return summary


def main(argv=None) -> None:
    """``python -m lloco_index.eval.cli --suite quick`` (same as ``lloco-index bench``)."""
    parser = argparse.ArgumentParser(prog="lloco-index bench", description="Side-by-side long-document QA benchmarks")
    run_bench(add_bench_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    main()
