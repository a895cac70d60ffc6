"""OpenAIJudge against a local fake chat-completions server (127.0.0.1, port 0); never the internet."""

import collections
import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness.config.experiment import JudgeSection
from harness.judges import build_judge
from harness.judges.base import JudgeItem
from harness.judges.http import JudgeRequestError, MissingAPIKey, OpenAIJudge
from harness.judges.parsing import ERROR_PREFIX

KEY_ENV = "HARNESS_TEST_JUDGE_KEY"
TEMPLATE = "Q: {instruction}\nA: {response}"


def reply(content):
    return 200, json.dumps({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


DROP = None  # a status that closes the connection without any reply


def send_json(handler: BaseHTTPRequestHandler, status: int, text: str, headers: dict | None = None,
              trickle: float = 0) -> None:
    """Answer one request; ``trickle``: send the body a byte per ``trickle`` seconds. A client
    that has gone (timed out, killed) is not an error of the server's."""
    try:
        data = text.encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        if trickle:
            for i in range(len(data)):
                handler.wfile.write(data[i:i + 1])
                handler.wfile.flush()
                time.sleep(trickle)
        else:
            handler.wfile.write(data)
    except OSError:
        pass


def local_server(on_post, port: int = 0) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """A threading HTTP server on 127.0.0.1 whose POSTs call ``on_post(handler, json_body)``
    (no access log), and the (not yet started) thread that serves it."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            on_post(self, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    return httpd, threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)


class LocalEndpoint:
    """A started ``local_server`` on a free port whose POSTs call ``on_post(handler, body)``:
    its OpenAI-style base ``url`` and ``close``."""

    def __init__(self, on_post):
        self.httpd, thread = local_server(on_post)
        thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeServer:
    """``behave(body, key, n_for_this_key) -> (status, body_text[, sleep_s[, headers[, trickle_s]]])``.

    ``key`` is the instruction (the template's first line) or, with ``by="content"``,
    the whole judge prompt (one per judged item). Status ``DROP`` closes the
    connection unanswered; ``trickle_s`` sends the body one byte per ``trickle_s``."""

    def __init__(self, behave, by="instr", port=0):
        self.behave = behave
        self.requests = []
        self.lock = threading.Lock()
        outer = self

        def on_post(handler, body):
            content = body["messages"][-1]["content"]
            instr = content if by == "content" else content.split("\n")[0][3:]
            with outer.lock:
                n = sum(1 for r in outer.requests if r["instr"] == instr)
                outer.requests.append({"path": handler.path, "headers": dict(handler.headers), "body": body,
                                       "instr": instr})
            status, text, *rest = outer.behave(body, instr, n)
            sleep = rest[0] if rest else 0
            headers = rest[1] if len(rest) > 1 else {}
            trickle = rest[2] if len(rest) > 2 else 0
            time.sleep(sleep)
            if status is DROP:
                handler.close_connection = True
                handler.connection.shutdown(socket.SHUT_RDWR)
                return
            send_json(handler, status, text, headers, trickle)

        self.httpd, self.thread = local_server(on_post, port)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def count(self, instr):
        return sum(1 for r in self.requests if r["instr"] == instr)


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sekrit")
    servers = []

    def start(behave, **kw):
        s = FakeServer(behave, **kw)
        s.thread.start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.httpd.shutdown()
        s.httpd.server_close()


def judge_for(server_url, **kw):
    args = dict(template=TEMPLATE, lo=1, hi=5, api_key_env=KEY_ENV, timeout_s=2.0, max_retries=2, backoff_s=0.01,
                concurrency=4, seed_key=(0, 1))
    args.update(kw)
    return OpenAIJudge(server_url, "judge-model", **args)


def items(*instrs):
    return [JudgeItem(f"id-{i}", ins, f"answer {i}") for i, ins in enumerate(instrs)]


def test_scores_and_request_shape(serve):
    server = serve(lambda body, instr, n: reply("Relevant and complete.\nScore: 4" if instr == "good" else "Score: 2"))
    judge = judge_for(server.url, samples=2, temperature=0.5, max_new_tokens=40)
    good, poor = judge.score(items("good", "poor"))
    assert good.score == 4.0 and good.scores == (4, 4) and good.raw[0] == "Relevant and complete.\nScore: 4"
    assert poor.score == 2.0
    assert len(server.requests) == 4  # 2 items x 2 samples
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sekrit"
    body = req["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.5 and body["max_tokens"] == 40
    assert body["messages"][0]["role"] == "user" and body["messages"][0]["content"].startswith("Q: ")
    # distinct, reproducible per-sample seeds
    seeds = {(r["instr"], r["body"]["seed"]) for r in server.requests}
    assert len(seeds) == 4
    judge.score(items("good"))
    assert {r["body"]["seed"] for r in server.requests[4:]} == {s for i, s in seeds if i == "good"}


def test_timeout_is_retried_then_succeeds(serve):
    server = serve(lambda body, instr, n: (*reply("Score: 5"), 1.0 if n == 0 else 0))
    (v,) = judge_for(server.url, timeout_s=0.2).score(items("slow once"))
    assert v.score == 5.0 and server.count("slow once") == 2


def test_persistent_timeout_fails_cleanly(serve):
    server = serve(lambda body, instr, n: (*reply("Score: 5"), 0.6 if instr == "slow" else 0))
    t0 = time.perf_counter()
    slow, fast = judge_for(server.url, timeout_s=0.2, max_retries=1).score(items("slow", "fast"))
    assert time.perf_counter() - t0 < 2.0
    assert slow.score is None and slow.raw[0].startswith(ERROR_PREFIX) and "timed out" in slow.raw[0]
    assert "2 attempts" in slow.raw[0] and server.count("slow") == 2
    assert fast.score == 5.0


def test_5xx_then_success(serve):
    server = serve(lambda body, instr, n: (503, "overloaded") if n < 2 else reply("Score: 3"))
    (v,) = judge_for(server.url, max_retries=3).score(items("flaky"))
    assert v.score == 3.0 and server.count("flaky") == 3


def test_429_is_retried(serve):
    server = serve(lambda body, instr, n: (429, "slow down", 0, {"Retry-After": "0"}) if n == 0 else reply("Score: 1"))
    (v,) = judge_for(server.url).score(items("busy"))
    assert v.score == 1.0 and server.count("busy") == 2


def test_persistent_5xx_gives_failed_verdicts_and_keeps_the_rest(serve):
    server = serve(lambda body, instr, n: (500, "boom") if instr == "doomed" else reply("Score: 4"))
    judge = judge_for(server.url, samples=2, temperature=1.0, max_retries=2)
    ok1, doomed, ok2 = judge.score(items("ok1", "doomed", "ok2"))
    assert ok1.score == ok2.score == 4.0
    assert doomed.score is None and doomed.scores == (None, None)
    assert all(r.startswith(ERROR_PREFIX) and "HTTP 500: boom" in r for r in doomed.raw)
    assert server.count("doomed") == 2 * 3  # 2 samples x (1 + 2 retries), then give up


def test_malformed_replies_are_parse_failures_with_raw_kept(serve):
    def behave(body, instr, n):
        return {"notjson": (200, "<html>gateway oops</html>"),
                "nochoices": (200, json.dumps({"error": {"message": "nope"}})),
                "nullcontent": (200, json.dumps({"choices": [{"message": {"content": None}}]})),
                "noscore": reply("I like this answer a lot."),
                "fine": reply("Score: 5")}[instr]

    server = serve(behave)
    notjson, nochoices, nullcontent, noscore, fine = judge_for(server.url).score(
        items("notjson", "nochoices", "nullcontent", "noscore", "fine"))
    assert notjson.score is None and notjson.raw[0].startswith(ERROR_PREFIX) and "<html>gateway oops" in notjson.raw[0]
    assert nochoices.score is None and '"nope"' in nochoices.raw[0]
    assert nullcontent.score is None and nullcontent.raw[0].startswith(ERROR_PREFIX)
    # the server did answer: a judgment that does not parse, not a transport error
    assert noscore.score is None and noscore.raw == ("I like this answer a lot.",)
    assert fine.score == 5.0
    assert server.count("notjson") == 1  # not retried


def test_4xx_is_an_immediate_clear_error_with_partial_results(serve):
    def behave(body, instr, n):
        if instr == "bad":
            return 401, '{"error": "bad key"}'
        # "third" keeps the only worker busy while the error cancels "fourth"
        return (*reply("Score: 3"), 0.3 if instr == "third" else 0)

    server = serve(behave)
    judge = judge_for(server.url, concurrency=1, max_retries=3)
    with pytest.raises(JudgeRequestError, match=r"HTTP 401.*bad key") as info:
        judge.score(items("first", "bad", "third", "fourth"))
    err = info.value
    assert err.status == 401 and server.count("bad") == 1  # not retried
    assert len(err.partial) == 4 and err.partial[0].score == 3.0 and err.partial[1] is None
    assert server.count("fourth") == 0  # the rest was not sent


def test_connection_refused_is_retried_then_fails_cleanly(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (v,) = judge_for(f"http://127.0.0.1:{port}/v1", max_retries=1).score(items("x"))
    assert v.score is None and v.raw[0].startswith(ERROR_PREFIX) and "2 attempts" in v.raw[0]


def test_missing_api_key_names_the_variable(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(MissingAPIKey, match=KEY_ENV):
        judge_for("http://127.0.0.1:9/v1")
    section = JudgeSection.of("openai", model="m", base_url="http://127.0.0.1:9/v1", api_key_env=KEY_ENV)
    with pytest.raises(MissingAPIKey, match=f"judge.openai.api_key_env.*{KEY_ENV}"):
        build_judge(section)


def test_build_judge_wires_the_section(serve):
    server = serve(lambda body, instr, n: reply("Score: 4"))
    section = JudgeSection.of("openai", model="judge-model", base_url=server.url + "/", api_key_env=KEY_ENV,
                           samples=3, temperature=0.7, max_new_tokens=17, timeout_s=5, max_retries=0, batch_size=2)
    judge = build_judge(section, seed_key=(3,))
    assert isinstance(judge, OpenAIJudge) and judge.concurrency == 2 and judge.max_retries == 0
    (v,) = judge.score([JudgeItem("p", "hello", "world")])
    assert v.score == 4.0 and len(v.raw) == 3
    body = server.requests[0]["body"]
    assert body["max_tokens"] == 17 and body["temperature"] == 0.7
    assert "<request>\nhello\n</request>" in body["messages"][0]["content"]  # the built-in rubric


def test_dropped_connection_is_retried(serve):
    server = serve(lambda body, instr, n: (DROP, "") if n == 0 else reply("Score: 2"))
    (v,) = judge_for(server.url, max_retries=1).score(items("dropped"))
    assert v.score == 2.0 and server.count("dropped") == 2


def test_503_honours_retry_after(serve):
    server = serve(lambda body, instr, n: (503, "restarting", 0, {"Retry-After": "0"}) if n == 0
                   else reply("Score: 2"))
    t0 = time.perf_counter()
    (v,) = judge_for(server.url, max_retries=1, backoff_s=5.0).score(items("restart"))
    assert v.score == 2.0 and server.count("restart") == 2
    assert time.perf_counter() - t0 < 2.0  # waited Retry-After's 0 s, not the 2.5-5 s backoff


def test_a_trickling_reply_is_a_timeout_not_a_hang(serve):
    # headers at once, then one byte every 50 ms: each read is within the socket
    # timeout, but the whole reply would take seconds
    server = serve(lambda body, instr, n: (*reply("Score: 3" + " " * 60), 0, {}, 0.05) if n == 0
                   else reply("Score: 3"))
    t0 = time.perf_counter()
    (v,) = judge_for(server.url, timeout_s=0.4, max_retries=1).score(items("trickle"))
    assert v.score == 3.0 and server.count("trickle") == 2
    assert time.perf_counter() - t0 < 2.0


# --- the loop's judging and AlpacaEval annotation over a flaky endpoint ---------------------

def _groups(n_prompts=4):
    from harness.models.data import Example
    from harness.methods.base import Candidate, Group

    return [Group(Example(f"p{i}", ({"role": "user", "content": f"task {i}"},)),
                  [Candidate(f"answer {i} a"), Candidate(f"answer {i} b"), Candidate("junk", fixed_score=1.0)])
            for i in range(n_prompts)]


def _score_of(content):
    """The fake judge's deterministic score of one judge prompt."""
    return 1 + int(hashlib.sha256(content.encode()).hexdigest(), 16) % 5


class Answered:
    """Counts the server's successful answers per judge prompt."""

    def __init__(self):
        self.counts = collections.Counter()
        self.lock = threading.Lock()

    def __call__(self, key, text="Looks right.\nScore: {score}"):
        with self.lock:
            self.counts[key] += 1
        return reply(text.format(score=_score_of(key)))


def _expected_contents(groups):
    return {f"Q: {g.example.instruction}\nA: {c.text}" for g in groups for c in g.candidates if c.fixed_score is None}


def test_judging_heals_after_5xx_drops_and_a_hang(serve, tmp_path):
    """Every judge prompt first gets two 500s, a dropped connection and a reply that
    arrives after the judge's timeout, then an answer: the judging completes with
    every item answered exactly once and every prompt in the log once."""
    from harness.judges.judging import judge_groups
    from harness.store.files import JsonlLog

    answered = Answered()

    def behave(body, key, n):
        if n < 2:
            return 500, "internal error"
        if n == 2:
            return DROP, ""
        if n == 3:
            return (*reply("Score: 1"), 0.5)  # sleeps past timeout_s: the client has gone
        return answered(key)

    server = serve(behave, by="content")
    groups = _groups()
    judge = judge_for(server.url, timeout_s=0.25, max_retries=4, concurrency=4)
    log = JsonlLog(tmp_path / "judgments.jsonl")
    judged = judge_groups(judge, groups, log, batch_size=4, what="judging of iteration 1")
    expected = _expected_contents(groups)
    assert set(answered.counts) == expected and set(answered.counts.values()) == {1}
    assert all(server.count(c) == 5 for c in expected)
    lines = [json.loads(x) for x in (tmp_path / "judgments.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [g.example.id for g in groups]  # each prompt once, in order
    for g, rec in zip(groups, lines):
        assert rec["scores"][:2] == [_score_of(f"Q: {g.example.instruction}\nA: {c.text}") for c in g.candidates[:2]]
        assert rec["scores"][2] == 1.0 and rec["failed"] == 0
    assert judged.records == lines and judged.n_items == 8 and judged.parse_summary() is None


def test_judging_with_the_endpoint_down_persists_nothing_and_a_rerun_completes(serve, tmp_path):
    from harness.judges.judging import JudgeTransportError, judge_groups
    from harness.judges import CoverageError
    from harness.store.files import JsonlLog

    with socket.socket() as s:  # a port nobody listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    groups = _groups()
    judge = judge_for(f"http://127.0.0.1:{port}/v1", max_retries=1, concurrency=4)
    path = tmp_path / "judgments.jsonl"
    with pytest.raises(JudgeTransportError) as info:
        judge_groups(judge, groups, JsonlLog(path), batch_size=4, what="judging of iteration 1")
    msg = str(info.value)
    assert isinstance(info.value, CoverageError)  # the command line reports it without a traceback
    assert "judging of iteration 1: 4 of 4 prompts (8 judge items) had judge transport errors" in msg
    assert "rerun" in msg and "Connection refused" in msg
    assert JsonlLog(path).records == {}  # nothing recorded as a judgment

    answered = Answered()
    serve(lambda body, key, n: answered(key), by="content", port=port)  # the endpoint is back
    judged = judge_groups(judge, groups, JsonlLog(path), batch_size=4, what="judging of iteration 1")
    assert set(answered.counts) == _expected_contents(groups) and set(answered.counts.values()) == {1}
    assert [r["id"] for r in judged.records] == [g.example.id for g in groups]


def test_transport_errors_are_retried_parse_failures_are_kept(serve, tmp_path):
    """One item's endpoint keeps failing, another answers without a score: the first
    prompt is retried by the rerun, the second is a kept (failed) judgment that the
    rerun asks again (alone: its prompt's valid judgment is kept); the final log equals
    an uninterrupted run's, byte for byte."""
    from harness.judges.judging import JudgeTransportError, judge_groups
    from harness.store.files import JsonlLog

    groups = _groups()
    doomed = "Q: task 1\nA: answer 1 b"
    unparsable = "Q: task 2\nA: answer 2 a"
    down = {doomed}
    answered = Answered()

    def behave(body, key, n):
        if key in down:
            return 502, "bad gateway"
        return answered(key, "I cannot decide." if key == unparsable else "Fine.\nScore: {score}")

    server = serve(behave, by="content")
    judge = judge_for(server.url, max_retries=1, concurrency=4)
    path = tmp_path / "judgments.jsonl"
    with pytest.raises(JudgeTransportError, match=r"1 of 4 prompts \(1 judge items\).*p1: .*HTTP 502: bad gateway"):
        judge_groups(judge, groups, JsonlLog(path), batch_size=6, what="judging of iteration 2")
    kept = JsonlLog(path).records
    assert sorted(kept) == ["p0", "p2", "p3"]  # p1 is not a judgment
    assert kept["p2"]["scores"][0] is None and kept["p2"]["failed"] == 1
    assert kept["p2"]["raw"][0] == ["I cannot decide."]  # the real answer, kept

    down.clear()
    asked = dict(answered.counts)
    judged = judge_groups(judge, groups, JsonlLog(path), batch_size=6, what="judging of iteration 2")
    again = {k for k, v in answered.counts.items() if v > asked.get(k, 0)}
    # p1 (a prompt is recorded whole) and the failed judgment of p2, not p2's valid one
    assert again == {"Q: task 1\nA: answer 1 a", doomed, unparsable}
    assert set(answered.counts.values()) == {1, 2} and server.count(doomed) == 2 + 1
    assert judged.n_parse_failed == 1 and "p2: 'I cannot decide.'" in judged.parse_summary()
    assert "judging of iteration 2: 1 of 8 judge items had no valid score" in judged.parse_summary()
    assert (judged.n_answers, judged.n_answers_parse_failed, judged.n_answers_truncated) == (8, 1, 0)

    straight = tmp_path / "straight.jsonl"
    judge_groups(judge, groups, JsonlLog(straight), batch_size=6, what="x")
    assert path.read_bytes() == straight.read_bytes()


def test_failed_judgments_are_asked_again_until_the_fixed_endpoint_heals_the_stage(serve, tmp_path):
    """An endpoint answers three items unparsably, over-long or off the scale: the judging
    fails on coverage with a line saying a rerun asks again; every rerun asks the judge
    again for exactly those three (never a valid one), and once the endpoint is fixed the
    rerun passes with a log equal to an uninterrupted run's."""
    from harness.judges import CoverageError, require_coverage
    from harness.judges.judging import judge_groups
    from harness.store.files import JsonlLog

    groups = _groups(6)   # 12 judged items
    bad = {"Q: task 1\nA: answer 1 a": reply("I would rather not grade this."),
           "Q: task 2\nA: answer 2 b": (200, "x" * 10_000),        # over max_reply_bytes
           "Q: task 4\nA: answer 4 a": reply("Score: 9")}          # off the 1-5 scale
    broken = {"on": True}
    answered = Answered()
    server = serve(lambda body, key, n: bad[key] if broken["on"] and key in bad else answered(key), by="content")
    judge = judge_for(server.url, max_reply_bytes=4096, concurrency=4)
    path = tmp_path / "judgments.jsonl"

    def stage():  # what the judge stage does with its .tmp log
        judged = judge_groups(judge, groups, JsonlLog(path), batch_size=4, what="judging of iteration 1")
        require_coverage(judged.n_items - judged.n_parse_failed, judged.n_items, 0.9, "judging of iteration 1")
        return judged

    with pytest.raises(CoverageError) as info:
        stage()
    assert "judging of iteration 1: only 9 of 12 items got a valid judgment" in str(info.value)
    assert "rerun the same command: it asks the judge again for exactly these 3 items" in str(info.value)
    assert len(server.requests) == 12
    with pytest.raises(CoverageError):   # still broken: asked again, failing the same way
        stage()
    assert sorted(r["instr"] for r in server.requests[12:]) == sorted(bad)
    broken["on"] = False
    judged = stage()
    assert sorted(r["instr"] for r in server.requests[15:]) == sorted(bad)
    assert judged.n_parse_failed == 0 and set(answered.counts.values()) == {1}  # valid ones were never re-asked
    straight = tmp_path / "straight.jsonl"
    judge_groups(judge, groups, JsonlLog(straight), batch_size=4, what="x")
    assert path.read_bytes() == straight.read_bytes()


def test_alpaca_annotation_never_records_transport_errors(serve, tmp_path):
    from harness.evaluate.alpaca import annotate
    from harness.judges.judging import JudgeTransportError
    from harness.store.files import JsonlLog

    rows = [{"id": f"r{i}", "instruction": f"task {i}", "output": f"reference {i}"} for i in range(4)]
    outputs = {f"r{i}": f"model {i}" for i in range(4)}
    down = {"task 3"}
    answered = Answered()

    def behave(body, key, n):
        instr = key.split("\n")[0][3:]
        return (503, "overloaded") if instr in down else answered(key)

    server = serve(behave, by="content")
    judge = judge_for(server.url, max_retries=1, concurrency=4)
    log = tmp_path / "annotations.jsonl"
    for position in ("random", "both"):
        with pytest.raises(JudgeTransportError, match="AlpacaEval annotation of m: 1 of 4 instructions had judge "
                                                      "transport errors.*r3: .*HTTP 503"):
            annotate(judge, rows, outputs, position, (0, 1), "m", log=JsonlLog(log), chunk=2)
        assert sorted(JsonlLog(log).records) == ["r0", "r1", "r2"]
        log.unlink()
    with pytest.raises(JudgeTransportError):
        annotate(judge, rows, outputs, "random", (0, 1), "m", log=JsonlLog(log), chunk=2)
    asked = dict(answered.counts)
    down.clear()
    ann = annotate(judge, rows, outputs, "random", (0, 1), "m", log=JsonlLog(log), chunk=2)
    assert [a["id"] for a in ann] == ["r0", "r1", "r2", "r3"]
    assert all(a["preference"] in (1.0, 1.5, 2.0) for a in ann)
    new = {k: v - asked.get(k, 0) for k, v in answered.counts.items() if v > asked.get(k, 0)}
    assert {k.split("\n")[0] for k in new} == {"Q: task 3"} and set(new.values()) == {1}


def test_answers_cut_at_max_tokens_are_marked_truncated(serve):
    """finish_reason "length" = the endpoint stopped at max_tokens: counted apart from parse failures."""
    def behave(body, instr, n):
        cut = instr == "long"
        return 200, json.dumps({"choices": [{"index": 0, "finish_reason": "length" if cut else "stop",
                                             "message": {"role": "assistant",
                                                         "content": "It rambles on and on" if cut else "Score: 3"}}]})

    server = serve(behave)
    long, short = judge_for(server.url).score(items("long", "short"))
    assert long.truncated == (True,) and long.score is None       # no score: a failure, and truncated
    assert short.truncated == (False,) and short.score == 3.0


def test_an_oversized_reply_is_a_counted_failure_and_stays_small(serve, tmp_path):
    """An endpoint answering every request with a 20 MB body (or a valid reply whose answer
    ignores max_tokens): not read whole, not stored whole, not retried; each such item is a
    failed judgment, counted and shown like a parse failure."""
    from harness.judges.judging import judge_groups
    from harness.store.files import JsonlLog

    huge_body = "x" * (20 << 20)
    long_answer = reply("blah " * 40_000 + "Score: 4")[1]  # 200 kB: far beyond max_tokens=64

    def behave(body, key, n):
        return 200, long_answer if "answer 0" in key else huge_body

    server = serve(behave, by="content")
    groups = _groups(16)
    judge = judge_for(server.url, max_new_tokens=64, timeout_s=20.0)
    log = JsonlLog(tmp_path / "judgments.jsonl")
    judged = judge_groups(judge, groups, log, batch_size=8, what="judging of iteration 1")
    assert judged.n_items == 32 and judged.n_parse_failed == 32 and judged.metrics()["judge/coverage"] == 0.0
    assert len(server.requests) == 32  # one request each: an over-long reply is an answer, not retried
    assert (tmp_path / "judgments.jsonl").stat().st_size < 32 * 3000
    raws = [r[0] for rec in judged.records for r in rec["raw"][:2]]
    assert all(r.startswith("[reply too long] ") for r in raws)
    assert any("passed 1048576 bytes (max_reply_bytes" in r for r in raws)
    assert any("the answer has 200008 characters, more than 64 tokens" in r for r in raws)
    assert "no valid score" in judged.parse_summary() and "[reply too long]" in judged.parse_summary()
    # the cap is an option of [judge.openai]
    small = judge_for(server.url, max_reply_bytes=4096)
    assert small.max_reply_bytes == 4096
    section = JudgeSection.of("openai", model="m", base_url=server.url, api_key_env=KEY_ENV, max_reply_bytes=4096)
    assert build_judge(section).max_reply_bytes == 4096
