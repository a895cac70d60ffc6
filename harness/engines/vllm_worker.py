"""The vLLM side of ``harness.engines.vllm_engine``: run with the Python of ``.venv-vllm``, never
imported by the harness (it needs nothing but vLLM and the standard library).

    .venv-vllm/bin/python vllm_worker.py '<engine settings as JSON>'

Protocol: stdout carries JSON lines and nothing else (vLLM's own output and its worker
processes' output go to stderr). The first line is ``{"ready": true, "start_s": ...}`` once
the engine is up. Then each line read from stdin is a job and its answer is a stream of
lines ending with ``{"done": true, "seconds", "gpu_used_mb"?}`` (``gpu_used_mb``: NVML's
device memory in use after the job, where a GPU and NVML are present):

- ``{"op": "generate", "requests": [{"key": str, "ids": [int], "seed": int}], "sampling":
  {"temperature", "top_p", "max_tokens", "min_tokens", "logprobs" (k, 0 = none),
  "stop_token_ids"}, "lora": null | {"name", "id", "path"}}``: one line per request as soon as
  it finishes (``lora``: a peft adapter directory applied to every request of the job; the
  engine settings' ``extra`` then enable LoRA),
  ``{"key", "token_ids", "finish" ("stop" | "length"), "topk": [[entropy, mass] per token]}``
  (``topk`` only with logprobs > 0: the entropy of the renormalised top-k distribution and
  the top-k mass, from vLLM's raw log-probs, i.e. before temperature and top-p).
- ``{"op": "score", "requests": [{"key": str, "ids": [int]}], "lora": ...}``: one line per request,
  ``{"key", "logprobs": [log p(ids[i] | ids[:i]) for i >= 1]}`` (vLLM's prompt log-probs).
- ``{"op": "load", "path": str}``: the weights of the checkpoint at ``path`` (same architecture and
  shapes) loaded in place (vLLM's ``reload_weights``): no new engine; no line but the done line.
- ``{"op": "sleep"}`` / ``{"op": "wake_up"}``: ``LLM.sleep(level=1)`` (weights offloaded to host
  memory, the KV cache freed: the GPU is free for training) and ``LLM.wake_up()``; only with
  ``enable_sleep_mode`` in the settings' ``extra`` (CUDA); no line but the done line.

End of stdin or ``{"op": "exit"}`` stops the engine.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time


def _proto():
    """Keep the real stdout for the protocol; everything else printing to fd 1 goes to stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def topk_stats(entries, k: int) -> list[float]:
    """[entropy of the renormalised top-k distribution, top-k mass] from {token: Logprob}."""
    lps = sorted((e.logprob for e in entries.values() if e.rank is not None and e.rank <= k), reverse=True)[:k]
    if not lps:
        lps = sorted((e.logprob for e in entries.values()), reverse=True)[:k]
    mass = sum(math.exp(x) for x in lps)
    log_mass = math.log(mass)
    ent = -sum(math.exp(x - log_mass) * (x - log_mass) for x in lps)
    return [ent, mass]


def gpu_used_mb() -> float | None:
    """GPU memory in use on device 0 (every process's, NVML's reading: vLLM's engine runs in its own
    process, out of the harness's torch allocator), or None without a GPU or NVML."""
    try:
        from vllm.third_party import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / 2**20
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001  (no GPU, no NVML: nothing to report)
        return None


def main() -> None:
    proto = _proto()
    settings = json.loads(sys.argv[1])

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=settings["model"], dtype=settings["dtype"], seed=0,
              enforce_eager=settings.get("enforce_eager", True),
              max_num_seqs=settings["max_num_seqs"], max_model_len=settings["max_model_len"],
              skip_tokenizer_init=True,          # the harness tokenizes and decodes
              generation_config="vllm",          # the checkpoint's generation_config takes no part
              enable_prefix_caching=False,
              **settings.get("extra", {}))
    engine = llm.llm_engine
    proto.write(json.dumps({"ready": True, "start_s": time.perf_counter() - t0}) + "\n")

    def run(jobs, emit, lora=None) -> None:
        """Add every (key, prompt, params) and emit each request as soon as it finishes."""
        if lora:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest(lora["name"], int(lora["id"]), lora["path"])
        for key, prompt, params in jobs:
            engine.add_request(key, prompt, params, lora_request=lora)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    emit(out)

    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        if job["op"] == "exit":
            break
        t = time.perf_counter()
        if job["op"] == "generate":
            s = job["sampling"]
            k = int(s.get("logprobs") or 0)

            def params(seed: int) -> SamplingParams:
                return SamplingParams(n=1, temperature=float(s["temperature"]), top_p=float(s["top_p"]),
                                      top_k=-1, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                                      frequency_penalty=0.0, seed=int(seed), max_tokens=int(s["max_tokens"]),
                                      min_tokens=int(s.get("min_tokens", 0)),
                                      stop_token_ids=list(s["stop_token_ids"]), ignore_eos=False,
                                      logprobs=k or None, detokenize=False, skip_special_tokens=False)

            def emit(out) -> None:
                c = out.outputs[0]
                rec = {"key": out.request_id, "token_ids": list(c.token_ids), "finish": c.finish_reason}
                if k:
                    rec["topk"] = [topk_stats(step, k) for step in (c.logprobs or [])]
                proto.write(json.dumps(rec) + "\n")

            run([(q["key"], TokensPrompt(prompt_token_ids=q["ids"]), params(q["seed"])) for q in job["requests"]],
                emit, job.get("lora"))
        elif job["op"] == "score":
            sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)

            def emit(out) -> None:
                ids = out.prompt_token_ids
                lps = [None if step is None else step[tok].logprob
                       for tok, step in zip(ids, out.prompt_logprobs)][1:]
                proto.write(json.dumps({"key": out.request_id, "logprobs": lps}) + "\n")

            jobs = [(q["key"], TokensPrompt(prompt_token_ids=q["ids"]), sp) for q in job["requests"]]
            if settings.get("extra", {}).get("enable_lora"):
                # one request at a time: vLLM's LoRA logits path indexes adapters per request, not per
                # prompt token, so two requests with prompt log-probs in one step fail (einsum shapes)
                for one in jobs:
                    run([one], emit, job.get("lora"))
            else:
                run(jobs, emit)
        elif job["op"] == "load":
            llm.collective_rpc("reload_weights", kwargs={"weights_path": job["path"], "is_checkpoint_format": True})
        elif job["op"] == "sleep":
            llm.sleep(level=1)
        elif job["op"] == "wake_up":
            llm.wake_up()
        else:
            raise ValueError(f"unknown op {job['op']!r}")
        done = {"done": True, "seconds": time.perf_counter() - t}
        used = gpu_used_mb()
        if used is not None:
            done["gpu_used_mb"] = used
        proto.write(json.dumps(done) + "\n")


if __name__ == "__main__":  # vLLM spawns worker processes that import this module
    main()
