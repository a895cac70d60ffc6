#!/usr/bin/env bash
# The one prepared device check: does a harness run work on this GPU, and how fast and large is
# it. For a GPU machine that has torch, transformers, peft, accelerate, pandas and pyarrow but no
# package index and none of trl, datasets, lm-eval, alpaca-eval, bitsandbytes or vLLM:
#
#   bench/gpu_wheels.sh      # once, where a package index is reachable: bench/wheels/ (about 38 MB)
#   bench/gpu.sh             # on the GPU machine, from the repository root, bench/wheels/ beside it
#   PYTHON=.venv/bin/python bench/gpu.sh --cpu   # the same steps on a CPU, small shapes
#
# 1. the device's name picks the memory bandwidth of the generation bound (H100 SXM 3.35 TB/s,
#    H100 PCIe 2.0, H100 NVL 3.9, H200 4.8, A100 80GB SXM 2.039 / PCIe 1.935, A100 40GB 1.555,
#    L40S 0.864, L4 0.3, A10G 0.6); any other device prints "bound unknown";
# 2. every wheel of bench/wheels whose module is missing is unpacked into a temporary folder on
#    PYTHONPATH (nothing is installed into the machine's environment);
# 3. one iteration of each method (SPIN, Self-Rewarding, DNO; bench/bench_stages.py --no-evals:
#    indicators, no lm-eval, no AlpacaEval) on a random model of Qwen2.5-0.5B's shape and then on
#    the tiny world, every stage on the device, printing per-stage times and peak memory
#    (CUDA's max allocated on a GPU);
# 4. generation throughput, harness vs plain Hugging Face generate, against the bound
#    (bench/bench_generate.py, static KV cache included), and vLLM's engine when .venv-vllm exists.
# A hard time limit holds all of it under 8 minutes (GPU_BENCH_LIMIT_S, default 470 s): the
# script re-runs itself under `timeout`, and each step gets at most its budget of what is left,
# so a hung step is cut and the next still runs. The exit status is 1 when a step failed or was
# cut; every step says so on its "== step" line.
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT_S="${GPU_BENCH_LIMIT_S:-470}"
if [ -z "${GPU_BENCH_INNER:-}" ]; then
  export GPU_BENCH_INNER=1
  exec timeout -k 10 "$LIMIT_S" bash "$0" "$@"
fi

DEVICE=cuda SHAPE=full
for arg in "$@"; do
  case "$arg" in
    --cpu) DEVICE=cpu SHAPE=small ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg (usage: $0 [--cpu])" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
FAILED=0

left() { echo $(( LIMIT_S - 15 - SECONDS )); }

# step NAME BUDGET_S CMD...: run CMD with at most BUDGET_S seconds (less if less is left)
step() {
  local name="$1" budget="$2" t rc start=$SECONDS
  shift 2
  t=$(left)
  [ "$budget" -lt "$t" ] && t=$budget
  if [ "$t" -lt 10 ]; then
    echo "== $name: skipped, the time limit is reached"; FAILED=1; return
  fi
  echo "== $name (at most ${t} s)"
  timeout -k 5 "$t" "$@"
  rc=$?
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    echo "== $name: cut at its time limit after $((SECONDS - start)) s"; FAILED=1
  elif [ $rc != 0 ]; then
    echo "== $name: failed (exit $rc) after $((SECONDS - start)) s"; FAILED=1
  else
    echo "== $name: done in $((SECONDS - start)) s"
  fi
}

# 1. the device and its bandwidth
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
if [ "$DEVICE" = cuda ]; then
  NAME="$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")')"
  [ -n "$NAME" ] || { echo "error: torch sees no CUDA device (bench/gpu.sh --cpu runs the CPU form)" >&2; exit 1; }
else
  NAME=cpu
