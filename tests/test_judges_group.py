"""Group judging: one prompt's candidates side by side in one judge prompt (DNO's
``judging = "group"``), parsed strictly, through the judge stage's healing path."""

import json
import re

import pytest

import harness.judges.llm as llm_mod
from test_judges_http import DROP, KEY_ENV, judge_for, reply, serve  # noqa: F401  (serve is a fixture)
from test_judges_llm import StubGenerate, make, policy  # noqa: F401  (policy is a fixture)

from harness.config.experiment import JudgeSection, parse
from harness.models.data import Example
from harness.judges import build_judge, judge_scale, score_group
from harness.judges.base import JudgeItem
from harness.judges.parsing import parse_group_scores
from harness.judges.judging import JudgeTransportError, judge_groups, side_by_side
from harness.methods.base import Candidate, Group
from harness.store.files import JsonlLog

GROUP_TEMPLATE = "Q: {instruction}\n{responses}\nScore each."


@pytest.mark.parametrize("text, expected", [
    ("Both fine.\nScore 1: 4\nScore 2: 6", (4, 6)),
    ("**Score 1:** 3\n**Score 2:** 5/6.\n", (3, 5)),
    ("Score 1: 4\nScore 2: 6\nScore 1: 4", (4, 6)),        # a restated line with the same value
    ("Score 1: 4", None),                                   # one candidate unscored
    ("Score 1: 4\nScore 2: 6 because it is longer", None),  # text after the last score
    ("Score 1: 4\nScore 2: 6\nScore 3: 2", None),           # a number outside 1..K
    ("Score 1: 3\nScore 1: 4\nScore 2: 1", None),           # two scores for one candidate
    ("Score 1: 4.5\nScore 2: 6", None),                     # not an integer
    ("Score 1: 0\nScore 2: 6", None),                       # outside the 1-6 scale
    ("Score 1: 4/10\nScore 2: 6", None),                    # another scale
    ("Score: 4", None),                                     # the pointwise form
])
def test_group_answers_are_parsed_strictly(text, expected):
    assert parse_group_scores(text, 2, 1, 6) == expected


def _groups(n=4):
    return [Group(Example(f"p{i}", ({"role": "user", "content": f"task {i}"},)),
                  [Candidate(f"answer {i} a"), Candidate(f"answer {i} b"), Candidate("junk", fixed_score=1.0),
                   Candidate(f"teacher {i}", source="teacher")])
            for i in range(n)]


def _judge(url, **kw):
    return judge_for(url, lo=1, hi=6, group_template=GROUP_TEMPLATE, **kw)


def test_http_group_judging_one_request_per_prompt_failures_counted_transport_healed(serve, tmp_path):
    """Each prompt's three judged candidates go in one request; the answer's K scores land on
    the right candidates; an answer missing a candidate fails the whole group (stored, counted);
    a prompt whose request fails in transport is not stored and a rerun judges only it."""
    down = {"task 3"}

    def behave(body, key, n):
        instr = key.split("\n")[0][3:]
        assert key.count("<answer ") == 3 and "<answer 3>\nteacher" in key and "junk" not in key
        if instr in down:
            return 500, "overloaded"
        if instr == "task 2":
            return reply("Score 1: 5\nScore 3: 2")  # candidate 2 unscored: the group fails
        i = int(instr.split()[1])
        return reply(f"Comparing.\nScore 1: {1 + i}\nScore 2: 6\nScore 3: {4 - i}")

    server = serve(behave, by="content")
    groups = _groups()
    log = JsonlLog(tmp_path / "judgments.jsonl")
    judge = _judge(server.url, max_retries=0)
    with pytest.raises(JudgeTransportError, match="1 of 4 prompts"):
        judge_groups(judge, groups, log, batch_size=8, what="judging of iteration 1", side_by_side=True)
    assert sorted(log.records) == ["p0", "p1", "p2"]  # the failed request was not stored
    assert len(server.requests) == 4  # one request per prompt, not per candidate
    down.clear()
    judged = judge_groups(judge, groups, JsonlLog(tmp_path / "judgments.jsonl"), batch_size=8,
                          what="judging of iteration 1", side_by_side=True)
    assert len(server.requests) == 6  # the rerun asked for p3, and again for p2's failed group (one request)
    by_id = {r["id"]: r for r in judged.records}
    assert by_id["p0"]["scores"] == [1, 6, 1.0, 4] and by_id["p1"]["scores"] == [2, 6, 1.0, 3]
    assert by_id["p3"]["scores"] == [4, 6, 1.0, 1]
    assert by_id["p2"]["scores"] == [None, None, 1.0, None] and by_id["p2"]["failed"] == 3
    assert judged.n_items == 12 and judged.n_parse_failed == 3
    assert judged.metrics()["judge/coverage"] == 0.75
    assert "Score 1: 5" in judged.parse_summary()


