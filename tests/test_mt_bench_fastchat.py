"""MT-Bench judging equals FastChat's own: FastChat's ``gen_judgment.py`` (fschat 0.2.36, openai
0.28, in ``.venv-fastchat``: ``./install.sh --fastchat``) and the harness (``harness.evaluate.mt_bench``)
grade the same answers to all 80 questions against the same local fake endpoint; every request body,
judge prompt, judgment and rating must be the same, and so must the scores. Skipped, saying why,
where that environment is absent (HARNESS_REQUIRE_FASTCHAT=1, as in .ci/run's tier, fails instead).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from test_eval_mt_bench import judge, section  # noqa: F401  (fixture)

from harness.evaluate import mt_bench as mt
from harness.evaluate.crosscheck import fastchat_itself

REPO = Path(__file__).resolve().parents[1]
PY = Path(os.environ.get("HARNESS_FASTCHAT_PYTHON") or REPO / ".venv-fastchat" / "bin" / "python")
MODEL = "tiny"
pytestmark = pytest.mark.slow


def _require_fastchat() -> None:
    if not PY.exists():
        why = f"no FastChat environment ({PY} is missing; ./install.sh --fastchat creates .venv-fastchat)"
        (pytest.fail if os.environ.get("HARNESS_REQUIRE_FASTCHAT") == "1" else pytest.skip)(why)


def _answers(questions: list[dict]) -> list[dict]:
    """Answer records (FastChat's model_answer format, as the harness writes them) that exercise
    the filling: braces, brackets with ratings, unicode, newlines."""
    samples = {q["question_id"]: [{"text": f"Answer to {q['question_id']}:\n{{not a field}} [[3]] é\n"
                                           + q["turns"][0][:40]},
                                  {"text": f"Second {q['question_id']} [7] \\n done"}] for q in questions}
    return mt.answer_records(questions, samples, MODEL)


def test_harness_judging_equals_fastchats_gen_judgment(judge, tmp_path, monkeypatch):  # noqa: F811
    _require_fastchat()
    monkeypatch.setenv("OPENAI_API_KEY", "sekrit")
    server = judge()
    questions = mt.load_questions()
    records = _answers(questions)
    theirs = fastchat_itself(PY, records, server.url, MODEL, parallel=4)
    n_theirs = len(server.requests)
    answers = {r["question_id"]: r["choices"][0]["turns"] for r in records}
    ours = mt.grade(mt.Grader.of(section(server.url, question_ids=[]), backoff_s=0.01), questions, answers, MODEL)
    assert len(theirs) == len(ours) == n_theirs == 160

    def body(b):
        return json.dumps(b, sort_keys=True)

    assert sorted(map(body, server.requests[:n_theirs])) == sorted(map(body, server.requests[n_theirs:]))
    fields = ("question_id", "turn", "model", "judge", "user_prompt", "judgment", "score")
    by_turn = {(r["question_id"], r["turn"]): {f: r[f] for f in fields} for r in theirs}
    assert {(r["question_id"], r["turn"]): {f: r[f] for f in fields} for r in ours} == by_turn
    assert {r["score"] for r in ours} >= {-1} and len({r["score"] for r in ours}) > 3  # ratings of every form
    # the scores: FastChat's show_result means over its valid ratings, as the harness's metrics and import
    valid = [r for r in theirs if r["score"] != -1]
    path = tmp_path / "gpt-4_single.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in theirs))
    for key, rows in (("mt_bench/score", valid), ("mt_bench/turn_1", [r for r in valid if r["turn"] == 1]),
                      ("mt_bench/turn_2", [r for r in valid if r["turn"] == 2])):
        expect = sum(r["score"] for r in rows) / len(rows)
        assert mt.compute_metrics(ours)[key] == pytest.approx(expect, abs=1e-12)
        assert mt.import_judgments(path, MODEL)[0][key] == pytest.approx(expect, abs=1e-12)
