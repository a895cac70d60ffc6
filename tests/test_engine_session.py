"""Every stage that generates with a model on this machine goes through the stage's engine
(the run's ``harness.engines.Engines.stage``, chosen by ``[generation] engine``): the generate stage, the
AlpacaEval answers, the indicator samples, validation answers and a self-judge's answers.
The vLLM engine itself is tested in tests/test_vllm.py; here a recording engine stands in for
it (it writes with the HF engine), so the routing is checked on any machine."""

from __future__ import annotations

import contextlib
import copy

import pytest

from harness.config.experiment import parse
from harness.engines import Engine, Engines
from harness.engines.generate import generate as hf_generate
from harness.run.loop import run_experiment

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("library_console")]


def sr_doc(out) -> dict:
    """A one-iteration Self-Rewarding run on the tiny world, small enough to take seconds."""
    return {"experiment": {"name": "sr", "seed": 0, "output_dir": str(out)},
            "model": {"base": "tiny", "device": "cpu", "cpu_threads": 1},
            "lora": {"r": 4, "alpha": 8},
            "method": {"name": "self_rewarding", "iterations": 1,
                       "self_rewarding": {"num_samples": 2, "temperature": 0.7, "ift": "tiny:ift", "eft": "tiny:eft",
                                          "prompts_per_iteration": 6,
                                          "sft": {"learning_rate": 5e-4, "epochs": 0.25, "batch_size": 16,
                                                  "max_length": 160}}},
            "judge": {"name": "self", "self": {"template": "tiny:judge_template", "samples": 2, "temperature": 0.7,
                                               "max_new_tokens": 8}},
            "data": {"train": "tiny:prompts_train"},
            "generation": {"max_new_tokens": 12, "batch_size": 32},
            "training": {"learning_rate": 5e-4, "batch_size": 8, "max_length": 160, "warmup_ratio": 0.0},
            "eval": {"batch_size": 32,
                     "alpaca_eval": {"instructions": "tiny:alpaca_eval", "limit": 6, "judge": {"name": "oracle"}},
                     "indicators": {"num_prompts": 4}}}


def test_every_generating_stage_uses_the_stage_engine(tmp_path, monkeypatch):
    opened: list[str] = []        # engine names, one per stage session
    calls: list[tuple[int, str]] = []  # (session number, desc) of every generate call

    @contextlib.contextmanager
    def recording_session(self, name: str = "hf", generation=None):
        opened.append(name)
        k = len(opened)

        def gen(model, tokenizer, prompts, sampling, **kwargs):
            calls.append((k, kwargs.get("desc", "")))
            return hf_generate(model, tokenizer, prompts, sampling, **kwargs)

        yield Engine(name, gen)

    monkeypatch.setattr(Engines, "stage", recording_session)
    recorded_dir, recorded = run_experiment(parse(copy.deepcopy(sr_doc(tmp_path / "rec")), "test.toml"))
    monkeypatch.undo()
    _, plain = run_experiment(parse(copy.deepcopy(sr_doc(tmp_path / "plain")), "test.toml"))

    by_session: dict[int, list[str]] = {}
    for k, desc in calls:
        by_session.setdefault(k, []).append(desc)
    stages = [sorted(set(d)) for d in by_session.values()]
    # iteration 0 (after M1): one evaluate session for its AlpacaEval answers and indicators
    assert ["alpaca_eval", "indicators"] in stages
    assert ["iter 1 generate"] in stages
    assert ["judge (self)"] in stages          # the self-judge's answers, in the judge stage's own session
    assert sum(s == ["alpaca_eval", "indicators"] for s in stages) == 2  # iterations 0 and 1
    assert all(desc for _, desc in calls)
    # the recording engine writes with HF: the same numbers as a run on the default path
    strip = lambda rows: [{k: v for k, v in r["metrics"].items()  # noqa: E731
                           if not k.startswith(("cost/", "wall_time_s")) and not k.endswith(("seconds", "peak_memory_mb"))}
                          for r in rows]
    assert strip(recorded) == strip(plain)
    assert recorded_dir.exists()


def test_a_model_judge_built_with_an_engine_writes_with_it_and_is_cached_apart(tmp_path):
    from harness.judges import build_judge
    from harness.judges.base import JudgeItem
    from harness.models.load import load_policy

    cfg = parse(copy.deepcopy(sr_doc(tmp_path)), "test.toml")
    model, tok = load_policy(cfg, [])
    seen = []

    def gen(*args, **kwargs):
        seen.append(kwargs["desc"])
        return hf_generate(*args, **kwargs)

    items = [JudgeItem("p0", "reverse the word ab", "ba"), JudgeItem("p1", "reverse the word abc", "cba")]

    def judge(engine=None, cache=None):
        return build_judge(cfg.judge, policy=(model, tok), seed_key=(0, 1, "judge"), engine=engine,
                           identity_extra="policy-1" if cache else "", cache_path=cache)

    plain, routed = judge(), judge(Engine("vllm", gen))
    assert [v.raw for v in routed.score(items)] == [v.raw for v in plain.score(items)]
    assert seen == ["judge (self)"]
    assert plain.generate_fn is hf_generate
    # a cached judgment of one engine is not served for the other; "hf" keeps the identity it had
    ids = {judge(e, tmp_path / "cache.jsonl").identity
           for e in (None, Engine("hf", hf_generate), Engine("vllm", gen))}
    assert len(ids) == 2
