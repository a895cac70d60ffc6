"""evaluate_iteration: runs the configured parts into subdirectories, one flat metrics dict."""

from __future__ import annotations

import json

import pytest

from test_eval_fixtures import MC_YAML, datasets_cache, tiny, tiny_dir  # noqa: F401  (fixtures)

from harness.config.experiment import (Config, DataSection, ExperimentSection, GenerationSection, JudgeSection,
                                       MethodSection, ModelSection)
from harness.config.eval_sections import AlpacaEvalSection, EvalSection, IndicatorSection
from harness.evaluate import evaluate_iteration, load_eval_prompts
from harness.judges.base import Verdict




class LongerWins:
    name, scale = "longer_wins", (0.0, 1e9)

    def score(self, items):
        return [Verdict(score=float(len(i.response))) for i in items]


def _config(tmp_path, **eval_kw) -> Config:
    return Config(experiment=ExperimentSection(name="exp", seed=3), model=ModelSection(base="unused"),
                  method=MethodSection(name="spin"), data=DataSection(train="unused"),
                  generation=GenerationSection(max_new_tokens=5, batch_size=4), eval=EvalSection(**eval_kw))


def _files(tmp_path):
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(
        {"question": f"{i} plus {i}?", "choices": [str(2 * i), "fox"], "label": i % 2}) + "\n" for i in range(4)))
    (tmp_path / "mc.yaml").write_text(MC_YAML.format(name="it_mc", extra='', data=tmp_path / "mc.jsonl"))
    (tmp_path / "ae.json").write_text(json.dumps([{"instruction": f"say {i}", "output": "ok " * i,
                                                   "generator": "ref", "dataset": "u"} for i in range(5)]))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"id": f"h{i}", "prompt": f"tell {i}"}) + "\n"
                                                    for i in range(3)))


def test_all_parts_into_subdirectories(tiny, tmp_path, datasets_cache):
    model, tok = tiny
    _files(tmp_path)
    judge_cfg = JudgeSection(name="oracle", batch_size=2)
    cfg = _config(tmp_path, lm_eval_tasks=(str(tmp_path / "mc.yaml"),), batch_size=2,
                  eval_prompts=str(tmp_path / "prompts.jsonl"),
                  alpaca_eval=AlpacaEvalSection(instructions=str(tmp_path / "ae.json"), judge=judge_cfg),
                  indicators=IndicatorSection(num_prompts=2, top_k=4))
    seen = []
    out = tmp_path / "eval"
    m = evaluate_iteration(model, tok, cfg, out, 2, lambda section: seen.append(section) or LongerWins())
    assert seen == [judge_cfg]
    assert {"lm_eval/it_mc/acc", "alpaca_eval/win_rate", "alpaca_eval/coverage",
            "indicators/topk_entropy", "indicators/distinct_2"} <= set(m)
    assert m["alpaca_eval/n_total"] == 5 and m["alpaca_eval/length_controlled_winrate"] is None
    assert json.loads((out / "metrics.json").read_text()) == m
    outputs = json.loads((out / "alpaca_eval" / "model_outputs.json").read_text())
    assert {o["generator"] for o in outputs} == {"exp/iter_002"}
    ids = [json.loads(line)["id"] for line in (out / "indicators" / "samples.jsonl").open()]
    assert sorted(ids) == ["h0", "h1"]  # the held-out prompt file, first num_prompts
    assert (out / "lm_eval" / "samples_it_mc.jsonl").exists()


def test_indicators_fall_back_to_alpaca_instructions_and_parts_are_optional(tiny, tmp_path):
    model, tok = tiny
    _files(tmp_path)
    cfg = _config(tmp_path, indicators=IndicatorSection(num_prompts=2),
                  alpaca_eval=AlpacaEvalSection(instructions=str(tmp_path / "ae.json"), limit=2))
    m = evaluate_iteration(model, tok, cfg, tmp_path / "e1", 0, lambda s: LongerWins())
    assert m["alpaca_eval/n_instructions"] == 2 and "indicators/topk_mass" in m
    assert not any(k.startswith("lm_eval/") for k in m)

    none = _config(tmp_path, indicators=IndicatorSection(num_prompts=0))
    assert evaluate_iteration(model, tok, none, tmp_path / "e2", 0, lambda s: pytest.fail("no judge needed")) == {}


def test_eval_prompt_file_errors(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(ValueError, match="row 1 has no string field 'prompt'"):
        load_eval_prompts(str(tmp_path / "p.jsonl"))
    with pytest.raises(FileNotFoundError, match="eval.eval_prompts"):
        load_eval_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "q.json").write_text(json.dumps([{"prompt": "a"}, {"prompt": "b", "id": 7}]))
    pairs = load_eval_prompts(str(tmp_path / "q.json"))
    assert pairs[1] == ("7", "b") and len(pairs[0][0]) == 16


def test_validation_lm_eval_runs_with_the_system_prompt_as_the_reported_one(tiny, tmp_path, datasets_cache):
    """data.system_prompt is lm-eval's system instruction in both the reported [eval] tasks and
    the [eval.validation] ones (the protocol records it, and it is in the prompts)."""
    from dataclasses import replace

    from harness.config.eval_sections import ValidationSection
    from harness.run.selection import run_validation

    model, tok = tiny
    _files(tmp_path)
    (tmp_path / "val.yaml").write_text(MC_YAML.format(name="val_mc", extra="", data=tmp_path / "mc.jsonl"))
    system = "Answer in one word."
    cfg = replace(_config(tmp_path, lm_eval_tasks=(str(tmp_path / "mc.yaml"),), batch_size=2,
                          indicators=IndicatorSection(num_prompts=0),
                          validation=ValidationSection(lm_eval_tasks=(str(tmp_path / "val.yaml"),))),
                  data=DataSection(train="unused", system_prompt=system))
    no_judge = lambda section: pytest.fail("no judge needed")  # noqa: E731
    evaluate_iteration(model, tok, cfg, tmp_path / "eval", 0, no_judge)
    run_validation(model, tok, cfg, tmp_path / "validation", 0, no_judge)
    for out, task in ((tmp_path / "eval", "it_mc"), (tmp_path / "validation", "val_mc")):
        lm = out / "lm_eval"
        assert json.loads((lm / "metrics.json").read_text())["protocol"][task]["system_instruction"] == system
        first = json.loads((lm / f"samples_{task}.jsonl").open().readline())
        assert system in str(first["arguments"]), task
