#!/usr/bin/env bash
# Create the isolated virtual environment in which the LLMLingua peer runs.
#
# llmlingua 0.2.2 breaks under transformers 5.x (its past_key_values handling), so the benchmark
# harness runs it as a subprocess in its own environment with transformers 4.47. Usage:
#
#     bash benchmarks/setup_llmlingua_env.sh     # creates ~/.cache/lloco-index/llmlingua-venv
#     LLMLINGUA_VENV=/somewhere bash benchmarks/setup_llmlingua_env.sh
#
# The harness looks for the environment at $LLMLINGUA_VENV (default: $LLOCO_CACHE_DIR, else
# ~/.cache/lloco-index, + /llmlingua-venv: outside the work tree, like the model cache) and
# skips the peer, saying why, when it is missing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LLOCO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lloco-index}"
venv="${LLMLINGUA_VENV:-$cache/llmlingua-venv}"
python="${PYTHON:-python3}"
main_python="$here/.venv/bin/python"

# Same torch build as the main environment when there is one (e.g. a CPU wheel), else PyPI's.
torch_spec="torch"
if [ -x "$main_python" ]; then
  version="$("$main_python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
  [ -n "$version" ] && torch_spec="torch==$version"
fi

"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "$torch_spec" || "$venv/bin/pip" install --quiet torch
"$venv/bin/pip" install --quiet "llmlingua==0.2.2" "transformers==4.47.1" "accelerate<1.3" safetensors tiktoken nltk
"$venv/bin/python" -c "import llmlingua, transformers; print('llmlingua env ready:', transformers.__version__)"
