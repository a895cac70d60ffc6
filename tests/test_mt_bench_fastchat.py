"""MT-Bench judging equals FastChat's own: FastChat's ``gen_judgment.py`` (fschat 0.2.36, openai
0.28, in ``.venv-fastchat``: ``./install.sh --fastchat``) and the harness (``harness.evaluate.mt_bench``)
grade the same answers to all 80 questions against the same local fake endpoint; every request body,
judge prompt, judgment and rating must be the same, and so must the scores. Then a real judge:
SmolLM2-135M-Instruct served by vLLM (``harness.engines.vllm_server``, seeded) grades two questions
through both, one request at a time, its output capped by a proxy; the requests, judgments, ratings
and scores must be the same. Skipped,
saying why, where the FastChat environment is absent (HARNESS_REQUIRE_FASTCHAT=1, as in .ci/run's
tier, fails instead), and the second where ``.venv-vllm`` or the SmolLM2 wheel is absent.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from test_eval_mt_bench import judge, section  # noqa: F401  (fixture)
from test_judges_http import LocalEndpoint, send_json

from harness.engines import unavailable
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


SMOL_IDS = [81, 111]  # writing (single-v1) and math (single-math-v1, with GPT-4's reference answers)
SMOL_MAX_TOKENS = 48  # the judge's output cap the proxy in front of the server puts on every request


class CappingProxy(LocalEndpoint):
    """A local chat-completions endpoint that records each request as its client sent it and
    forwards it to ``upstream`` with ``max_tokens`` lowered to ``cap`` (the same for every client:
    a 135M judge may otherwise write FastChat's 2048 tokens per turn, minutes each on a CPU)."""

    def __init__(self, upstream: str, cap: int):
        self.requests: list[dict] = []
        self.lock = threading.Lock()

        def on_post(handler, body):
            with self.lock:
                self.requests.append(body)
            req = urllib.request.Request(upstream + "/chat/completions", method="POST",
                                         data=json.dumps({**body, "max_tokens": min(body["max_tokens"], cap)}).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    send_json(handler, r.status, r.read().decode())
            except urllib.error.HTTPError as e:
                send_json(handler, e.code, e.read().decode(errors="replace"))

        super().__init__(on_post)


def test_smollm2_judge_served_by_vllm_equals_fastchats_gen_judgment(monkeypatch):
    """SmolLM2 as the judge (vLLM's server, seeded, one request at a time from each client): the
    harness's and FastChat's requests, judgments, ratings and scores of the same answers, turn by
    turn. Both ask for max_tokens 2048; the proxy between them and the server lowers it to
    SMOL_MAX_TOKENS for both."""
    _require_fastchat()
    why = unavailable()
    if why:
        pytest.skip(f"vLLM server: {why}")
    from harness.engines.vllm_server import serve
    from harness.models.sources import SourceError, locate, materialize

    try:
        path = materialize(locate("smollm2-135m-instruct"))
    except SourceError as e:
        pytest.skip(f"SmolLM2 wheel not installed ({e})")
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    questions = mt.load_questions(SMOL_IDS)
    records = _answers(questions)
    answers = {r["question_id"]: r["choices"][0]["turns"] for r in records}
    with serve(path, "gpt-4", seeded=True) as url:
        proxy = CappingProxy(url, SMOL_MAX_TOKENS)
        try:
            theirs = fastchat_itself(PY, records, proxy.url, MODEL, parallel=1)
            n_theirs = len(proxy.requests)
            ours = mt.grade(mt.Grader(proxy.url, "gpt-4", timeout_s=600, concurrency=1), questions, answers, MODEL)
        finally:
            proxy.close()
    n = 2 * len(SMOL_IDS)
    assert len(ours) == len(theirs) == n_theirs == n and len(proxy.requests) == 2 * n  # no retries either side
    assert sorted(json.dumps(b, sort_keys=True) for b in proxy.requests[:n]) == \
        sorted(json.dumps(b, sort_keys=True) for b in proxy.requests[n:])  # the same requests
    assert all(b["max_tokens"] == mt.JUDGE_MAX_TOKENS and b["temperature"] == 0 for b in proxy.requests)
    assert all(r["judgment"].strip() and r["judgment"] != "$ERROR$" for r in theirs)  # the judge answered
    fields = ("question_id", "turn", "model", "judge", "user_prompt", "judgment", "score")
    by_turn = {(r["question_id"], r["turn"]): {f: r[f] for f in fields} for r in theirs}
    assert {(r["question_id"], r["turn"]): {f: r[f] for f in fields} for r in ours} == by_turn
    cats = {q["question_id"]: q["category"] for q in questions}
    assert mt.compute_metrics(ours) == mt.compute_metrics([{**r, "category": cats[r["question_id"]]}
                                                           for r in theirs])
