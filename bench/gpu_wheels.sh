#!/usr/bin/env bash
# The wheels bench/gpu.sh brings to a GPU machine that has torch, transformers, peft, accelerate,
# pandas and pyarrow but no package index: what a harness run imports beyond those when it runs
# no lm-eval and no AlpacaEval evaluation (trl for training, datasets and its own needs that
# trl imports, scipy for the paired statistics of harness.evaluate.outcomes, and small pure-Python
# packages that such a machine may lack). Pinned as in requirements.lock; --no-deps: only these.
# Downloaded into bench/wheels/ (kept out of version control by its own .gitignore), about 38 MB.
#
#   bench/gpu_wheels.sh                       # for this machine's Python (x86-64 Linux)
#   bench/gpu_wheels.sh --python-version 3.12 # for another Python on the GPU machine
#
# bench/gpu.sh extracts each wheel whose module is missing there; a binary wheel built for
# another Python is reported there, not silently skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PYV="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYV="$2"; shift 2 ;;
    *) echo "unknown option: $1 (usage: $0 [--python-version X.Y])" >&2; exit 2 ;;
  esac
done
PKGS="trl datasets dill multiprocess xxhash scipy fsspec tabulate"
pins=()
for p in $PKGS; do
  pin=$(grep -i "^$p==" requirements.lock) || { echo "error: $p is not pinned in requirements.lock" >&2; exit 1; }
  pins+=("$pin")
done
mkdir -p bench/wheels
[ -f bench/wheels/.gitignore ] || echo '*' > bench/wheels/.gitignore
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PYV" --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 -d bench/wheels "${pins[@]}"
ls -1 bench/wheels/*.whl
echo "bench/wheels: $(du -cb bench/wheels/*.whl | tail -1 | cut -f1) bytes for Python $PYV"
