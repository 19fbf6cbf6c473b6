"""LLMLingua peer worker: runs inside its own virtual environment, never imported by lloco_index.

llmlingua 0.2.2 needs transformers 4.x (it breaks on 5.x's past_key_values handling), so the harness
starts this file with the Python of a separate environment (``benchmarks/setup_llmlingua_env.sh``)
and talks to it over JSON lines. It uses only the standard library and llmlingua.

Protocol (one JSON object per line)::

    stdin  -> {"model_dir": "...", "device": "cpu"}                       # first line: load
    stdout <- {"ready": true, "load_s": 3.1, "llmlingua": "0.2.2", "transformers": "4.47.1"}
    stdin  -> {"context": ["chunk", ...], "question": "...", "rate": 0.125}
    stdout <- {"compressed_prompt": "...", "origin_tokens": 1199, "compressed_tokens": 301,
               "compress_s": 56.0, "peak_rss_mb": 900.0}
    stdin  -> EOF                                                            # exit

Usage by hand: ``$LLMLINGUA_VENV/bin/python llmlingua_worker.py < requests.jsonl``.
"""

import json
import resource
import sys
import time


def _emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    first = sys.stdin.readline()
    if not first:
        return
    setup = json.loads(first)
    start = time.perf_counter()
    try:
        import transformers
        from llmlingua import PromptCompressor
        import llmlingua

        compressor = PromptCompressor(model_name=setup["model_dir"], device_map=setup.get("device", "cpu"))
    except Exception as exc:  # reported to the harness, which records the peer as skipped
        _emit({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    _emit({
        "ready": True,
        "load_s": time.perf_counter() - start,
        "llmlingua": getattr(llmlingua, "__version__", "0.2.2"),
        "transformers": transformers.__version__,
    })
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            start = time.perf_counter()
            result = compressor.compress_prompt(
                request["context"],
                instruction=request.get("instruction", ""),
                question=request.get("question", ""),
                rate=float(request["rate"]),
            )
            elapsed = time.perf_counter() - start
            _emit({
                "compressed_prompt": result["compressed_prompt"],
                "origin_tokens": result.get("origin_tokens"),
                "compressed_tokens": result.get("compressed_tokens"),
                "compress_s": elapsed,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            })
        except Exception as exc:
            _emit({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
