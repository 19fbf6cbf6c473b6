#!/usr/bin/env bash
# Check the documentation: the generated sections in docs/*.md are up to date, the mkdocs site builds with --strict (broken links, docstring warnings and any
# error message missing from docs/troubleshooting.md fail it), then run every tutorial notebook top to bottom
# with nbmake on the embedded default model. Installs the `docs` extra into .venv if it is missing.
#
#   bash scripts/check_docs.sh                 # both steps
#   CHECK_DOCS_NOTEBOOKS=0 bash scripts/check_docs.sh   # the site only (~20 s)
#   NBMAKE_TIMEOUT=900 bash scripts/check_docs.sh       # per-notebook timeout in seconds (default 900)
#   (each notebook must pass in a third of it on a busy 2-core runner: see docs/tutorials.md, 'Run-time budget')
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  bash scripts/setup.sh
fi
if ! "$PY" -c "import mkdocs, mkdocstrings_handlers.python, mkdocs_jupyter, material, nbmake, nbconvert, ipykernel, matplotlib" 2>/dev/null; then
  "$PY" -m pip install -q -e ".[docs]"
fi

site_dir=$(mktemp -d)
trap 'rm -rf "$site_dir"' EXIT

# The generated sections (CLI reference, defaults, benchmarks, model cards) live in the files too, so that they
# read in the repository; fail when one no longer matches the code.
"$PY" docs/hooks/generated.py --check

start=$(date +%s)
NO_MKDOCS_2_WARNING=1 "$PY" -m mkdocs build --strict --site-dir "$site_dir"
echo "check_docs: mkdocs build --strict passed in $(( $(date +%s) - start ))s"

if [ "${CHECK_DOCS_NOTEBOOKS:-1}" != "0" ]; then
  start=$(date +%s)
  "$PY" -m pytest --nbmake --nbmake-timeout="${NBMAKE_TIMEOUT:-900}" -p no:cacheprovider -q notebooks/
  echo "check_docs: notebooks passed in $(( $(date +%s) - start ))s"
fi
