"""Memory between stages: the trained model is freed before any other model loads, the policy
is unloaded before a judge's or a fixed self-instruct model loads, judge models load in the
run's dtype, an AlpacaEval or validation judge model is built after the answers and freed, the
policy off the GPU meanwhile, before the policy answers again, and HF generation batches by a
token budget.

The loop tests run with the garbage collector off: a model that only the collector would free
(a reference cycle) then stays alive, as it does on a GPU until the collector happens to run."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

from harness.run import loop
from harness.models import load as models
from harness.run import stages
from harness.config.experiment import parse
from harness.run.loop import run_experiment
from test_eval_fixtures import tiny  # noqa: F401  (the tiny model, loaded as the harness loads it)

pytestmark = pytest.mark.usefixtures("library_console")


class _Stop(Exception):
    """Ends a run once the test has seen what it looks for."""


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
def policies(monkeypatch):
    """Weak references to every policy the loop loads (``harness.run.loop.load_policy``)."""
    refs: list[weakref.ref] = []
    real = loop.load_policy

    def recording(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        refs.append(weakref.ref(model))
        return model, tok

    monkeypatch.setattr(loop, "load_policy", recording)
    return refs


def _doc(tmp_path: Path, name: str) -> dict:
    return {"experiment": {"name": name, "seed": 0, "output_dir": str(tmp_path / "out")},
            "model": {"base": "tiny", "device": "cpu", "cpu_threads": 1},
            "lora": {"r": 4, "alpha": 8},
            "method": {"name": "spin", "iterations": 1},
            "data": {"train": "tiny:sft_train", "num_prompts": 8},
            "generation": {"max_new_tokens": 8, "batch_size": 8},
            "training": {"learning_rate": 5e-4, "batch_size": 4, "max_length": 96, "warmup_ratio": 0.0},
            "eval": {"indicators": {"num_prompts": 0}}}


def test_trained_model_is_freed_before_the_next_model_loads(tmp_path, monkeypatch, no_gc, policies):
    import harness.train

    trained: list[weakref.ref] = []
    real_train = harness.train.train_dpo

    def train_dpo(*args, **kwargs):
        metrics, model = real_train(*args, **kwargs)
        # the PeftModel trl trained and the model under it, which holds the weights (trl
        # rebinds its forward: a reference cycle)
        trained.extend([weakref.ref(model), weakref.ref(model.get_base_model())])
        return metrics, model

    monkeypatch.setattr(harness.train, "train_dpo", train_dpo)
    seen = []
    real_load = loop.load_policy  # the recording one of ``policies``

    def load_policy(*args, **kwargs):
        if trained:  # the first load after training: iteration 1's evaluation
            seen.append(all(ref() is None for ref in trained))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(loop, "load_policy", load_policy)
    run_experiment(parse(_doc(tmp_path, "free")))
    assert trained and seen, "the run trained and then loaded the next model"
    assert seen[0], "the trained model was still alive when the next model loaded"


def test_release_memory_empties_the_cuda_cache(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    models.release_memory()
    assert emptied


def _stop_at_load(monkeypatch, policies, when, module=models) -> list[tuple]:
    """Stop the run at the first ``load_model`` call of ``module`` for which ``when(args,
    kwargs)`` holds, recording (live policies, its dtype)."""
    seen = []
    real = module.load_model

    def load_model(*args, **kwargs):
        if when(args, kwargs):
            seen.append((sum(r() is not None for r in policies), kwargs.get("dtype")))
            raise _Stop
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "load_model", load_model)
    return seen


def test_policy_is_unloaded_before_a_judge_model_loads_in_the_runs_dtype(tmp_path, monkeypatch, no_gc, policies,
                                                                       tiny_reward_model):
    doc = _doc(tmp_path, "judge")
    doc["model"]["dtype"] = "bfloat16"
    doc["method"] = {"name": "dno", "iterations": 1,
                     "dno": {"num_samples": 2, "prompts_per_iteration": 4, "repetition_max": 0.0,
                             "positive_min": 0.5, "margin": 0.5, "student_margin": 0.25}}
    doc["data"] = {"train": "tiny:prompts_train"}
    doc["judge"] = {"name": "reward_model", "reward_model": {"model": str(tiny_reward_model)}}
    seen = _stop_at_load(monkeypatch, policies, lambda a, k: k.get("kind") == "sequence_classification")
    with pytest.raises(_Stop):
        run_experiment(parse(doc))
    assert policies, "the policy was loaded (generate stage)"
    assert seen == [(0, "bfloat16")]  # no policy alive; the judge in the run's dtype


def test_judge_section_dtype_overrides_the_runs(tmp_path):
    from harness.judges import JUDGES
    from harness.judges.kind import load_dtype

    options = JUDGES.get("reward_model").Options(model="x")
    assert load_dtype(options, "bfloat16") == "bfloat16"
    assert load_dtype(JUDGES.get("hf").Options(model="x", dtype="float32"), "bfloat16") == "float32"


def test_policy_is_unloaded_before_a_fixed_self_instruct_model_loads(tmp_path, monkeypatch, no_gc, policies):
    from test_loop_methods import subset

    doc = _doc(tmp_path, "si")
    doc["method"] = {"name": "self_rewarding", "iterations": 1,
                     "self_rewarding": {"num_samples": 2, "prompts_per_iteration": 4,
                                        "ift": subset("tiny:ift", 8, tmp_path / "ift.jsonl"),
                                        "eft": subset("tiny:eft", 8, tmp_path / "eft.jsonl"),
                                        "self_instruct": 2, "self_instruct_shots": 2, "self_instruct_model": "tiny",
                                        "sft": {"learning_rate": 1e-3, "epochs": 1, "batch_size": 8,
                                                "max_length": 160, "warmup_ratio": 0.0}}}
    doc["data"] = {"train": "tiny:prompts_train"}
    doc["judge"] = {"name": "self", "min_coverage": 0.0,
                    "self": {"template": "tiny:judge_template", "samples": 2, "temperature": 0.7,
                                     "max_new_tokens": 8}}
    seen = _stop_at_load(monkeypatch, policies, lambda a, k: True, module=stages)  # the self_instruct stage's
    with pytest.raises(_Stop):
        run_experiment(parse(doc))
    assert policies, "iteration 0 was evaluated with the policy"
    assert seen == [(0, "float32")]


def test_batches_hold_at_most_the_token_budget():
    from harness.engines.generate import plan_batches

    lengths = {"a": 300, "b": 100, "c": 90, "d": 10, "e": 10, "f": 10}
    ids = list(lengths)
    assert plan_batches(lengths, ids, 2, 8) == [["a", "b", "c", "d"], ["e", "f"]]  # no budget: rows only
    batches = plan_batches(lengths, ids, 2, 8, max_tokens=400)
    assert batches == [["a"], ["b", "c"], ["d", "e", "f"]]  # "a" alone exceeds it: a batch of its own
    for batch in batches[1:]:
        assert 2 * len(batch) * max(lengths[p] for p in batch) <= 400


def test_hf_engine_batches_by_generation_max_batch_tokens(tiny):
    """The stage's engine session hands [generation] max_batch_tokens to HF generation: long
    prompts go in smaller batches, short ones keep batch_size (the default budget leaves the
    tiny world's batches as they are)."""
    from harness.config.experiment import GenerationSection
    from harness.engines import session
    from harness.engines.generate import Prompt, Sampling, render

    model, tok = tiny
    prompts = [Prompt(f"p{i}", ({"role": "user", "content": "what is 1 plus 2 " * (1 + 3 * (i % 2))},))
               for i in range(8)]
    longest = max(len(tok(render(tok, p.messages), add_special_tokens=False).input_ids) for p in prompts)
    sizes: list[int] = []
    real = model.generate

    def generate(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        return real(**kwargs)

    model.generate = generate
    try:
        for budget in (GenerationSection().max_batch_tokens, 4 * longest):
            with session("hf", GenerationSection(max_batch_tokens=budget)) as eng:
                eng.generate(model, tok, prompts, Sampling(max_new_tokens=2), seed_key=(0,), batch_size=8)
    finally:
        del model.generate
    assert sizes == [8, 4, 4]  # the default budget: one batch of 8, as before; then the four long prompts
    # (4 x longest tokens) and the four short ones


# ---- the AlpacaEval and validation judges: built after the answers, never beside the policy ------

class _Stage:
    """A stage's engine (``generate``, ``name``) for ``evaluate_iteration`` and ``run_validation``:
    each call is recorded in ``events`` as (what was generated, judges alive); the policy answers
    "w w w", a judge "Score: 3". ``factory(build)`` is the stages' judge factory around ``build``,
    recording "built" and a weak reference to each judge."""
    name = "hf"

    def __init__(self):
        self.events: list = []
        self.judges: list[weakref.ref] = []

    def alive(self) -> int:
        return sum(r() is not None for r in self.judges)

    def generate(self, model, tokenizer, prompts, sampling, **kwargs):
        what = kwargs.get("desc", "").split(" ")[0]
        self.events.append((what, self.alive()))
        text = "Score: 3" if what == "judge" else "w w w"
        return {p.id: {"id": p.id, "samples": [{"text": text, "n_tokens": 3, "finish": "eos"}] * sampling.n}
                for p in prompts}

    def factory(self, build):
        def make(section):
            judge = build(section)
            self.events.append("built")
            self.judges.append(weakref.ref(judge))
            return judge
        return make


class _LongerWins:
    name, scale = "longer_wins", (0.0, 1e9)

    def score(self, items):
        from harness.judges.base import Verdict

        return [Verdict(score=float(len(i.response))) for i in items]


def _eval_config(tmp_path: Path, judge):
    """AlpacaEval (5 instructions), indicators on them, and a validation evaluation of
    AlpacaEval and 3 judged prompts, every judge ``judge`` (a JudgeSection)."""
    import json

    from harness.config.experiment import (Config, DataSection, ExperimentSection, GenerationSection,
                                           MethodSection, ModelSection)
    from harness.config.eval_sections import AlpacaEvalSection, EvalSection, IndicatorSection, ValidationSection

    (tmp_path / "ae.json").write_text(json.dumps([{"instruction": f"say {i}", "output": "ok", "generator": "ref"}
                                                  for i in range(5)]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"prompt": f"tell {i}"}) + "\n" for i in range(3)))
    ae = AlpacaEvalSection(instructions=str(tmp_path / "ae.json"), judge=judge, max_new_tokens=4)
    return Config(experiment=ExperimentSection(name="exp", seed=3), model=ModelSection(base="unused"),
                  method=MethodSection(name="spin"), data=DataSection(train="unused"),
                  generation=GenerationSection(max_new_tokens=4, batch_size=4),
                  eval=EvalSection(alpaca_eval=ae, indicators=IndicatorSection(num_prompts=2),
                                   validation=ValidationSection(alpaca_eval=ae, prompts=str(tmp_path / "val.jsonl"),
                                                                judge=judge)))


