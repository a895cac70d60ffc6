"""MT-Bench (harness.evaluate.mt_bench) against a local fake OpenAI-compatible judge: FastChat's
prompts as FastChat fills them, its request, its rating parser, the scores, resuming, transport
faults, per-item outcomes, the protocol record and label, and the import of FastChat judgment files."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest

from test_eval_fixtures import tiny, tiny_dir  # noqa: F401  (fixtures)
from test_judges_http import LocalEndpoint, send_json

import harness.judges  # noqa: F401  (registers the judge kinds the config parses)
import harness.methods  # noqa: F401
from harness.config.experiment import parse
from harness.evaluate import mt_bench as mt
from harness.judges.judging import JudgeTransportError

KEY_ENV = "HARNESS_TEST_MT_BENCH_KEY"
IDS = [81, 101, 111, 131]  # writing, reasoning, math, extraction

SINGLE_V1 = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your "
    "evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, "
    "you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for "
    "example: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]")  # FastChat 0e6d3e4's single-v1, as its judge_prompts.jsonl holds it


def rating_of(content: str) -> str:
    """The fake judge's answer to a prompt: a rating 1-10 in [[x]] form, the [x] fallback, or none."""
    d = hashlib.sha256(content.encode()).digest()
    r = d[0] % 10 + 1
    return [f"Fine. Rating: [[{r}]]", f"Rating: [{r}.5]", "I cannot rate this."][d[1] % 3]


class Judge(LocalEndpoint):
    """A chat-completions server answering ``rating_of`` the last message; ``fail(body, n)`` -> an
    HTTP status to answer instead (n = times this prompt was asked before)."""

    def __init__(self, fail=None):
        self.requests: list[dict] = []
        self.lock = threading.Lock()

        def on_post(handler, body):
            content = body["messages"][-1]["content"]
            with self.lock:
                n = sum(1 for r in self.requests if r["messages"][-1]["content"] == content)
                self.requests.append(body)
            status = fail(body, n) if fail else None
            if status:
                send_json(handler, status, json.dumps({"error": {"message": "busy"}}))
                return
            send_json(handler, 200, json.dumps({"choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": rating_of(content)}}], "usage": {"prompt_tokens": 10,
                                                                                  "completion_tokens": 5}}))

        super().__init__(on_post)


