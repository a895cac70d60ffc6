"""AlpacaEval answers have their own cap (eval.alpaca_eval.max_new_tokens, default 2048 as
alpaca_eval's model configs), not generation.max_new_tokens; answers that reach it are
counted (alpaca_eval/n_cut) and the cap is in the protocol record."""

from __future__ import annotations

import json

from harness.config.experiment import (Config, DataSection, ExperimentSection, GenerationSection, MethodSection,
                                       ModelSection)
from harness.config.eval_sections import AlpacaEvalSection, EvalSection, IndicatorSection, ValidationSection
from harness.evaluate import evaluate_iteration
from harness.judges.base import Verdict
from harness.run.selection import run_validation


class LongerWins:
    name, scale = "longer_wins", (0.0, 1e9)

    def score(self, items):
        return [Verdict(score=float(len(i.response))) for i in items]


class FakeEngine:
    """An engine's generate: answers of ``min(cap, 3 + i)`` tokens for the i-th prompt, "length"
    where that is the cap; records the caps it was asked for."""

    def __init__(self):
        self.caps: list[int] = []

    def __call__(self, model, tokenizer, prompts, sampling, **kwargs):
        self.caps.append(sampling.max_new_tokens)
        out = {}
        for i, p in enumerate(prompts):
            n = min(sampling.max_new_tokens, 3 + i)
            out[p.id] = {"id": p.id, "samples": [{"text": "w " * n, "n_tokens": n,
                                                  "finish": "length" if n == sampling.max_new_tokens else "eos"}]}
        return out


def _config(tmp_path, **alpaca) -> Config:
    (tmp_path / "ae.json").write_text(json.dumps([{"instruction": f"say {i}", "output": "ok", "generator": "ref"}
                                                  for i in range(5)]))
    section = AlpacaEvalSection(instructions=str(tmp_path / "ae.json"), **alpaca)
    return Config(experiment=ExperimentSection(name="exp", seed=3), model=ModelSection(base="unused"),
                  method=MethodSection(name="spin"), data=DataSection(train="unused"),
                  generation=GenerationSection(max_new_tokens=2, batch_size=4),
                  eval=EvalSection(alpaca_eval=section, validation=ValidationSection(alpaca_eval=section),
                                   indicators=IndicatorSection(num_prompts=0)))


def test_answers_use_their_own_cap_and_cut_ones_are_counted(tmp_path):
    engine = FakeEngine()
    cfg = _config(tmp_path, max_new_tokens=5)
    m = evaluate_iteration(None, None, cfg, tmp_path / "eval", 1, lambda s: LongerWins(), generate_fn=engine)
    v = run_validation(None, None, cfg, tmp_path / "val", 1, lambda s: LongerWins(), generate_fn=engine)
    assert engine.caps == [5, 5]  # not generation.max_new_tokens (2), for the reported and the validation answers
    assert m["alpaca_eval/n_cut"] == 3 and v["validation/alpaca_eval/n_cut"] == 3  # answers of 5, 5 (capped), 5
    for d in ("eval", "val"):
        proto = json.loads((tmp_path / d / "alpaca_eval" / "metrics.json").read_text())["protocol"]
        assert proto["max_new_tokens"] == 5 and proto["endpoint"] is None  # the harness rubric's judge: no endpoint


def test_default_cap_is_alpaca_evals(tmp_path):
    engine = FakeEngine()
    assert AlpacaEvalSection().max_new_tokens == 2048
    m = evaluate_iteration(None, None, _config(tmp_path), tmp_path / "eval", 0, lambda s: LongerWins(),
                           generate_fn=engine)
    assert engine.caps == [2048] and m["alpaca_eval/n_cut"] == 0