fi
case "$NAME" in
  *GH200*) BW=0 ;;                          # 96 GB HBM3 or 144 GB HBM3e: the name does not say which
  *H200*) BW=4.8e12 ;;
  *H100*PCIe*|*H100*PCIE*) BW=2.0e12 ;;
  *H100*NVL*) BW=3.9e12 ;;
  *H100*) BW=3.35e12 ;;                     # "NVIDIA H100 80GB HBM3": the SXM card
  *A100*80GB*PCIe*|*A100*PCIE*80GB*) BW=1.935e12 ;;
  *A100*80GB*) BW=2.039e12 ;;
  *A100*) BW=1.555e12 ;;
  *L40S*) BW=0.864e12 ;;
  *A10G*) BW=0.6e12 ;;
  *L4) BW=0.3e12 ;;
  *) BW=0 ;;
esac
if [ "$BW" = 0 ]; then echo "device: $NAME: bound unknown"; else echo "device: $NAME: bandwidth $BW B/s"; fi

# 2. the wheels this machine lacks, unpacked onto PYTHONPATH
SITE="$WORK/site"
mkdir -p "$SITE"
# (module = wheel name for each; found without importing them)
MISSING="$("$PY" -c 'import importlib.util as u, sys; print(*[m for m in sys.argv[1:] if u.find_spec(m) is None])' \
  trl datasets dill multiprocess xxhash scipy fsspec tabulate)"
for mod in $MISSING; do
  files=(bench/wheels/"$mod"-*.whl)
  if [ ! -f "${files[0]}" ]; then
    echo "error: $mod is not installed and bench/wheels has no $mod wheel (run bench/gpu_wheels.sh)" >&2; exit 1
  fi
  "$PY" -m zipfile -e "${files[0]}" "$SITE" && echo "unpacked $(basename "${files[0]}")"
done
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF' || { echo "error: the harness cannot be imported for a run (above)" >&2; exit 1; }
import sys
import torch, transformers, peft, trl, datasets, scipy
import harness.cli, harness.run.loop, harness.train.trainer  # what a run imports
print(f"python {sys.version.split()[0]} torch {torch.__version__} transformers {transformers.__version__} "
      f"peft {peft.__version__} trl {trl.__version__} datasets {datasets.__version__} "
      f"cuda {torch.cuda.is_available()}")
EOF

# 3. one iteration of each method, per-stage times and peak memory
if [ "$DEVICE" = cuda ]; then SIZE=(--prompts 32 --samples 4 --eval-n 16); else SIZE=(--prompts 8 --samples 2 --eval-n 4); fi
step "methods on a random model of Qwen2.5-0.5B's shape ($SHAPE)" 200 \
  "$PY" bench/bench_stages.py --model qwen0.5b-random --shape "$SHAPE" --device "$DEVICE" --no-evals "${SIZE[@]}"
step "methods on the tiny world" 120 \
  "$PY" bench/bench_stages.py --model tiny --device "$DEVICE" --no-evals "${SIZE[@]}"

# 4. generation throughput against the bound
if [ "$DEVICE" = cuda ]; then
  GEN=(--prompts 64 --prompts-b1 4 --max-new-tokens 128 --repeats 2)
else
  GEN=(--random-shape small --device cpu --prompts 8 --prompts-b1 1 --max-new-tokens 4 --repeats 1)
fi
step "generation throughput" 120 \
  "$PY" bench/bench_generate.py --model qwen0.5b-random --bandwidth "$BW" --static-cache "${GEN[@]}"
VLLM_PY="${HARNESS_VLLM_PYTHON:-$PWD/.venv-vllm/bin/python}"
if [ -x "$VLLM_PY" ]; then
  step "generation engines (hf, vllm)" 150 \
    "$PY" bench/bench_generate.py --model qwen0.5b-random --bandwidth "$BW" --engines hf,vllm "${GEN[@]}"
else
  echo "no vLLM environment at $VLLM_PY: engine comparison skipped (./install.sh --vllm)"
fi
echo "bench/gpu.sh: ${SECONDS} s in all (limit $LIMIT_S s)"
exit $FAILED