@pytest.fixture
def judge(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sekrit")
    made = []

    def start(fail=None):
        made.append(Judge(fail))
        return made[-1]

    yield start
    for j in made:
        j.close()


def section(url: str, **kw):
    doc = {"experiment": {"name": "t"}, "model": {"base": "tiny"}, "method": {"name": "spin"},
           "data": {"train": "tiny:sft"},
           "eval": {"mt_bench": {"enabled": True, "question_ids": IDS, "max_new_tokens": 6, **kw,
                                 "judge": {"name": "openai", "batch_size": 3,
                                           "openai": {"base_url": url, "model": "gpt-4", "api_key_env": KEY_ENV,
                                                      "max_retries": 1}}}}}
    return parse(doc).eval.mt_bench


def grader(sec):
    return mt.Grader.of(sec, backoff_s=0.01)


def test_rating_parser_is_fastchats():
    assert mt.parse_rating("Good answer. Rating: [[8]]") == 8
    assert mt.parse_rating("Rating: [[7.5]] and [[3]]") == 7.5  # the first [[x]]
    assert mt.parse_rating("I give it [9] overall") == 9  # the [x] fallback
    assert mt.parse_rating("[3] first, but [[6]] later") == 6  # [[x]] anywhere beats an earlier [x]
    assert mt.parse_rating("Rating: [[10.]]") == 10.0
    for bad in ("no rating", "Rating: [[ 8 ]]", "[[8/10]]", "Rating: 8", ""):
        assert mt.parse_rating(bad) == mt.INVALID, bad
    assert not mt.valid(mt.INVALID) and mt.valid(1) and not mt.valid(float("nan"))


def test_prompt_names_and_temperatures_are_fastchats():
    assert [mt.prompt_name(c, t) for c, t in (("writing", 1), ("stem", 2), ("math", 1), ("coding", 2),
                                              ("reasoning", 1))] == \
        ["single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn", "single-math-v1"]
    assert mt.temperatures(section("http://x/v1")) == {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0,
                                                       "math": 0.0, "coding": 0.0, "reasoning": 0.0, "stem": 0.1,
                                                       "humanities": 0.1}
    assert mt.temperatures(section("http://x/v1", temperatures={"writing": 0.2}))["writing"] == 0.2
    assert len(mt.load_questions()) == 80 and [q["question_id"] for q in mt.load_questions(IDS)] == IDS
    assert set(mt.load_references()) == {q["question_id"] for q in mt.load_questions()
                                         if q["category"] in mt.NEED_REF_CATS}


def test_requests_are_fastchats_prompts_and_ratings_give_the_scores(judge):
    server = judge()
    sec = section(server.url)
    qs = mt.load_questions(IDS)
    answers = {q["question_id"]: [f"  answer one to {q['question_id']} {{braces}}", f"answer two {q['question_id']}"]
               for q in qs}
    got = mt.grade(grader(sec), qs, answers, "m")
    assert len(server.requests) == 8 and [(j["question_id"], j["turn"]) for j in got] == \
        [(i, t) for i in IDS for t in (1, 2)]
    by = {(b["messages"][-1]["content"]): b for b in server.requests}
    for j in got:
        body = by[j["user_prompt"]]
        # FastChat's chat_completion_openai request: the prompt's system message, then the filled template
        prompt = mt.load_judge_prompts()[j["judge"][1]]
        assert body == {"model": "gpt-4", "n": 1, "temperature": 0, "max_tokens": 2048,
                        "messages": [{"role": "system", "content": prompt["system_prompt"]},
                                     {"role": "user", "content": j["user_prompt"]}]}
        assert j["score"] == mt.parse_rating(rating_of(j["user_prompt"])) and j["model"] == "m"
    writing1 = next(j for j in got if j["question_id"] == 81 and j["turn"] == 1)
    q81 = qs[0]
    assert writing1["judge"] == ["gpt-4", "single-v1"]
    assert writing1["user_prompt"] == SINGLE_V1.replace("{question}", q81["turns"][0]).replace(
        "{answer}", answers[81][0])
    math2 = next(j for j in got if j["question_id"] == 111 and j["turn"] == 2)
    ref = mt.load_references()[111]["choices"][0]["turns"]
    q111 = qs[2]
    text = math2["user_prompt"]
    assert math2["judge"] == ["gpt-4", "single-math-v1-multi-turn"]
    parts = [q111["turns"][0], ref[0], q111["turns"][1], ref[1], "<|The End of Reference Answer|>",
             q111["turns"][0], answers[111][0], q111["turns"][1], answers[111][1]]
    at = [text.index(p, text.index(parts[i - 1]) + 1 if i else 0) for i, p in enumerate(parts)]
    assert at == sorted(at)
    extraction = next(j for j in got if j["question_id"] == 131 and j["turn"] == 2)
    assert extraction["judge"] == ["gpt-4", "single-v1-multi-turn"] and "Reference" not in extraction["user_prompt"]
    m = mt.compute_metrics(got)
    ok = [j["score"] for j in got if j["score"] != -1]
    assert m["mt_bench/score"] == pytest.approx(sum(ok) / len(ok))
    assert m["mt_bench/n_invalid"] == 8 - len(ok) and m["mt_bench/n_turns"] == 8
    t2 = [j["score"] for j in got if j["turn"] == 2 and j["score"] != -1]
    assert m["mt_bench/turn_2"] == (pytest.approx(sum(t2) / len(t2)) if t2 else None)
    w = [j["score"] for j in got if j["category"] == "writing" and j["score"] != -1]
    assert m["mt_bench/writing"] == (pytest.approx(sum(w) / len(w)) if w else None)


def test_turns_are_generated_in_order_at_fastchats_temperatures(judge, tmp_path):
    calls = []

    def fake_generate(model, tok, prompts, sampling, *, seed_key, batch_size, log, desc):
        calls.append((sampling.temperature, seed_key, [p.messages for p in prompts]))
        return {p.id: {"id": p.id, "samples": [{"text": f" ans {p.id} t{len(p.messages)} ", "n_tokens": 3,
                                                 "finish": "eos"}]} for p in prompts}

    sec = section("http://x/v1", question_ids=[81, 111, 141])
    qs = mt.load_questions(sec.question_ids)
    samples = mt.generate_answers(None, None, qs, sec, tmp_path, seed_key=(0, 1), batch_size=2,
                                  system_prompt="Be brief.", generate_fn=fake_generate)
    assert [(t, k) for t, k, _ in calls] == [(0.0, (0, 1, "mt_bench", 1)), (0.1, (0, 1, "mt_bench", 1)),
                                             (0.7, (0, 1, "mt_bench", 1)), (0.0, (0, 1, "mt_bench", 2)),
                                             (0.1, (0, 1, "mt_bench", 2)), (0.7, (0, 1, "mt_bench", 2))]
    second = calls[5][2][0]  # question 81 (writing, 0.7), turn 2: its first answer stripped, then turn 2
    assert second == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": qs[0]["turns"][0]},
                      {"role": "assistant", "content": "ans 81 t2"}, {"role": "user", "content": qs[0]["turns"][1]})
    recs = mt.answer_records(qs, samples, "m")
    assert recs[0]["choices"][0]["turns"] == ["ans 81 t2", "ans 81 t4"]


