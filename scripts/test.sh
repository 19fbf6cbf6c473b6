#!/usr/bin/env bash
# Quick start 2/2: install, build the docs strictly (every error message must be documented), then run the
# test suite (unit tests on tiny models + SmolLM2 integration tests). The tutorial notebooks run
# separately: `bash scripts/check_docs.sh` (~6 min more on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CHECK_DOCS_NOTEBOOKS=0 bash scripts/check_docs.sh
exec .venv/bin/python -m pytest -q "$@"
