"""build_judge dispatch and errors; coverage accounting and the coverage check."""

import math

import pytest

from harness.config.experiment import JudgeSection
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
    # the two valid judgments are served from the cache; the failed one is asked again
    assert cached.score(items) == v and (cached.hits, cached.misses) == (2, 4)


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


class Impossible:
    """A 1-5 judge that gives 3 to every response except those in ``bad``, which get a
    score that cannot be (NaN, infinite, off the scale); records what it was asked."""

    name = "impossible"
    scale = (1.0, 5.0)

    def __init__(self, bad):
        self.bad, self.asked = dict(bad), []

    def score(self, items):
        self.asked += [it.response for it in items]
        return [Verdict(s, ("r",), (s,)) for s in (self.bad.get(it.response, 3.0) for it in items)]


def test_impossible_scores_are_failed_judgments_and_asked_again(tmp_path):
    """NaN, infinite or off-scale scores are never scored: each is a failed judgment
    (counted, stored as None) that a rerun asks again for, alone."""
    from harness.models.data import Example
    from harness.judges.judging import judge_groups
    from harness.methods.base import Candidate, Group
    from harness.store.files import JsonlLog

    groups = [Group(Example(f"p{i}", ({"role": "user", "content": f"task {i}"},)),
                    [Candidate(f"a{i}"), Candidate(f"b{i}")]) for i in range(3)]
    judge = Impossible({"a0": math.nan, "b1": 7.0, "a2": -math.inf})
    path = tmp_path / "judgments.jsonl"
    judged = judge_groups(judge, groups, JsonlLog(path), batch_size=8, what="judging of iteration 1")
    assert [r["scores"] for r in judged.records] == [[None, 3.0], [3.0, None], [None, 3.0]]
    assert judged.n_parse_failed == 3 and [r["failed"] for r in judged.records] == [1, 1, 1]
    assert "nan" not in path.read_text().lower() and "inf" not in path.read_text().lower()
    judge.bad.clear()
    judge.asked.clear()
    judged = judge_groups(judge, groups, JsonlLog(path), batch_size=8, what="judging of iteration 1")
    assert sorted(judge.asked) == ["a0", "a2", "b1"] and judged.n_parse_failed == 0


def test_impossible_scores_are_failed_alpaca_annotations():
    """Under the rubric protocol a NaN score is a failed annotation, not a win."""
    from harness.evaluate.alpaca import annotate

    rows = [{"id": f"r{i}", "instruction": f"task {i}", "output": f"reference {i}"} for i in range(2)]
    judge = Impossible({"model 0": math.nan})
    ann = annotate(judge, rows, {"r0": "model 0", "r1": "model 1"}, "random", (0, 1), "m")
    assert [a["preference"] for a in ann] == [None, 1.5]
