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
  (``harness.engines.Engines``), another adapter on the same base switched per request; the
  next iterate's merged copy is loaded in place (vLLM's ``reload_weights``: about 1 s for
  SmolLM2 on a CPU, where a start takes 20 s or more) when only its numbered blocks differ
  (``frame_hash``: a tied head does not follow an in-place reload); it restarts for other
  served weights (a judge model, another frame) or other engine settings. A CUDA ``model`` is moved to
  the CPU while a stage uses the engine; between stages the engine sleeps on CUDA
  (``LLM.sleep(level=1)``: weights to host memory, KV cache freed), so the GPU's memory serves
  vLLM and then training; on a CPU it stays up.
"""

from __future__ import annotations

import contextlib
import time
from typing import Sequence

import torch  # noqa: F401  (tests reach torch through this module)

from harness.console import terminal as console
from harness.engines import unavailable  # noqa: F401  (re-exported)
from harness.engines.generate import CUT, Prompt, Sampling, _eos_ids, plan_batches, render, request_seed
from harness.engines.vllm_client import Worker, WorkerError
from harness.engines.vllm_weights import Served, export_served, lora_slot, weights_mode
from harness.models.load import off_gpu
from harness.store import cost
from harness.store.files import JsonlLog

SAMPLER = "vllm/per-request-seed/v1"


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
    the next iterate's merged copy of the same frame is loaded in place, and a call that does
    not fit (a judge model after the policy, a longer sequence) restarts it. ``park`` ends a stage's use (the models it
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
        self.loads = 0  # merged weights loaded in place into the running worker (``Worker.load``)
        self._key: tuple | None = None
        self._frame = ""  # the started worker's frame (``frame_hash``): merged weights with it load in place
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
        adapter needs no restart), woken if it sleeps, and given the next merged weights in place
        when their frame is its own (``frame_hash``: the next iterate of a LoRA chain); else a
        new one."""
        served = self.served(model)
        seqs = self.max_num_seqs or batch_size
        key = (served.model_dir, served.dtype, seqs)
        w = self.worker
        if w is not None and w.usable() and self._key[1:3] == key[1:] and served.rank <= self._key[3] \
                and need <= self._key[4]:
            # other weights of the same frame (merged weights of the next iterate): loaded in place
            in_place = self._key[0] != served.model_dir and served.frame and served.frame == self._frame
            if in_place or self._key[0] == served.model_dir:
                w.wake_up()
                if in_place:
                    w.load(served.model_dir)
                    self._key = (served.model_dir, *self._key[1:])
                    self.loads += 1
                    cost.add(engine_loads=1)
                return w
        self.close_worker()
        rank = served.rank
        if weights_mode(self.weights, model) == "adapter":
            rank = max(rank, lora_slot(self.lora_rank))
        length = max(need, _max_model_len(model, 0, self.headroom - 1))  # room for the session's next calls
        self.worker = Worker(served.model_dir, dtype=served.dtype, max_num_seqs=seqs, max_model_len=length,
                             max_lora_rank=rank)
        self._key, self._frame = (*key, rank, length), served.frame
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
