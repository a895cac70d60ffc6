"""OpenAIJudge against a local fake chat-completions server (127.0.0.1, port 0); never the internet."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness.config import JudgeSection
from harness.judges import build_judge
from harness.judges.base import JudgeItem
from harness.judges.http import JudgeRequestError, MissingAPIKey, OpenAIJudge
from harness.judges.parsing import ERROR_PREFIX

KEY_ENV = "HARNESS_TEST_JUDGE_KEY"
TEMPLATE = "Q: {instruction}\nA: {response}"


def reply(content):
    return 200, json.dumps({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


class FakeServer:
    """``behave(body, n_for_this_instruction) -> (status, body_text[, sleep_s[, headers]])``."""

    def __init__(self, behave):
        self.behave = behave
        self.requests = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                instr = body["messages"][-1]["content"].split("\n")[0][3:]
                with outer.lock:
                    n = sum(1 for r in outer.requests if r["instr"] == instr)
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                           "instr": instr})
                status, text, *rest = outer.behave(body, instr, n)
                sleep = rest[0] if rest else 0
                headers = rest[1] if len(rest) > 1 else {}
                time.sleep(sleep)
                try:
                    data = text.encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def count(self, instr):
        return sum(1 for r in self.requests if r["instr"] == instr)


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sekrit")
    servers = []

    def start(behave):
        s = FakeServer(behave)
        s.thread.start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.httpd.shutdown()
        s.httpd.server_close()


def judge_for(server_url, **kw):
    args = dict(template=TEMPLATE, api_key_env=KEY_ENV, timeout_s=2.0, max_retries=2, backoff_s=0.01,
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
    section = JudgeSection(name="openai", model="m", base_url="http://127.0.0.1:9/v1", api_key_env=KEY_ENV)
    with pytest.raises(MissingAPIKey, match=f"judge.api_key_env.*{KEY_ENV}"):
        build_judge(section)


def test_build_judge_wires_the_section(serve):
    server = serve(lambda body, instr, n: reply("Score: 4"))
    section = JudgeSection(name="openai", model="judge-model", base_url=server.url + "/", api_key_env=KEY_ENV,
                           samples=3, temperature=0.7, max_new_tokens=17, timeout_s=5, max_retries=0, batch_size=2)
    judge = build_judge(section, seed_key=(3,))
    assert isinstance(judge, OpenAIJudge) and judge.concurrency == 2 and judge.max_retries == 0
    (v,) = judge.score([JudgeItem("p", "hello", "world")])
    assert v.score == 4.0 and len(v.raw) == 3
    body = server.requests[0]["body"]
    assert body["max_tokens"] == 17 and body["temperature"] == 0.7
    assert "<request>\nhello\n</request>" in body["messages"][0]["content"]  # the built-in rubric