def test_llm_group_judging_averages_each_candidate_over_samples(monkeypatch, policy):  # noqa: F811
    stub = StubGenerate({"q": ["Score 1: 2\nScore 2: 5", "Score 1: 4\nScore 2: 5", "Score 1: 3"]})
    monkeypatch.setattr(llm_mod, "generate", stub)
    judge = make(policy, samples=3, temperature=0.7, group_template=GROUP_TEMPLATE)
    a, b = score_group(judge, [JudgeItem("i", "q", "first"), JudgeItem("i", "q", "second")])
    # the third answer scores only one of two: it fails both, and is left out of both means
    assert a.scores == (2, 4, None) and a.score == 3.0
    assert b.scores == (5, 5, None) and b.score == 5.0
    (call,) = stub.calls
    (prompt,) = call["prompts"]
    assert prompt.messages[0]["content"] == ("Q: q\n<answer 1>\nfirst\n</answer 1>\n\n<answer 2>\nsecond\n"
                                             "</answer 2>\nScore each.")


def test_built_judges_carry_the_group_form_of_their_template(serve, policy):  # noqa: F811
    section = JudgeSection.of("self", template="builtin:dno6")
    judge = build_judge(section, policy=policy)
    assert "Score 1: <rating>" in judge.group_template and judge_scale(section) == (1.0, 6.0)
    assert "Score 1: <points>" in build_judge(JudgeSection.of("self"), policy=policy).group_template
    server = serve(lambda body, key, n: reply("Score 1: 3"))
    http = build_judge(JudgeSection.of("openai", model="m", base_url=server.url, api_key_env=KEY_ENV,
                                       template="builtin:dno6"))
    assert "{responses}" in http.group_template and "Score 1: <rating>" in http.group_template
    (v,) = score_group(http, [JudgeItem("i", "q", "r")])
    assert v.score == 3.0


def _dno(tmp_path, judge: dict, judging: str | None = None) -> dict:
    dno = {"num_samples": 2, "prompts_per_iteration": 4}
    if judging:
        dno["judging"] = judging
    rows = [{"prompt": f"what is {i} plus 1"} for i in range(8)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"experiment": {"name": "g", "output_dir": str(tmp_path / "out")},
            "model": {"base": "tiny", "device": "cpu"},
            "method": {"name": "dno", "iterations": 1, "dno": dno},
            "training": {"max_length": 512},  # the tiny model's positions
            "judge": judge, "data": {"train": str(tmp_path / "p.jsonl")}}


def test_dno_judging_option_default_and_checks(tmp_path, monkeypatch):
    from harness.config.experiment import ConfigError
    from harness.validate.experiment import check

    monkeypatch.setenv(KEY_ENV, "k")
    oracle = parse(_dno(tmp_path, {"name": "oracle"}))
    assert oracle.options.judging == "pointwise" and not side_by_side(oracle)  # the tiny DNO's scoring stays
    with pytest.raises(ConfigError, match=re.escape('method.dno.judging: "group" needs an LLM judge')):
        parse(_dno(tmp_path, {"name": "oracle"}, "group"))
    endpoint = {"name": "openai", "openai": {"model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key_env": KEY_ENV}}
    grouped = parse(_dno(tmp_path, endpoint, "group"))
    assert side_by_side(grouped)
    assert not [e for e in check(grouped).errors if "group_template" in e.path]
    tpl = tmp_path / "tpl.txt"
    tpl.write_text("Q: {instruction}\nA: {response}\n")
    endpoint["openai"]["template"] = str(tpl)
    errors = {e.path: e.message for e in check(parse(_dno(tmp_path, endpoint, "group"))).errors}
    assert "has no built-in group form" in errors["judge.openai.group_template"]
    assert not check(parse(_dno(tmp_path, endpoint))).errors  # pointwise needs no group template
    bad = tmp_path / "group.txt"
    bad.write_text("---\nscale: 1-10\n---\nQ: {instruction}\n{responses}\n")
    endpoint["openai"]["group_template"] = str(bad)
    errors = {e.path: e.message for e in check(parse(_dno(tmp_path, endpoint, "group"))).errors}
    assert "both must declare the same range" in errors["judge.openai.group_template"]
