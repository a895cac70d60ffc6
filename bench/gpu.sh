#!/usr/bin/env bash
# Generation throughput on a GPU machine with torch + transformers + peft + accelerate only
# (no trl / lm-eval / alpaca-eval / bitsandbytes, no model hub, no package index):
# harness.generate vs plain Hugging Face generate on a randomly initialised model with the
# shape of Qwen2.5-0.5B (bfloat16 on cuda), greedy and sampled, batch 1 and 32, with
# tokens/s against the memory-bandwidth bound, then plain HF greedy decoding with a static KV
# cache (compiled by transformers on CUDA) against the dynamic one. The harness is used from
# this checkout (PYTHONPATH), not installed. With a vLLM environment present it then compares
# the generate stage's engines (bench_generate.py --engines hf,vllm).
#
#   bench/gpu.sh                                # H100 SXM bound (3.35e12 B/s)
#   bench/gpu.sh --bandwidth 4.8e12             # H200
#   PYTHON=.venv/bin/python bench/gpu.sh --random-shape small --device cpu --prompts 8 \
#       --prompts-b1 1 --max-new-tokens 4 --repeats 1   # the same path, tiny, on a CPU
#
# Options after the script name go to bench/bench_generate.py and override the defaults here.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
PY="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'
"$PY" bench/bench_generate.py --model qwen0.5b-random --prompts 64 --prompts-b1 4 \
  --max-new-tokens 128 --repeats 2 --static-cache "$@"
# The generate stage's engines, when a vLLM environment is present (./install.sh --vllm, or
# HARNESS_VLLM_PYTHON naming its Python): harness.generate vs vLLM serving the same weights.
VLLM_PY="${HARNESS_VLLM_PYTHON:-$PWD/.venv-vllm/bin/python}"
if [ -x "$VLLM_PY" ]; then
  "$PY" bench/bench_generate.py --model qwen0.5b-random --prompts 64 --prompts-b1 4 \
    --max-new-tokens 128 --repeats 2 --engines hf,vllm "$@"
else
  echo "no vLLM environment at $VLLM_PY: engine comparison skipped (./install.sh --vllm)"
fi