def test_run_resumes_and_writes_items_and_protocol(tiny, judge, tmp_path):
    from harness.evaluate.outcomes import read_items, write_items
    from harness.report import protocol as P

    model, tok = tiny
    server = judge()
    sec = section(server.url)
    kw = dict(seed_key=(0, 1), model_id="tiny/iter_001", batch_size=4)
    out = tmp_path / "evaluate" / "mt_bench"
    m = mt.run_mt_bench(model, tok, sec, out, **kw)
    judged = json.loads((out / "judgments.json").read_text())
    assert len(judged) == 8 and len(server.requests) == 8 and m["mt_bench/n_turns"] == 8
    assert m["mt_bench/n_invalid"] == sum(j["score"] == -1 for j in judged) >= 1
    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == IDS and all(len(a["choices"][0]["turns"]) == 2 for a in answers)
    # a rerun: generation logs and valid judgments reused, the invalid ratings asked again
    assert mt.run_mt_bench(model, tok, sec, out, **kw) == m
    assert len(server.requests) == 8 + m["mt_bench/n_invalid"]
    saved = json.loads((out / "metrics.json").read_text())
    proto = saved["protocol"]
    assert proto["endpoint"] == {"base_url": server.url, "model": "gpt-4"} and proto["questions"] == IDS
    assert proto["max_new_tokens"] == 6 and proto["reference_answers"] == "gpt-4"
    assert proto["chat_template"]["sha256"] == hashlib.sha256(tok.chat_template.encode()).hexdigest()
    # per-item outcomes for paired statistics: one per valid turn, keyed by question and turn
    write_items(tmp_path / "evaluate")
    items = read_items(tmp_path / "evaluate")
    valid = {f"{j['question_id']}/turn_{j['turn']}": j["score"] for j in judged if j["score"] != -1}
    assert items["mt_bench/score"] == valid
    assert items["mt_bench/turn_1"] == {k.split("/")[0]: v for k, v in valid.items() if k.endswith("turn_1")}
    # the protocol: a local endpoint under a GPT-4 name is not GPT-4; a subset and a short cap are named
    row = {"metrics": m, "protocol": {"mt_bench": proto}}
    assert P.scope_of("mt_bench/score") == "mt_bench" and P.scopes([row]) == ["mt_bench"]
    assert P.label(P.record(row, "mt_bench"), scope="mt_bench") == \
        f"MT-Bench judged by gpt-4 at {server.url}, 4 of 80 questions, answers capped at 6 tokens"
    other = {**proto, "endpoint": {"base_url": "https://api.openai.com/v1", "model": "gpt-4"}}
    assert P.difference(proto, other, "mt_bench") == \
        f"judge endpoint differs: gpt-4 at {server.url} vs gpt-4 at https://api.openai.com/v1"
    assert P.difference(proto, {**proto, "chat_template": {"sha256": "x"}}, "mt_bench") is None


