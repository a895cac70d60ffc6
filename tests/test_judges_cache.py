"""CachedJudge: hits on rerun, keys that change with every identity field, resumability."""

import dataclasses

import pytest

from harness.config.experiment import JudgeSection
from harness.judges import build_judge
from harness.judges.base import JudgeItem, Verdict
from harness.judges.cache import CachedJudge, judge_identity
from harness.store.files import path_fingerprint
from harness.judges.parsing import ERROR_PREFIX


class CountingJudge:
    """Scores by response length; records what it was asked."""

    name = "counting"
    scale = (1.0, 5.0)

    def __init__(self, fail_on=None, error_on=None):
        self.asked = []
        self.fail_on, self.error_on = fail_on, error_on

    def score(self, items):
        self.asked.extend(it.response for it in items)
        out = []
        for it in items:
            if it.response == self.error_on:
                out.append(Verdict(None, (ERROR_PREFIX + "HTTP 503",), (None,)))
            else:
                s = float(min(5, len(it.response)))
                out.append(Verdict(s, (f"Score: {int(s)}",), (s,)))
        if self.fail_on is not None and any(it.response == self.fail_on for it in items):
            err = RuntimeError("fatal")
            err.partial = [v if it.response != self.fail_on else None for it, v in zip(items, out)]
            raise err
        return out


ITEMS = [JudgeItem("p1", "q1", "a"), JudgeItem("p2", "q2", "bbb"), JudgeItem("p3", "q3", "ccccc")]


def test_hits_on_rerun_and_no_reasking(tmp_path):
    path = tmp_path / "judge.jsonl"
    inner = CountingJudge()
    first = CachedJudge(inner, path, "id-A")
    v1 = first.score(ITEMS)
    assert (first.hits, first.misses) == (0, 3) and inner.asked == ["a", "bbb", "ccccc"]
    v_again = first.score(ITEMS[:2])
    assert (first.hits, first.misses) == (2, 3) and len(inner.asked) == 3

    # a restarted stage: a new process opens the same file
    inner2 = CountingJudge()
    second = CachedJudge(inner2, path, "id-A")
    v2 = second.score(ITEMS + [JudgeItem("p4", "q4", "dd")])
    assert (second.hits, second.misses) == (3, 1) and inner2.asked == ["dd"]
    assert v2[:3] == v1 and v_again == v1[:2]
    assert v2[3].score == 2.0
    assert second.name == "counting" and second.scale == (1.0, 5.0)

    # another identity shares the file but never the judgments
    inner3 = CountingJudge()
    CachedJudge(inner3, path, "id-B").score(ITEMS)
    assert inner3.asked == ["a", "bbb", "ccccc"]


def test_key_covers_content_not_prompt_id(tmp_path):
    c = CachedJudge(CountingJudge(), tmp_path / "c.jsonl", "id")
    base = JudgeItem("p", "q", "r", {"answer": "1"})
    assert c.key(base) == c.key(dataclasses.replace(base, prompt_id="other"))
    for changed in (dataclasses.replace(base, instruction="q2"), dataclasses.replace(base, response="r2"),
                    dataclasses.replace(base, meta={"answer": "2"})):
        assert c.key(changed) != c.key(base)
    assert CachedJudge(CountingJudge(), tmp_path / "c.jsonl", "id2").key(base) != c.key(base)


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "judge.jsonl"
    CachedJudge(CountingJudge(), path, "id").score(ITEMS)
    with open(path, "a") as f:
        f.write('{"id": "torn", "score": 4')  # killed mid-write
    inner = CountingJudge()
    c = CachedJudge(inner, path, "id")
    assert [v.score for v in c.score(ITEMS)] == [1.0, 3.0, 5.0] and inner.asked == []
    assert path.read_text().endswith("}\n")


def test_transport_errors_are_not_cached(tmp_path):
    path = tmp_path / "judge.jsonl"
    v = CachedJudge(CountingJudge(error_on="bbb"), path, "id").score(ITEMS)
    assert v[1].score is None and v[1].raw[0].startswith(ERROR_PREFIX)
    inner = CountingJudge()
    again = CachedJudge(inner, path, "id").score(ITEMS)
    assert inner.asked == ["bbb"] and again[1].score == 3.0