def _evaluate(tmp_path: Path, judge, build, stage: _Stage | None = None) -> _Stage:
    """One evaluate and one validation evaluation on a stand-in policy, the judges ``build(section,
    stage)``; the stage (a new one unless given), its events of the two separated by "validation"."""
    from harness.evaluate import evaluate_iteration
    from harness.run.selection import run_validation

    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg, stage, policy = _eval_config(tmp_path, judge), stage or _Stage(), torch.nn.Linear(2, 2)
    factory = stage.factory(lambda section: build(section, stage))
    evaluate_iteration(policy, None, cfg, tmp_path / "eval", 1, factory, generate_fn=stage.generate)
    stage.events.append("validation")
    run_validation(policy, None, cfg, tmp_path / "val", 1, factory, generate_fn=stage.generate)
    return stage


def test_alpaca_and_validation_judges_are_built_after_the_answers(tmp_path):
    from harness.config.experiment import JudgeSection

    stage = _evaluate(tmp_path, JudgeSection(name="oracle"), lambda section, stage: _LongerWins())
    assert [e if isinstance(e, str) else e[0] for e in stage.events] == [
        "alpaca_eval", "built", "indicators",  # evaluate: every answer, then the judge
        "validation", "alpaca_eval", "built", "validation", "built"]  # validation: AlpacaEval, then the prompts


