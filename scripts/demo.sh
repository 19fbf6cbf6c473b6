#!/usr/bin/env bash
# Quick start 1/2: install, then compress the sample corpus and answer questions over it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lloco-index demo "$@"
