"""Judge kinds are plug-ins: the typed registry, [judge.<kind>] tables (nested sections too),
the old flat spelling's errors, and a new kind added as one module would add it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from harness.config import experiment as config
from harness.judges import JUDGES, JudgeKind, build_judge, judge_scale
from harness.judges.base import JudgeItem, Verdict
from harness.config.registry import Registry
from harness.config.schema import ConfigError, FieldError, opt

BASE = {"experiment": {"name": "x"}, "model": {"base": "tiny"}, "method": {"name": "dno"},
        "data": {"train": "tiny:prompts_train"}}


def errors(judge: dict, **sections) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse({**BASE, "judge": judge, **sections})
    return [str(e) for e in info.value.errors]


def test_registry_is_typed_and_rejects_duplicates():
    reg = Registry("thing", "some.package")
    assert "none is registered (import some.package first)" in reg.unknown_message("x")

    @reg.entries_of
    class Base:
        name = "a"

    with pytest.raises(TypeError, match="not a Base"):
        reg.register("a")(object())
    a = reg.register("a")(Base())
    assert reg.register("a")(a) is a  # the same object again is fine
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(Base())
    with pytest.raises(ValueError, match="another name"):
        reg.register("b")(Base())
    assert "did you mean 'oracle'" in JUDGES.unknown_message("orcale")
    assert set(JUDGES.names()) >= {"oracle", "self", "hf", "reward_model", "openai"}
    assert [k for k in JUDGES.names() if JUDGES.get(k).needs_policy] == ["self"]


def test_kind_tables_parse_in_every_judge_section():
    cfg = config.parse({**BASE, "judge": {"name": "openai", "batch_size": 4,
                                          "openai": {"model": "m", "base_url": "http://h/v1", "template": "builtin:dno6"}},
                        "eval": {"validation": {"judge": {"name": "hf", "hf": {"model": "m", "samples": 2,
                                                                               "temperature": 0.5}}}}})
    assert cfg.judge.batch_size == 4 and cfg.judge.options.base_url == "http://h/v1"
    assert cfg.eval.validation.judge.options.samples == 2 and cfg.eval.alpaca_eval.judge.name == "oracle"
    assert judge_scale(cfg.judge) == (1.0, 6.0)
    d = cfg.to_dict()
    assert d["judge"]["openai"]["model"] == "m" and "options" not in d["judge"]
    assert config.parse(d) == cfg  # the dict is spelled as the TOML tables are


def test_flat_options_name_their_table():
    assert errors({"name": "openai", "base_url": "u", "model": "m"}) == [
        "judge.base_url: an option of the 'openai' judge: set it as [judge.openai].base_url, in the judge's own table",
        "judge.model: an option of the 'openai' judge: set it as [judge.openai].model, in the judge's own table"]
    got = errors({"name": "oracle"}, eval={"alpaca_eval": {"judge": {"name": "hf", "template": "t"}}})
    assert got == ["eval.alpaca_eval.judge.template: an option of the 'hf' judge: set it as "
                   "[eval.alpaca_eval.judge.hf].template, in the judge's own table"]
    assert errors({"name": "oracle", "template": "t"})[0].startswith(
        "judge.template: an option of the 'hf', 'openai', 'self' judges ([judge.<kind>].template)")


def test_kind_checks_and_misplaced_tables():
    assert errors({"name": "hf"}) == ["judge.hf.model: judge 'hf' needs a model"]
    assert errors({"name": "openai", "openai": {"model": "m"}}) == ["judge.openai.base_url: the openai judge needs base_url"]
    assert errors({"name": "self", "self": {"samples": 3}})[0].startswith("judge.self.samples: several samples of a greedy")
    assert errors({"name": "oracle", "hf": {"model": "m"}}) == ["judge.hf: options of another judge; judge.name is 'oracle'"]
    assert errors({"name": "orcale"})[0].startswith("judge.name: unknown judge 'orcale'; did you mean 'oracle'?")
    assert errors({"name": "self", "self": {"samplez": 2}}) == ["judge.self.samplez: unknown key; did you mean 'samples'?"]
    assert errors({"name": "oracle"}, eval={"alpaca_eval": {"judge": {"name": "self"}}}) == [
        "eval.alpaca_eval.judge.name: judge 'self' is the policy, which cannot judge its own evaluation outputs "
        "fairly; choose another judge"]


# ---- a new kind: what one module of harness/judges would hold ----------------------------

@dataclass(frozen=True)
class ConstantOptions:
    score: float = opt(3.0, "The score every item gets.", min=1.0, max=5.0)


class ConstantJudge:
    def __init__(self, value: float):
        self.name, self.scale, self.value = "constant", (1.0, 5.0), value

    def score(self, items):
        return [Verdict(score=self.value, raw=(str(self.value),), scores=(self.value,)) for _ in items]


class Constant(JudgeKind):
    name = "constant"
    Options = ConstantOptions

    def scale(self, options, where):
        return (1.0, 5.0)

    def check(self, options, where):
        return [FieldError(f"{where}.score", "must be whole")] if options.score % 1 else []

    def build(self, section, policy, seed_key):
        return ConstantJudge(section.options.score), {"score": section.options.score}


@pytest.fixture
def constant_kind():
    kind = JUDGES.register("constant")(Constant())
    yield kind
    JUDGES._items.pop("constant")


def test_a_new_kind_is_one_registration(constant_kind, tmp_path):
    cfg = config.parse({**BASE, "judge": {"name": "constant", "constant": {"score": 4.0}}})
    judge = build_judge(cfg.judge, cache_path=tmp_path / "c.jsonl")
    assert [v.score for v in judge.score([JudgeItem("p", "q", "a")])] == [4.0]
    assert '"kind":"constant"' in judge.identity and judge_scale(cfg.judge) == (1.0, 5.0)
    assert errors({"name": "constant", "constant": {"score": 2.5}}) == ["judge.constant.score: must be whole"]
    assert errors({"name": "constant", "score": 2.0})[0].startswith("judge.score: an option of the 'constant' judge")
