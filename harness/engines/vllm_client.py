"""The vLLM worker process seen from the harness: ``Worker`` starts ``vllm_worker.py`` with the
Python of ``.venv-vllm`` in a process group of its own (``harness.lifeline``), sends it jobs
(generate, score, sleep, wake up) and reads its answers; ``WorkerError`` with the root cause
from its log (``worker_failure``) when it fails. Not here: which weights it serves
(``harness.engines.vllm_weights``) or how a stage's prompts become its requests
(``harness.engines.vllm_engine``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from harness.engines import unavailable, venv_python
from harness.lifeline import spawn, stop_group


WORKER = Path(__file__).with_name("vllm_worker.py")
CPU_KV_GIB = float(os.environ.get("HARNESS_VLLM_CPU_KV_GIB", "2"))  # KV cache on a CPU
GPU_MEMORY_UTILIZATION = float(os.environ.get("HARNESS_VLLM_GPU_MEMORY", "0.85"))  # vLLM's share of the GPU


class WorkerError(RuntimeError):
    pass


# an exception line of a traceback, also behind a log prefix: "(EngineCore pid=7) ValueError: ..."
_EXCEPTION = re.compile(r"(?:^|[\s)\]])((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)(?::\s.*)?)$")


def worker_failure(log: str, most: int = 3) -> str:
    """What a dead worker's log says went wrong, for the first line of its ``WorkerError`` (the
    line the terminal shows): its last ``most`` distinct exception lines in the order they came,
    joined by " -> " (vLLM's engine process prints the root cause, its parent then "Engine core
    initialization failed. See root cause above"); without any, its last non-empty line; "no
    output" for an empty log."""
    lines = [x.strip() for x in log.splitlines() if x.strip()]
    found: list[str] = []
    for x in lines:
        m = _EXCEPTION.search(x)
        if m and m.group(1) not in found:
            found.append(m.group(1))
    if found:
        return " -> ".join(found[-most:])[:2000]
    return lines[-1][:2000] if lines else "no output"


class Worker:
    """vLLM serving ``model_dir`` in a subprocess of the vLLM environment (a context manager)."""

    def __init__(self, model_dir: Path | str, *, dtype: str = "float32", max_num_seqs: int = 32,
                 max_model_len: int = 2048, enforce_eager: bool | None = None, extra: dict | None = None,
                 max_lora_rank: int = 0):
        py = venv_python()
        if not py.exists():
            raise WorkerError(unavailable())
        gpu = torch.cuda.is_available()
        settings = {"model": str(model_dir), "dtype": dtype, "max_num_seqs": max_num_seqs,
                    "max_model_len": max_model_len,
                    # CPU: torch.compile costs minutes per start and its cache does not reload
                    "enforce_eager": (not gpu) if enforce_eager is None else enforce_eager,
                    "extra": dict(extra or {})}
        if max_lora_rank:  # LoRA adapters of at most this rank, one per job (``generate``/``score``'s lora)
            settings["extra"].update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        if gpu:
            settings["extra"].setdefault("gpu_memory_utilization", GPU_MEMORY_UTILIZATION)
        else:
            # CPU: a fixed KV-cache budget; vLLM's default reserves a fraction of all RAM
            settings["extra"].setdefault("kv_cache_memory_bytes", int(CPU_KV_GIB * 2**30))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "VLLM_CONFIGURE_LOGGING": "1"}
        env.pop("PYTHONPATH", None)
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.setdefault(k, "1")
        self.can_sleep = gpu  # vLLM's sleep mode frees the GPU; a CPU engine has nothing to free
        if gpu:
            settings["extra"].setdefault("enable_sleep_mode", True)
        self.sleeping = False
        self.busy = False  # a job's answer is not read to its end (its caller stopped): the worker is unusable
        self._stderr = tempfile.NamedTemporaryFile("w+b", prefix="vllm-worker-", suffix=".log", delete=False)
        t0 = time.perf_counter()
        # its own process group, ended with vLLM's engine processes when the worker or this process dies
        self.proc = spawn([str(py), str(WORKER), json.dumps(settings)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=self._stderr, env=env, text=True, bufsize=1)
        try:
            ready = self._read()
        except BaseException:
            self.close()
            raise
        self.start_s = time.perf_counter() - t0          # process start + engine start
        self.engine_start_s = ready.get("start_s")       # the LLM(...) constructor alone

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, n: int = 4000) -> str:
        self._stderr.flush()
        data = Path(self._stderr.name).read_bytes()
        return data[-n:].decode(errors="replace")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            tail = self.log_tail()
            raise WorkerError(f"the vLLM worker exited (rc={rc}): {worker_failure(tail)}; its log ends:\n{tail}")
        return json.loads(line)

    def _job(self, job: dict) -> Iterator[dict]:
        self.busy = True
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        while True:
            msg = self._read()
            if msg.get("done"):
                self.last_done = msg
                self.busy = False
                return
            yield msg

    def _control(self, op: str, **args) -> None:
        """A job answered by its done line alone (sleep, wake_up, load)."""
        for msg in self._job({"op": op, **args}):
            raise WorkerError(f"the vLLM worker answered {op} with {msg}")

    def load(self, model_dir: Path | str) -> None:
        """Serve the weights of ``model_dir`` (a checkpoint of the same architecture and shapes) in
        place of the current ones: vLLM's in-place ``reload_weights``, about a second where a start
        takes 20 s or more. Awake only."""
        self._control("load", path=str(model_dir))

    def sleep(self) -> None:
        """Free the GPU (vLLM's sleep level 1) until ``wake_up``; nothing where it cannot sleep."""
        if self.can_sleep and not self.sleeping:
            self._control("sleep")
            self.sleeping = True

    def wake_up(self) -> None:
        if self.sleeping:
            self._control("wake_up")
            self.sleeping = False

    def usable(self) -> bool:
        """Alive, and no job's answer left unread."""
        return self.proc.poll() is None and not self.busy

    def generate(self, requests: Sequence[dict], sampling: dict, lora: dict | None = None) -> Iterator[dict]:
        """Raw results ({"key", "token_ids", "finish", "topk"?}) in order of completion; ``lora``:
        the adapter applied to every request (``Served.lora()``; the worker needs max_lora_rank)."""
        return self._job({"op": "generate", "requests": list(requests), "sampling": sampling, "lora": lora})

    def score(self, sequences: dict[str, Sequence[int]], lora: dict | None = None) -> dict[str, list[float]]:
        """{key: [log p(ids[i] | ids[:i]) for i >= 1]} (vLLM's prompt log-probs), with ``lora`` as in ``generate``."""
        return {m["key"]: m["logprobs"] for m in
                self._job({"op": "score", "requests": [{"key": k, "ids": list(v)} for k, v in sequences.items()],
                           "lora": lora})}

    def close(self) -> None:
        p = self.proc
        if p.poll() is None:
            try:
                p.stdin.write(json.dumps({"op": "exit"}) + "\n")
                p.stdin.close()
                p.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                pass
        stop_group(p, grace_s=20)  # the worker and the processes vLLM spawned (its own group)
        for pipe in (p.stdin, p.stdout):  # closed also when the worker had already exited
            with contextlib.suppress(OSError, ValueError):
                pipe.close()
        with contextlib.suppress(OSError):
            self._stderr.close()
            os.unlink(self._stderr.name)