def test_transport_faults_are_never_stored_and_a_rerun_asks_only_them(judge, tmp_path):
    from harness.store.files import JsonlLog

    healed = threading.Event()

    def broken(content: str) -> bool:
        return hashlib.sha256(content.encode()).digest()[2] % 3 == 0

    server = judge(lambda body, n: None if healed.is_set() or not broken(body["messages"][-1]["content"]) else 503)
    sec = section(server.url)
    qs = mt.load_questions(IDS)
    answers = {q["question_id"]: ["a", "b"] for q in qs}
    path = tmp_path / "judgments.jsonl"
    with pytest.raises(JudgeTransportError, match="MT-Bench judging of m"):
        mt.grade(grader(sec), qs, answers, "m", log=JsonlLog(path))
    failed = {b["messages"][-1]["content"] for b in server.requests if broken(b["messages"][-1]["content"])}
    stored = JsonlLog(path).records.values()
    assert failed and len(stored) == 8 - len(failed) and not any(r["user_prompt"] in failed for r in stored)
    healed.set()
    before = len(server.requests)
    got = mt.grade(grader(sec), qs, answers, "m", log=JsonlLog(path))
    asked = sorted(b["messages"][-1]["content"] for b in server.requests[before:])
    # exactly the turns that got no answer, and the stored ones whose rating was invalid
    assert asked == sorted(failed | {r["user_prompt"] for r in stored if r["score"] == -1})
    assert len(got) == 8 and len(JsonlLog(path).records) == 8


def test_a_refused_request_stops_judging_and_keeps_what_was_judged(judge, tmp_path):
    from harness.judges.http import JudgeRequestError
    from harness.store.files import JsonlLog

    first = {"asked": 0}

    lock = threading.Lock()

    def fail(body, n):  # the last of the 8 prompts asked is refused (HTTP 401) until the key is fixed
        with lock:
            first["asked"] += 1
            if first["asked"] == 8:
                first["content"] = body["messages"][-1]["content"]
        return 401 if body["messages"][-1]["content"] == first.get("content") and not first.get("fixed") else None

    server = judge(fail)
    sec = section(server.url)
    qs = mt.load_questions(IDS)
    path = tmp_path / "judgments.jsonl"
    with pytest.raises(JudgeRequestError, match="HTTP 401"):
        mt.grade(grader(sec), qs, {q["question_id"]: ["a", "b"] for q in qs}, "m", log=JsonlLog(path))
    kept = JsonlLog(path).records
    assert len(kept) == 7 and first["content"] not in {r["user_prompt"] for r in kept.values()}
    assert all(r["judgment"] == rating_of(r["user_prompt"]) for r in kept.values())
    first["fixed"] = True
    before = len(server.requests)
    mt.grade(grader(sec), qs, {q["question_id"]: ["a", "b"] for q in qs}, "m", log=JsonlLog(path))
    assert len(server.requests) - before == 8 - sum(mt.valid(r["score"]) for r in kept.values())


def test_fastchat_judgment_file_imports_as_a_row(tmp_path):
    from harness.report import protocol as P

    rows = [{"question_id": 81, "model": "vicuna", "judge": ["gpt-4", "single-v1"], "score": 8, "turn": 1},
            {"question_id": 81, "model": "vicuna", "judge": ["gpt-4", "single-v1-multi-turn"], "score": 6, "turn": 2},
            {"question_id": 111, "model": "vicuna", "judge": ["gpt-4", "single-math-v1"], "score": -1, "turn": 1},
            {"question_id": 111, "model": "vicuna", "judge": ["gpt-4", "single-math-v1-multi-turn"], "score": 3,
             "turn": 2},
            {"question_id": 81, "model": "llama", "judge": ["gpt-4", "single-v1"], "score": 1, "turn": 1}]
    path = tmp_path / "gpt-4_single.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m, rec = mt.import_judgments(path, "vicuna")
    assert m["mt_bench/score"] == pytest.approx((8 + 6 + 3) / 3) and m["mt_bench/turn_1"] == 8
    assert m["mt_bench/turn_2"] == pytest.approx(4.5) and m["mt_bench/n_invalid"] == 1
    assert m["mt_bench/writing"] == 7 and m["mt_bench/math"] == 3
    assert P.label(rec, scope="mt_bench") == "MT-Bench (gpt-4 judge), 2 of 80 questions"
    with pytest.raises(ValueError, match="no judgments of model 'alpaca'"):
        mt.import_judgments(path, "alpaca")


