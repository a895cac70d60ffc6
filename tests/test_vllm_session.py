"""The vLLM engine's session without vLLM: a fake worker stands in for the subprocess, so
what the harness decides (vLLM's concurrency, which engine serves which call, the weights
mode, the cost counts, the judge stage's chunks, one engine per run: when it starts, sleeps,
wakes and stops) is checked on any machine. The engine itself is tested in tests/test_vllm.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

import harness.engines.vllm_engine as ve
from harness.store import cost
from harness.config.experiment import parse
from harness.engines.generate import Sampling
from harness.engines import Engines
from harness.run.stages import judge_chunk
from test_vllm import prompts


class FakeWorker:
    """Answers every request with three tokens; records how it was started, each job's LoRA,
    and its sleeps, wake-ups and stop. ``can_sleep``: as on CUDA."""
    started: list[dict] = []
    can_sleep = False

    def __init__(self, model_dir, **settings):
        self.settings = {"model_dir": model_dir, **settings}
        FakeWorker.started.append(self.settings)
        FakeWorker.last = self
        self.start_s, self.jobs, self.events = 0.5, [], []
        self.sleeping = self.busy = self.closed = False
        self.last_done = {"done": True, "gpu_used_mb": 1000.0 + len(FakeWorker.started)}

    def generate(self, requests, sampling, lora=None):
        assert not self.sleeping and not self.closed
        self.jobs.append((len(requests), lora))
        self.busy = True
        for q in requests:
            yield {"key": q["key"], "token_ids": [5, 6, 7], "finish": "length"}
        self.busy = False

    def usable(self):
        return not self.closed and not self.busy

    def sleep(self):
        if self.can_sleep and not self.sleeping:
            self.events.append("sleep")
            self.sleeping = True

    def wake_up(self):
        if self.sleeping:
            self.events.append("wake_up")
            self.sleeping = False

    def load(self, model_dir):
        assert not self.sleeping and not self.closed and not self.busy
        self.events.append(f"load {model_dir}")

    def close(self):
        self.closed = True
        self.events.append("close")


@pytest.fixture
def fake(monkeypatch, tiny64):
    FakeWorker.started = []
    monkeypatch.setattr(ve, "Worker", FakeWorker)
    served = {}  # id(model) -> Served: one base, an adapter per "policy"

    def export(model, mode):  # adapter: one base, a PeftModel's adapter (rank 8); merged: a copy per model,
        n, lora = len(served), mode == "adapter" and hasattr(model, "peft_config")  # its frame the model's
        return served.setdefault(id(model), ve.Served(Path("/base") if mode == "adapter" else Path(f"/merged-{n}"),
                                                      "bfloat16", Path(f"/lora-{n:07x}") if lora else None,
                                                      8 if lora else 0,
                                                      "" if mode == "adapter" else getattr(model, "frame", "f0")))

    monkeypatch.setattr(ve, "export_served", export)
    return tiny64


@pytest.fixture
def tiny64():
    from test_eval_fixtures import build_tokenizer, tiny_llama_config
    from transformers import LlamaForCausalLM

    tok = build_tokenizer(["the quick brown fox question answer yes no user assistant what is plus say"] * 4)
    return LlamaForCausalLM(tiny_llama_config(tok, hidden_size=64, intermediate_size=64, num_attention_heads=1,
                                              num_key_value_heads=1)).eval(), tok


def _peft(model):
    """A copy of ``model`` with a rank-8 LoRA adapter (a continue chain's policy)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))


def test_vllm_concurrency_is_its_own_and_adapters_share_one_engine(fake):
    """max_num_seqs is the session's (not each call's batch_size); a call with another batch
    size or another adapter on the same base does not restart the engine; each job carries its
    adapter; the meter counts engine starts and vLLM's generated tokens."""
    model, tok = fake
    model, other = _peft(model), _peft(model)
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


def test_a_vllm_judge_stage_sends_its_whole_work_at_once():
    doc = {"experiment": {"name": "x"}, "model": {"base": "tiny"}, "method": {"name": "spin"},
           "data": {"train": "tiny:prompts_train"}, "judge": {"name": "none", "batch_size": 16},
           "generation": {"vllm_max_num_seqs": 100}}
    cfg = parse(doc, "x.toml")
    groups = [type("G", (), {"candidates": [None] * 3})() for _ in range(500)]
    assert judge_chunk(cfg, "hf", groups) == 16
    assert judge_chunk(cfg, "vllm", groups) == 1500  # the whole stage in one call, whatever the concurrency


def _gen(name: str = "vllm", weights: str = "adapter"):
    from harness.config.experiment import GenerationSection

    return name, GenerationSection(engine=name, vllm_weights=weights, vllm_max_num_seqs=256)


def test_one_engine_serves_every_stage_of_a_run_and_sleeps_between_them(fake, monkeypatch):
    """The run's engine (``Engines``) starts at the first vLLM stage and serves every later one,
    each policy's adapter switched per request (iterate 0, the base, has none: the engine's LoRA
    slots come from the run's rank); between stages it sleeps (as on CUDA) and wakes for the
    next; an HF stage does not touch it; closing the run stops it."""
    model, tok = fake
    policies = [model, _peft(model), _peft(model)]  # iterates 0 (the base), 1, 2
    monkeypatch.setattr(FakeWorker, "can_sleep", True)
    greedy = Sampling(temperature=0.0, max_new_tokens=3)
    meter = cost.start()
    with Engines(lora_rank=4) as engines:
        for t, policy in enumerate(policies):
            for stage in ("evaluate", "generate", "judge") if t < 2 else ("evaluate",):
                with engines.stage(*_gen()) as eng:
                    eng.generate(policy, tok, prompts(3), greedy, seed_key=(0, t, stage), batch_size=4)
            with engines.stage("hf") as eng:  # lm-eval, a reward model: not the engine's
                assert eng.name == "hf"
        worker = engines.vllm.worker
        assert not worker.closed
    reading = cost.stop(meter)
    assert len(FakeWorker.started) == 1 and reading["engine_starts"] == 1
    assert FakeWorker.started[0]["max_lora_rank"] == 8  # vLLM's slot for rank 4
    assert worker.events == ["sleep", "wake_up"] * 6 + ["sleep", "close"]
    assert [lora and lora["path"] for _, lora in worker.jobs] == [None] * 3 + ["/lora-0000001"] * 3 + ["/lora-0000002"]


def test_a_call_with_another_concurrency_restarts_the_engine(fake):
    """Without a session-wide vllm_max_num_seqs each call's batch size is vLLM's concurrency: a
    call with another one stops the running engine and starts one with it."""
    model, tok = fake
    greedy = Sampling(temperature=0.0, max_new_tokens=3)
    s = ve.Session()
    try:
        s.generate(model, tok, prompts(4), greedy, seed_key=(0,), batch_size=4)
        first = s.worker
        s.generate(model, tok, prompts(2), greedy, seed_key=(0,), batch_size=4)
        assert s.worker is first
        s.generate(model, tok, prompts(2), greedy, seed_key=(0,), batch_size=2)
    finally:
        s.close()
    assert [w["max_num_seqs"] for w in FakeWorker.started] == [4, 2] and first.closed and s.starts == 2


def test_merged_weights_load_in_place_when_only_the_blocks_change(fake):
    """Merged mode: the stages of one policy share its engine; the next iterate's weights of the
    same frame (``frame_hash``) are loaded into it in place, once, and counted as engine_loads; a
    policy of another frame (e.g. a changed embedding) restarts it, stopping the previous one;
    another vLLM setting read by a stage starts afresh."""
    model, tok = fake
    p0, p1, p2 = model, copy.deepcopy(model), copy.deepcopy(model)
    p2.frame = "f1"
    greedy = Sampling(temperature=0.0, max_new_tokens=3)
    meter = cost.start()
    with Engines() as engines:
        for policy in (p0, p0, p1, p1):
            with engines.stage(*_gen(weights="merged")) as eng:
                eng.generate(policy, tok, prompts(2), greedy, seed_key=(0,), batch_size=4)
        (first,) = FakeWorker.started
        assert first["model_dir"] == Path("/merged-0") and FakeWorker.last.events == ["load /merged-1"]
        assert (engines.vllm.starts, engines.vllm.loads) == (1, 1)
        with engines.stage(*_gen(weights="merged")) as eng:
            eng.generate(p2, tok, prompts(2), greedy, seed_key=(0,), batch_size=4)
        assert [w["model_dir"] for w in FakeWorker.started] == [Path("/merged-0"), Path("/merged-2")]
        assert (engines.vllm.starts, engines.vllm.loads) == (2, 1)
        with engines.stage(*_gen(weights="adapter")) as eng:
            eng.generate(p1, tok, prompts(2), greedy, seed_key=(0,), batch_size=4)
        assert len(FakeWorker.started) == 3
    reading = cost.stop(meter)
    assert (reading["engine_starts"], reading["engine_loads"]) == (3, 1)
    assert engines.vllm is None


def test_a_stage_that_fails_mid_job_leaves_no_half_read_engine(fake, tmp_path):
    """A stage that stops reading a job's answers (its log failed) stops the engine when it
    ends; the next stage starts a fresh one. A stage that fails after its job keeps it."""
    from harness.store.files import JsonlLog

    class Broken(JsonlLog):
        def append(self, records):
            raise OSError("disk full")

    model, tok = fake
    greedy = Sampling(temperature=0.0, max_new_tokens=3)
    with Engines() as engines:
        with pytest.raises(OSError), engines.stage(*_gen()) as eng:
            eng.generate(model, tok, prompts(3), greedy, seed_key=(0,), batch_size=4, log=Broken(tmp_path / "x"))
        assert engines.vllm.worker is None and FakeWorker.started and len(FakeWorker.started) == 1
        with pytest.raises(RuntimeError), engines.stage(*_gen()) as eng:
            eng.generate(model, tok, prompts(3), greedy, seed_key=(0,), batch_size=4)
            raise RuntimeError("the stage's own failure")
        kept = engines.vllm.worker
        with engines.stage(*_gen()) as eng:
            eng.generate(model, tok, prompts(3), greedy, seed_key=(0,), batch_size=4)
        assert engines.vllm.worker is kept and len(FakeWorker.started) == 2


@pytest.mark.usefixtures("library_console")  # a CLI test before may have left the console on its closed stream
def test_a_two_iteration_run_starts_its_engine_once(fake, tmp_path):
    """A tiny SPIN run (2 iterations, the continue chain's adapter served on the unchanging base;
    AlpacaEval answers in every evaluate stage) with engine = "vllm": one engine start for the
    whole run, counted in its rows; the engine is stopped when the run ends."""
    from harness.run.loop import run_experiment

    doc = {"experiment": {"name": "one-engine", "seed": 0, "output_dir": str(tmp_path)},
           "model": {"base": "tiny", "device": "cpu", "cpu_threads": 1},
           "lora": {"r": 4, "alpha": 8, "chain": "continue"},
           "method": {"name": "spin", "iterations": 2, "beta": 0.1},
           "data": {"train": "tiny:sft_train", "num_prompts": 8},
           "generation": {"engine": "vllm", "vllm_weights": "adapter", "max_new_tokens": 4, "batch_size": 8},
           "training": {"learning_rate": 5e-3, "epochs": 1, "batch_size": 8, "max_length": 96, "warmup_ratio": 0.0},
           "eval": {"batch_size": 8, "alpaca_eval": {"instructions": "tiny:alpaca_eval", "limit": 4,
                                                     "max_new_tokens": 4, "judge": {"name": "oracle"}},
                    "indicators": {"num_prompts": 0}}}
    _, rows = run_experiment(parse(doc, "x.toml"))
    assert len(FakeWorker.started) == 1 and FakeWorker.last.closed
    assert [r["metrics"]["cost/engine_starts"] for r in rows] == [1, 0, 0]


def test_a_logged_engine_keeps_each_answer_and_sends_only_what_its_log_lacks(fake, tmp_path):
    """``logged`` (a vllm judge stage's engine): every answer is appended to the stage's log as
    it finishes; a resumed stage's call sends vLLM only the prompts missing from it and returns
    the logged ones as they were."""
    from harness.engines import Engine, logged
    from harness.store.files import JsonlLog

    model, tok = fake
    greedy = Sampling(temperature=0.0, max_new_tokens=3)
    with Engines() as engines, engines.stage(*_gen()) as eng:
        first = logged(eng, JsonlLog(tmp_path / "answers.jsonl")).generate(
            model, tok, prompts(3), greedy, seed_key=(0,), batch_size=4)
        again = logged(eng, JsonlLog(tmp_path / "answers.jsonl")).generate(
            model, tok, prompts(5), greedy, seed_key=(0,), batch_size=4)
        jobs = engines.vllm.worker.jobs
    assert [n for n, _ in jobs] == [3, 2]
    assert len(JsonlLog(tmp_path / "answers.jsonl").records) == 5
    assert {k: again[k] for k in first} == first
    assert isinstance(eng, Engine)
