#!/usr/bin/env bash
# Quick start 2/2: install, then run the test suite (unit tests on tiny models + SmolLM2 integration tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
