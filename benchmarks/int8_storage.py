"""Cost and accuracy of int8 soft-prompt storage vs the compressor's own dtype, on SQuAD test questions.

The same paragraphs are compressed once and stored twice (unquantized, and ``int8-absmax-row``);
each question is answered greedily from each store and its gold answer scored (mean token
log-likelihood, teacher-forced). Reported: bytes per source token on disk, relative error of the
stored vectors, EM/F1 of both, how many answers are identical, and the mean absolute change in
gold-answer log-likelihood.

Usage (never run in tests)::

    nice -n 10 .venv/bin/python benchmarks/int8_storage.py                        # shipped compressor, else identity
    .venv/bin/python benchmarks/int8_storage.py --compressor runs/compressor --questions 48

Writes ``docs/benchmarks/int8_storage.json`` and ``int8_storage.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from lloco_index import defaults
from lloco_index.backbone import Backbone
from lloco_index.generation import SoftPromptReader, make_placeholder
from lloco_index.storage.quantization import INT8_ROWWISE
from lloco_index.store import SoftPromptStore


def normalize(text: str) -> str:
    """SQuAD's official answer normalisation."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, truth: str) -> float:
    p, t = normalize(prediction).split(), normalize(truth).split()
    common = sum((Counter(p) & Counter(t)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def squad_items(path: Path, n: int) -> list[dict]:
    out = []
    for article in json.loads(path.read_text())["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"][:1]:
                out.append({"context": para["context"], "question": qa["question"],
                            "answers": [a["text"] for a in qa["answers"]]})
            if len(out) == n:
                return out
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(defaults.data_dir() / "squad" / "test.json"))
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--compressor", default=None, help="compressor dir (default: shipped, else identity)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default="docs/benchmarks")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from batching import load_compressor_for_bench  # same compressor choice as the batching benchmark

    backbone = Backbone.load()
    compressor = load_compressor_for_bench(backbone, args.compressor)
    items = squad_items(Path(args.data), args.questions)
    contexts = list(dict.fromkeys(i["context"] for i in items))
    source_tokens = sum(len(backbone.tokenize(c)) for c in contexts)
    start = time.perf_counter()
    prompts = compressor.compress(contexts)
    compress_s = time.perf_counter() - start

    report: dict = {"model": backbone.identity, "compressor": compressor.config.mode,
                    "storage_dtype": compressor.config.storage_dtype, "hidden_size": backbone.hidden_size,
                    "questions": len(items), "paragraphs": len(contexts), "source_tokens": source_tokens,
                    "soft_positions": sum(int(p.shape[0]) for p in prompts), "compress_s": round(compress_s, 1),
                    "schemes": {}}
    answers: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in (None, INT8_ROWWISE):
            name = scheme or "unquantized"
            store = SoftPromptStore.open(Path(tmp) / name, compressor, quantization=scheme)
            ids = [store.make_id(c) for c in contexts]
            store.put(dict(zip(ids, prompts)))
            store = SoftPromptStore.open(Path(tmp) / name, compressor)  # read back from disk
            by_context = dict(zip(contexts, ids))
            errors = [float((store.get(i).float() - p.float()).norm() / p.float().norm()) for i, p in zip(ids, prompts)]
            reader = SoftPromptReader(backbone, store, compressor=compressor, max_new_tokens=args.max_new_tokens)
            messages = [[{"role": "user", "content": f"Context: {make_placeholder(by_context[i['context']])}\n\n"
                                                     f"Question: {i['question']}\nAnswer in a few words."}] for i in items]
            results = reader.generate_batch(messages, batch_size=8)
            gold_ll = [reader.score_options(m, [i["answers"][0]])[0] for m, i in zip(messages, items)]
            texts = [r.text.split("\n")[0] for r in results]
            answers[name] = {"texts": texts, "gold_ll": gold_ll}
            total = store.storage_bytes()
            report["schemes"][name] = {
                "shard_bytes": total, "bytes_per_source_token": round(total / source_tokens, 1),
                "bytes_per_soft_position": round(total / report["soft_positions"], 1),
                "relative_vector_error_mean": round(sum(errors) / len(errors), 5),
                "em": round(sum(max(normalize(t) == normalize(a) for a in i["answers"]) for t, i in zip(texts, items)) / len(items), 3),
                "f1": round(sum(max(f1(t, a) for a in i["answers"]) for t, i in zip(texts, items)) / len(items), 3),
                "gold_loglik_mean": round(sum(gold_ll) / len(gold_ll), 4),
            }
            print(name, json.dumps(report["schemes"][name]), flush=True)
    base, q = answers["unquantized"], answers[INT8_ROWWISE]
    report["identical_answers"] = sum(a == b for a, b in zip(base["texts"], q["texts"]))
    report["gold_loglik_abs_change_mean"] = round(sum(abs(a - b) for a, b in zip(base["gold_ll"], q["gold_ll"])) / len(items), 5)
    report["size_ratio_int8"] = round(report["schemes"][INT8_ROWWISE]["shard_bytes"] / report["schemes"]["unquantized"]["shard_bytes"], 3)
    report["examples"] = [{"question": i["question"], "gold": i["answers"][0], "unquantized": a, "int8": b}
                          for i, a, b in list(zip(items, base["texts"], q["texts"]))[:5]]
    try:
        report["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8_storage.json").write_text(json.dumps(report, indent=2))
    u, i8 = report["schemes"]["unquantized"], report["schemes"][INT8_ROWWISE]
    md = [f"# int8 soft-prompt storage: {report['model']}, {report['compressor']} compressor ({report['storage_dtype']})", "",
          f"{len(items)} SQuAD test questions over {len(contexts)} paragraphs ({source_tokens} source tokens, "
          f"{report['soft_positions']} soft-prompt positions), greedy, up to {args.max_new_tokens} new tokens.", "",
          "| storage | bytes / source token | bytes / soft position | rel. vector error | EM | F1 | gold log-lik |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
          f"| {report['storage_dtype']} | {u['bytes_per_source_token']} | {u['bytes_per_soft_position']} | 0 | {u['em']} | {u['f1']} | {u['gold_loglik_mean']} |",
          f"| int8 + fp32 row scale | {i8['bytes_per_source_token']} | {i8['bytes_per_soft_position']} | "
          f"{i8['relative_vector_error_mean']} | {i8['em']} | {i8['f1']} | {i8['gold_loglik_mean']} |", "",
          f"Identical answers: {report['identical_answers']}/{len(items)}; mean |change| of the gold answer's "
          f"log-likelihood: {report['gold_loglik_abs_change_mean']}; int8 shards are {report['size_ratio_int8']}x the size.", "",
          f"Command: `benchmarks/int8_storage.py {' '.join(argv if argv is not None else os.sys.argv[1:])}`", ""]
    (out / "int8_storage.md").write_text("\n".join(md))
    return report


if __name__ == "__main__":
    main()
