"""lm-eval through vLLM (``[eval] backend = "vllm"``): lm-eval's own vLLM model class
(``lm_eval.models.vllm_causallms.VLLM``) in ``.venv-vllm`` (``./install.sh --vllm`` installs
lm-eval there at .venv's pin), run as a subprocess (``lm_eval_vllm_worker.py``): the harness's
environment cannot import vLLM.

- The policy is served as the vLLM generation engine serves it (``export_served`` under
  ``[generation] vllm_weights``): merged weights (``pretrained`` = that directory), or the base
  in the run's dtype plus the iteration's adapter through lm-eval's ``lora_local_path`` (with
  ``max_lora_rank`` the adapter's). The harness's tokenizer, chat template included, is saved
  to a temporary directory for lm-eval's ``tokenizer`` argument (the served directories hold
  weights and config only).
- lm-eval gets what ``run_lm_eval`` gives the HF model class: the same task specs, per-task
  shots (``lm_eval_shots``), limit, chat template, multi-turn few-shot, system instruction and
  seeds (lm-eval's defaults unless ``seed`` is given; vLLM's own seed is then ``seed`` too,
  else lm-eval's default 1234). vLLM's settings (``vllm_model_args``): the served dtype,
  ``max_num_seqs`` = ``[generation] vllm_max_num_seqs``, every request handed to vLLM at once
  (lm-eval's ``batch_size`` "auto", but one at a time for an adapter on a CPU: ``batch_size``;
  ``eval.batch_size`` bounds the HF backend only), the model's own context length (lm-eval's
  default), and, as the generation engine runs vLLM, eager mode and a fixed KV-cache budget on
  a CPU, its share of the GPU on CUDA. So the
  numbers equal ``lm_eval --model vllm --model_args <those> --batch_size <that>`` with the same
  task flags (tests/test_vllm.py), and may differ slightly from the HF backend's: the
  protocol records ``backend = "vllm"``, so tables never rank the two together.
- Files and metrics are ``run_lm_eval``'s (``write_results``), plus ``vllm.log``, the worker's
  output. A worker that fails raises ``WorkerError`` whose first line names its exception(s).
  Each evaluation starts one engine (``cost/engine_starts``); a CUDA model waits on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from harness.store import cost
from harness.config.eval_sections import EvalSection
from harness.engines import venv_python
from harness.engines.vllm_weights import Served, export_served, weights_mode
from harness.engines.vllm_client import CPU_KV_GIB, GPU_MEMORY_UTILIZATION, WorkerError, worker_failure
from harness.models.load import off_gpu
from harness.engines.vllm_support import lm_eval_unavailable
from harness.lifeline import spawn, stop_group

from .lm_eval_adapter import _check_names, _index_manager, resolve_task_specs, write_results

WORKER = Path(__file__).with_name("lm_eval_vllm_worker.py")
VLLM_DEFAULT_SEED = 1234  # lm_eval.models.vllm_causallms.VLLM's own default


def vllm_model_args(served: Served, tokenizer_dir: Path | str, *, seed: int | None = None,
                    max_num_seqs: int = 256, gpu: bool | None = None) -> dict:
    """lm-eval's ``VLLM`` arguments for ``served`` (its ``--model_args``)."""
    gpu = torch.cuda.is_available() if gpu is None else gpu
    args = {"pretrained": str(served.model_dir), "tokenizer": str(tokenizer_dir), "dtype": served.dtype,
            "seed": VLLM_DEFAULT_SEED if seed is None else int(seed), "max_num_seqs": int(max_num_seqs),
            # as the generation engine: no torch.compile on a CPU (minutes per start), a fixed KV budget there
            "enforce_eager": not gpu}
    if gpu:
        args["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
    else:
        args["kv_cache_memory_bytes"] = int(CPU_KV_GIB * 2**30)
    if served.adapter is not None:
        args.update(lora_local_path=str(served.adapter), max_lora_rank=served.rank)
    return args


def batch_size(served: Served, gpu: bool | None = None) -> str | int:
    """lm-eval's ``batch_size`` for ``served``: "auto" (every request to vLLM at once), but 1 for
    an adapter served on a CPU: vLLM's CPU LoRA path fails on two requests with prompt log-probs in
    one step (an einsum of mismatched shapes; measured with ``lm_eval --model vllm`` and
    ``lora_local_path`` on a multiple-choice task), so lm-eval then sends one request at a time."""
    gpu = torch.cuda.is_available() if gpu is None else gpu
    return 1 if served.adapter is not None and not gpu else "auto"


def run_lm_eval_vllm(model, tokenizer, section: EvalSection, out_dir: Path, *, weights: str = "auto",
                     max_num_seqs: int = 256, seed: int | None = None, system_prompt: str = "",
                     where: str = "eval.num_fewshot") -> dict[str, float | None]:
    """``run_lm_eval`` through lm-eval's vLLM model class (see the module docstring);
    ``weights``, ``max_num_seqs``: ``[generation] vllm_weights`` and ``vllm_max_num_seqs``."""
    if not section.lm_eval_tasks:
        return {}
    why = lm_eval_unavailable()
    if why:
        raise WorkerError(f"eval.backend = \"vllm\": {why}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs, include, builtin = resolve_task_specs(section.lm_eval_tasks)
    _check_names(specs, _index_manager(tuple(include), builtin).all_tasks)  # before any engine starts
    shots = section.num_fewshot
    multiturn = section.apply_chat_template  # as the lm_eval command line (and run_lm_eval)
    with off_gpu(model), tempfile.TemporaryDirectory(prefix="lm-eval-vllm-") as tmp:
        served = export_served(model, weights_mode(weights, model))
        tokenizer.save_pretrained(Path(tmp) / "tokenizer")
        seeds = {} if seed is None else dict(random_seed=seed, numpy_random_seed=seed,
                                             torch_random_seed=seed, fewshot_random_seed=seed)
        job = {"tasks": specs, "include": include, "builtin": builtin, "shots": shots, "where": where,
               "limit": section.limit or None, "batch_size": batch_size(served),
               "apply_chat_template": section.apply_chat_template, "fewshot_as_multiturn": multiturn,
               # the experiment's system message (data.system_prompt), as in generation and training
               "system_instruction": system_prompt or None, "seeds": seeds,
               "model_args": vllm_model_args(served, Path(tmp) / "tokenizer", seed=seed, max_num_seqs=max_num_seqs),
               "out": str(Path(tmp) / "results.json")}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        results = _run_worker(Path(tmp) / "job.json", Path(job["out"]), out_dir / "vllm.log")
    return write_results(results, out_dir, apply_chat_template=section.apply_chat_template,
                         fewshot_as_multiturn=multiturn, system_instruction=system_prompt, backend="vllm")


def _run_worker(job: Path, out: Path, log_path: Path) -> dict:
    """Run the worker on ``job``, its output in ``log_path``; lm-eval's results dict, or
    ``WorkerError`` naming what the log says went wrong. The worker's process group (vLLM's
    engine processes) ends with it, and with this process."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the vLLM environment's own packages, never .venv's
    cost.add(engine_starts=1)
    with open(log_path, "wb") as log:
        proc = spawn([str(venv_python()), str(WORKER), str(job)], stdin=subprocess.DEVNULL, stdout=log,
                     stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait()
        finally:
            stop_group(proc)
    if rc != 0 or not out.exists():
        tail = log_path.read_bytes()[-4000:].decode(errors="replace")
        raise WorkerError(f"lm-eval through vLLM failed (rc={rc}): {worker_failure(tail)}; its log: {log_path}")
    return json.loads(out.read_text())