def test_config_rules():
    from harness.config.schema import ConfigError

    def errors(**kw):
        doc = {"experiment": {"name": "t"}, "model": {"base": "tiny"}, "method": {"name": "spin"},
               "data": {"train": "tiny:sft"}, "eval": {"mt_bench": {"enabled": True, **kw}}}
        try:
            parse(doc)
        except ConfigError as e:
            return str(e)
        return ""

    assert "eval.mt_bench.judge.name" in errors()
    ok = {"judge": {"name": "openai", "openai": {"base_url": "http://x/v1", "model": "gpt-4"}}}
    assert errors(**ok) == ""
    assert "eval.mt_bench.question_ids: no MT-Bench question 7" in errors(question_ids=[81, 7], **ok)
    assert "eval.mt_bench.temperatures: unknown category poetry" in errors(temperatures={"poetry": 1.0}, **ok)


def test_tiny_run_with_mt_bench_rows_table_and_published_import(tiny_dir, judge, tmp_path, capfd, monkeypatch):
    from test_eval_fixtures import experiment_head

    from harness.cli import main

    server = judge()
    monkeypatch.chdir(tmp_path)
    words = ["fox", "dog", "yes", "no", "lazy", "quick", "brown", "the"]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"say {words[i % 8]} {words[(i * 3 + 1) % 8]}",
                                        "response": f"{words[i % 8]} {words[(i * 3 + 1) % 8]}"}) + "\n"
                            for i in range(16)))
    exp = tmp_path / "mt.toml"
    exp.write_text(experiment_head("mt", 1, tmp_path / "runs" / "mt", tiny_dir) + f"""
[method]
name = "spin"
iterations = 1

[data]
train = "{data}"

[generation]
max_new_tokens = 6
batch_size = 8

[training]
learning_rate = 0.005
batch_size = 2
max_length = 48

[eval.indicators]
num_prompts = 0

[eval.mt_bench]
enabled = true
question_ids = {IDS}
max_new_tokens = 4

[eval.mt_bench.judge]
name = "openai"

[eval.mt_bench.judge.openai]
base_url = "{server.url}"
model = "gpt-4"
api_key_env = "{KEY_ENV}"
""")
    assert main(["run", str(exp)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "runs" / "mt" / "mt" / "results.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1] and len(server.requests) == 16
    assert all(r["metrics"]["cost/judge_calls"] == 8 for r in rows)
    assert all(r["protocol"]["mt_bench"]["questions"] == IDS and "mt_bench/score" in r["metrics"] for r in rows)
    gain = rows[1]["paired"]["mt_bench/score"]  # iteration 1 - iteration 0 on the turns both rated
    assert gain["n"] >= 2 and set(gain) >= {"mean", "se", "ci_low", "ci_high"}
    # a published model's FastChat judgments beside the run: another MT-Bench protocol, its own columns
    fastchat = tmp_path / "gpt-4_single.jsonl"
    fastchat.write_text("".join(json.dumps({"question_id": q, "model": "vicuna-7b", "judge": ["gpt-4", "single-v1"],
                                            "score": s, "turn": t}) + "\n"
                                for q in IDS for t, s in ((1, 7), (2, 5))))
    assert main(["import-mt-bench", "--name", "vicuna-7b", "--judgments", str(fastchat),
                 "--dest", str(tmp_path / "runs" / "published")]) == 0
    capfd.readouterr()
    assert main(["table", str(tmp_path / "runs")]) == 0
    table = capfd.readouterr().out
    out = " ".join(table.split())  # the notes under the table are wrapped
    assert "MT-Bench [P1]" in out and "MT-Bench [P2]" in out and "vicuna-7b" in out
    assert f"MT-Bench judged by gpt-4 at {server.url}, 4 of 80 questions, answers capped at 4 tokens" in out
    assert "MT-Bench (gpt-4 judge), 4 of 80 questions" in out
    assert main(["import-mt-bench", "--name", "x", "--judgments", str(fastchat), "--model", "nobody"]) == 1
    assert "no judgments of model 'nobody'" in capfd.readouterr().err
