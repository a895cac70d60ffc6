"""build_judge dispatch and errors; coverage accounting and the coverage check."""

import math

import pytest

from harness.config import JudgeSection
from harness.judges import CachedJudge, CoverageError, build_judge, check_coverage, coverage
from harness.judges.base import JudgeItem, Verdict
from harness.tiny import tasks


def test_none_and_missing_policy_are_clear_errors():
    with pytest.raises(ValueError, match=r"judge\.name is 'none'.*oracle"):
        build_judge(JudgeSection.of("none"))
    with pytest.raises(ValueError, match=r"policy=\(model, tokenizer\)"):
        build_judge(JudgeSection.of("self"))


def test_bad_template_path_names_the_field(tmp_path):
    section = JudgeSection.of("self", template=str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match=r"judge\.self\.template"):
        build_judge(section, policy=(object(), object()))


def test_oracle_judge_cached(tmp_path):
    judge = build_judge(JudgeSection.of("oracle"))
    assert judge.name == "oracle" and judge.scale == (1.0, 5.0)
    cached = build_judge(JudgeSection.of("oracle"), cache_path=tmp_path / "o.jsonl")
    assert isinstance(cached, CachedJudge) and '"oracle"' in cached.identity and '"source"' in cached.identity
    import random

    ex = tasks.make_example("add", random.Random(0))
    items = [JudgeItem(ex.id, ex.prompt, ex.answer), JudgeItem(ex.id, ex.prompt, "zzz"),
             JudgeItem("x", "not a tiny task at all", "whatever")]
    v = cached.score(items)
    assert v == judge.score(items) and cached.misses == 3
    assert v[0].score == 5.0 and v[1].score == 1.0 and v[2].score is None
    assert cached.score(items) == v and cached.hits == 3


def V(score):
    return Verdict(score=score, raw=("r",), scores=(score,))


def test_coverage_counts_failures_and_nan():
    c = coverage([V(1.0), V(None), V(4.5), V(math.nan), V(5.0)])
    assert c == {"n_total": 5, "n_scored": 3, "n_failed": 2, "coverage": 0.6}
    assert coverage([]) == {"n_total": 0, "n_scored": 0, "n_failed": 0, "coverage": None}


def test_check_coverage_raises_below_threshold_with_a_clear_message():
    verdicts = [V(3.0)] * 8 + [V(None)] * 2
    assert check_coverage(verdicts, 0.8, "iteration 1 judge")["coverage"] == 0.8  # at the threshold: fine
    with pytest.raises(CoverageError) as info:
        check_coverage(verdicts, 0.9, "iteration 1 judge")
    msg = str(info.value)
    assert "iteration 1 judge" in msg and "8 of 10" in msg and "0.800" in msg and "0.9" in msg and "2 failed" in msg
    with pytest.raises(CoverageError, match="no items"):
        check_coverage([], 0.0, "empty stage")
