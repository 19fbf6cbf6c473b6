"""Evaluation harness: datasets, metrics, baselines and peers, the benchmark runner.

>>> from lloco_index.eval import run_benchmark
>>> run_benchmark(suite="quick", out_dir="docs/benchmarks")
"""

from .datasets import Benchmark, Document, Example, load_jsonl_qa, load_quality, load_squad, needle_in_a_haystack
from .metrics import (
    choice_accuracy, exact_match, extract_choice_letter, f1_score, loglik_accuracy, normalize_answer,
    normalized_score, rouge_l,
)
from .runner import SUITES, run_benchmark

__all__ = [
    "Benchmark", "Document", "Example", "SUITES", "choice_accuracy", "exact_match", "extract_choice_letter", "f1_score",
    "load_jsonl_qa", "load_quality", "load_squad", "loglik_accuracy", "needle_in_a_haystack", "normalize_answer",
    "normalized_score", "rouge_l", "run_benchmark",
]