def test_a_judge_model_is_freed_before_the_policy_generates_again(tmp_path, no_gc):
    """A real "hf" judge (the tiny model, answering through the stage's engine): it and its
    reference cycles (the counting wrappers of ``build_judge``) are gone before the policy's
    next answers, with the garbage collector otherwise off."""
    from harness.config.experiment import JudgeSection
    from harness.judges import build_judge

    section = JudgeSection.of("hf", model="tiny", template="tiny:judge_template", max_new_tokens=4, batch_size=8)
    stage = _evaluate(tmp_path, section, lambda s, stage: build_judge(s, seed_key=(0, 1), engine=stage))
    assert ("judge", 1) in stage.events  # the judge model answered, alive
    policy = [e for e in stage.events if isinstance(e, tuple) and e[0] != "judge"]
    assert [what for what, _ in policy] == ["alpaca_eval", "indicators", "alpaca_eval", "validation"]
    assert all(alive == 0 for _, alive in policy), stage.events  # no judge beside the policy's answers
    assert len(stage.judges) == 3 and stage.alive() == 0


def test_the_policy_is_set_aside_only_while_a_judge_model_exists(tmp_path, monkeypatch):
    """For a kind that loads a model ("hf") the judge is built, judges and is freed
    (``release_memory``) inside ``off_gpu(policy)``; for the oracle nothing is set aside."""
    import contextlib

    import harness.judges as judges
    from harness.config.experiment import JudgeSection

    stage = _Stage()
    real_release = judges.release_memory

    @contextlib.contextmanager
    def off_gpu(model):
        assert isinstance(model, torch.nn.Linear)  # the policy
        stage.events.append("aside")
        yield
        stage.events.append("back")

    monkeypatch.setattr(judges, "off_gpu", off_gpu)
    monkeypatch.setattr(judges, "release_memory", lambda: stage.events.append("release") or real_release())
    judged = ["aside", "built", "release", "back"]
    hf = JudgeSection.of("hf", model="m", template="tiny:judge_template")
    _evaluate(tmp_path / "hf", hf, lambda section, _: _LongerWins(), stage)
    assert [e if isinstance(e, str) else e[0] for e in stage.events] == [
        "alpaca_eval", *judged, "indicators", "validation", "alpaca_eval", *judged, "validation", *judged]

    stage = _Stage()
    _evaluate(tmp_path / "oracle", JudgeSection(name="oracle"), lambda section, _: _LongerWins(), stage)
    assert not {"aside", "release", "back"} & {e for e in stage.events if isinstance(e, str)}


def test_off_gpu_moves_a_cuda_model_to_the_cpu_and_back(monkeypatch):
    """The policy set aside for a judge model (or a vLLM engine): on the CPU inside the block,
    torch's cache emptied, back on its device after it, also when the block fails."""
    moves, emptied = [], []

    class Param:
        device = torch.device("cuda", 0)

    class Model:
        def parameters(self):
            return iter([Param()])

        def to(self, device):
            moves.append(str(device))

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    with pytest.raises(_Stop):
        with models.off_gpu(Model()):
            assert moves == ["cpu"] and emptied
            raise _Stop
    assert moves == ["cpu", "cuda:0"]
    cpu = torch.nn.Linear(2, 2)
    with models.off_gpu(cpu):  # not on CUDA: nothing moves
        assert cpu.weight.device.type == "cpu"
