"""Memory between stages: the trained model is freed before any other model loads, the policy
is unloaded before a judge's or a fixed self-instruct model loads, judge models load in the
run's dtype, and HF generation batches by a token budget.

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
from harness.models.sources import resolve_ref
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


@pytest.fixture
def tiny_reward_model(tmp_path):
    """A randomly initialised sequence classifier with the tiny world's tokenizer (one reward)."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    path = Path(resolve_ref("tiny"))
    config = AutoConfig.from_pretrained(path)
    config.num_labels = 1
    torch.manual_seed(0)
    out = tmp_path / "rm"
    LlamaForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


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
