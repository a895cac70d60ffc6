"""The vLLM engine's session without vLLM: a fake worker stands in for the subprocess, so
what the harness decides (vLLM's concurrency, which engine serves which call, the weights
mode, the cost counts, the judge stage's chunks) is checked on any machine. The engine
itself is tested in tests/test_vllm.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

import harness.engines.vllm_engine as ve
from harness import cost
from harness.config import parse
from harness.generate import Sampling
from harness.stages import VLLM_CHUNKS, judge_chunk
from test_vllm import prompts


class FakeWorker:
    """Answers every request with three tokens; records how it was started and each job's LoRA."""
    started: list[dict] = []

    def __init__(self, model_dir, **settings):
        self.settings = {"model_dir": model_dir, **settings}
        FakeWorker.started.append(self.settings)
        self.start_s, self.jobs = 0.5, []
        self.last_done = {"done": True, "gpu_used_mb": 1000.0 + len(FakeWorker.started)}

    def generate(self, requests, sampling, lora=None):
        self.jobs.append((len(requests), lora))
        for q in requests:
            yield {"key": q["key"], "token_ids": [5, 6, 7], "finish": "length"}

    def close(self):
        pass


@pytest.fixture
def fake(monkeypatch, tiny64):
    FakeWorker.started = []
    monkeypatch.setattr(ve, "Worker", FakeWorker)
    served = {}  # id(model) -> Served: one base, an adapter per "policy"

    def export(model, mode):
        return served.setdefault(id(model), ve.Served(Path("/base"), "bfloat16",
                                                      Path(f"/lora-{len(served):07x}") if mode == "adapter" else None,
                                                      8 if mode == "adapter" else 0))

    monkeypatch.setattr(ve, "export_served", export)
    return tiny64


@pytest.fixture
def tiny64():
    from test_eval_fixtures import build_tokenizer, tiny_llama_config
    from transformers import LlamaForCausalLM

    tok = build_tokenizer(["the quick brown fox question answer yes no user assistant what is plus say"] * 4)
    return LlamaForCausalLM(tiny_llama_config(tok, hidden_size=64, intermediate_size=64, num_attention_heads=1,
                                              num_key_value_heads=1)).eval(), tok


def test_vllm_concurrency_is_its_own_and_adapters_share_one_engine(fake):
    """max_num_seqs is the session's (not each call's batch_size); a call with another batch
    size or another adapter on the same base does not restart the engine; each job carries its
    adapter; the meter counts engine starts and vLLM's generated tokens."""
    model, tok = fake
    other = copy.deepcopy(model)
    greedy = Sampling(temperature=0.0, max_new_tokens=3)
    meter = cost.start()
    s = ve.Session(weights="adapter", max_num_seqs=256)
    try:
        s.generate(model, tok, prompts(5), greedy, seed_key=(0, 1, "a"), batch_size=4)
        s.generate(model, tok, prompts(3), greedy, seed_key=(0, 1, "b"), batch_size=16)
        s.generate(other, tok, prompts(2), greedy, seed_key=(0, 1, "c"), batch_size=2)
        worker = s.worker
    finally:
        s.close()
    reading = cost.stop(meter)
    assert len(FakeWorker.started) == 1 and s.starts == 1
    assert FakeWorker.started[0]["max_num_seqs"] == 256 and FakeWorker.started[0]["max_lora_rank"] == 8
    assert [n for n, _ in worker.jobs] == [5, 3, 2]  # every call's whole work in one job
    assert [lora["path"] for _, lora in worker.jobs] == ["/lora-0000000", "/lora-0000000", "/lora-0000001"]
    assert reading["engine_starts"] == 1 and reading["gen_tokens"] == 3 * (5 + 3 + 2)
    assert reading["engine_mem_mb"] == 1001.0  # the worker's NVML reading
    row, _ = cost.row_metrics([reading, {**reading, "engine_mem_mb": 2000.0}, {"wall_s": 1.0}])
    assert row["cost/engine_mem_mb"] == 2000.0 and row["cost/engine_starts"] == 2


def test_without_a_session_concurrency_the_batch_size_decides(fake):
    model, tok = fake
    s = ve.Session(weights="merged")
    try:
        s.generate(model, tok, prompts(2), Sampling(temperature=0.0, max_new_tokens=3), seed_key=(0,), batch_size=4)
        s.generate(model, tok, prompts(2), Sampling(temperature=0.0, max_new_tokens=3), seed_key=(0,), batch_size=8)
    finally:
        s.close()
    assert [w["max_num_seqs"] for w in FakeWorker.started] == [4, 8]
    assert all(w["max_lora_rank"] == 0 for w in FakeWorker.started)


def test_weights_mode(tiny64):
    model, _ = tiny64
    assert ve.weights_mode("adapter", model) == "adapter" and ve.weights_mode("merged", model) == "merged"
    assert ve.weights_mode("auto", model) == ("adapter" if ve.torch.cuda.is_available() else "merged")
    with pytest.raises(ValueError):
        ve.weights_mode("lora", model)


def test_a_vllm_judge_stage_sends_large_chunks():
    doc = {"experiment": {"name": "x"}, "model": {"base": "tiny"}, "method": {"name": "spin"},
           "data": {"train": "tiny:prompts_train"}, "judge": {"name": "none", "batch_size": 16},
           "generation": {"vllm_max_num_seqs": 100}}
    cfg = parse(doc, "x.toml")
    assert judge_chunk(cfg, "hf") == 16
    assert judge_chunk(cfg, "vllm") == VLLM_CHUNKS * 100