def test_chunks_are_saved_before_a_failure(tmp_path):
    path = tmp_path / "judge.jsonl"
    items = [JudgeItem(f"p{i}", f"q{i}", "x" * (i + 1)) for i in range(5)]
    with pytest.raises(RuntimeError, match="fatal"):
        CachedJudge(CountingJudge(fail_on="xxxxx"), path, "id", chunk_size=2).score(items)
    # chunks [0,1], [2,3] finished; chunk [4] failed with nothing partial to keep
    inner = CountingJudge()
    CachedJudge(inner, path, "id", chunk_size=2).score(items)
    assert inner.asked == ["xxxxx"]
    # partial verdicts carried by the exception are kept too
    path2 = tmp_path / "j2.jsonl"
    with pytest.raises(RuntimeError):
        CachedJudge(CountingJudge(fail_on="xx"), path2, "id", chunk_size=3).score(items[:3])
    inner = CountingJudge()
    CachedJudge(inner, path2, "id").score(items[:3])
    assert inner.asked == ["xx"]


def test_identity_text_is_canonical():
    assert judge_identity(a=1, b="x") == judge_identity(b="x", a=1)
    assert judge_identity(a=1) != judge_identity(a=2)


def test_path_fingerprint_follows_content(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "weights.bin").write_bytes(b"\0" * 3000)
    fp = path_fingerprint(d, head=1000)
    assert fp and path_fingerprint(d, head=1000) == fp
    (d / "weights.bin").write_bytes(b"\0" * 2999 + b"\1")  # a change in the tail of a large file
    assert path_fingerprint(d, head=1000) != fp
    assert path_fingerprint("org/some-hub-model") == ""


# ---- identities built by build_judge ----------------------------------------------------

def _key(section, tmp_path, **kw):
    judge = build_judge(section, cache_path=tmp_path / "k.jsonl", **kw)
    assert isinstance(judge, CachedJudge)
    return judge.key(JudgeItem("p", "instruction", "response"))


def test_openai_key_changes_with_every_identity_field(tmp_path, monkeypatch):
    monkeypatch.setenv("K", "x")
    tpl = tmp_path / "tpl.txt"
    tpl.write_text("Other rubric {instruction} / {response}")
    fixed = dict(model="m", base_url="http://127.0.0.1:1/v1", api_key_env="K", samples=3, temperature=0.7)

    def section(**change):
        return JudgeSection.of("openai", **{**fixed, **change})

    base = section()
    k0 = _key(base, tmp_path, seed_key=(0, 1))
    assert _key(base, tmp_path, seed_key=(0, 1)) == k0
    # fields that do not determine a judgment leave the key alone
    assert _key(section(batch_size=3, timeout_s=1, max_retries=0), tmp_path, seed_key=(0, 1)) == k0
    changes = [dict(model="m2"), dict(base_url="http://127.0.0.1:2/v1"), dict(template=str(tpl)),
               dict(samples=2), dict(temperature=0.9), dict(max_new_tokens=65)]
    for change in changes:
        assert _key(section(**change), tmp_path, seed_key=(0, 1)) != k0, change
    assert _key(base, tmp_path, seed_key=(1, 1)) != k0
    assert _key(base, tmp_path, seed_key=(0, 1), identity_extra="x") != k0
    # greedy: the seed has no effect, so it is not part of the key
    greedy = section(temperature=0.0)
    assert _key(greedy, tmp_path, seed_key=(0, 1)) == _key(greedy, tmp_path, seed_key=(0, 2))


def test_self_judge_cache_needs_the_policy_identity(tmp_path):
    section = JudgeSection.of("self", samples=3, temperature=0.7)
    policy = (object(), object())  # never called: only the key is computed here
    with pytest.raises(ValueError, match="identity_extra"):
        build_judge(section, policy=policy, cache_path=tmp_path / "k.jsonl")
    k1 = _key(section, tmp_path, policy=policy, identity_extra="adapter:abc iter:1")
    k2 = _key(section, tmp_path, policy=policy, identity_extra="adapter:def iter:2")
    assert k1 != k2
