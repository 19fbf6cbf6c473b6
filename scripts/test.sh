#!/usr/bin/env bash
# Quick start 2/2: install, build the docs strictly (every error message must be documented) and run the
# tutorial notebooks (nbmake, ~6 min on 2 shared cores; budgets in docs/tutorials.md), then run the test suite (unit tests on tiny models +
# SmolLM2 integration tests, ~1-2 min; the Ray Data tests add ~80 s). -rs prints every skip with its
# reason: tests that need a GPU or vLLM skip visibly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/check_docs.sh
exec .venv/bin/python -m pytest -q -rs "$@"
