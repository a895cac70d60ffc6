"""alpaca_eval's own annotators through the harness, against a local OpenAI-compatible endpoint
(127.0.0.1, port 0; never the internet): the harness's per-instruction preferences and statistics
equal those of ``alpaca_eval.main.evaluate`` run on the same outputs against the same endpoint;
transport faults are retried and never stored; the LC win rate comes from a cached df_gamed.csv."""

from __future__ import annotations

import hashlib
import json
import math
import threading
from pathlib import Path

import pytest

from test_eval_fixtures import SHARED_DATA, require, tiny, tiny_dir  # noqa: F401  (fixtures)
from test_judges_http import LocalEndpoint, local_server, send_json

from harness.config.eval_sections import AlpacaEvalSection
from harness.evaluate.alpaca import AE_SET_SIZE, annotate_alpaca_eval, compute_metrics, run_alpaca_eval
from harness.evaluate.alpaca_instructions import load_instructions
from harness.evaluate.annotators import AE2, RUBRIC, AlpacaEvalAnnotator, Endpoint, config_problems
from harness.evaluate.crosscheck import alpaca_eval_itself
from harness.judges.judging import JudgeTransportError

KEY_ENV = "HARNESS_TEST_ANNOTATOR_KEY"
AE_DATA = SHARED_DATA / "alpaca_eval"
N = 10
METRICS = ("win_rate", "standard_error", "n_wins", "n_draws", "n_total", "discrete_win_rate")


def _digest(body: dict) -> bytes:
    prompt = body.get("messages") or body.get("prompt")
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).digest()


def answer(body: dict) -> dict:
    """A deterministic completion for a request: log-probs of m / M (and three other tokens)
    when asked for them, else a ranking in alpaca_eval_gpt4's format; a few prompts get an
    answer the parsers cannot read."""
    d = _digest(body)
    bad = d[0] % 7 == 0
    if body.get("logprobs"):
        lp_m, lp_M = -(d[1] / 40.0), -(d[2] / 40.0)
        top = [{"token": "m", "logprob": lp_m}, {"token": "M", "logprob": lp_M},
               {"token": "Both", "logprob": -9.5}, {"token": "The", "logprob": -11.0}, {"token": "Output", "logprob": -12.0}]
        if bad:
            top = [t for t in top if t["token"] not in ("m", "M")]   # neither token: alpaca_eval's NaN
        top.sort(key=lambda t: -t["logprob"])
        content = top[0]["token"]
        logprobs = {"content": [{"token": content, "logprob": top[0]["logprob"], "bytes": list(content.encode()),
                                 "top_logprobs": [{**t, "bytes": list(t["token"].encode())}
                                                  for t in top[:body.get("top_logprobs", 5)]]}]}
    else:
        first = 1 if d[1] % 2 else 2
        content = "I cannot decide." if bad else \
            f"[{{'model': 'model_1', 'rank': {first}}}, {{'model': 'model_2', 'rank': {3 - first}}}]"
        logprobs = None
    choice = {"index": 0, "finish_reason": "stop", "logprobs": logprobs,
              "message": {"role": "assistant", "content": content}}
    return {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model", ""),
            "choices": [choice], "usage": {"prompt_tokens": 100 + d[3], "completion_tokens": 1,
                                           "total_tokens": 101 + d[3]}}


class Endpoint_(LocalEndpoint):
    """A local chat-completions server. ``fail(body, n)`` -> an HTTP status to answer
    instead (n = how many times this prompt was asked before), or None."""

    def __init__(self, fail=None):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        def on_post(handler, body):
            with outer.lock:
                n = sum(1 for r in outer.requests if _digest(r["body"]) == _digest(body))
                outer.requests.append({"path": handler.path, "body": body,
                                       "auth": handler.headers.get("Authorization")})
            status = fail(body, n) if fail else None
            if status:
                send_json(handler, status, json.dumps({"error": {"message": "busy"}}))
            else:
                send_json(handler, 200, json.dumps(answer(body)))

        super().__init__(on_post)


@pytest.fixture
def endpoint(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sekrit")
    made = []

    def start(fail=None):
        made.append(Endpoint_(fail))
        return made[-1]

    yield start
    for e in made:
        e.close()


def _shared_rows(n: int = N) -> tuple[list[dict], dict[str, str]]:
    """The first n AlpacaEval instructions with GPT-4 Turbo's reference answers, and
    gemma-7b-it's published answers as the model's."""
    require(AE_DATA.is_dir(), f"published AlpacaEval files not found at {AE_DATA} (shared data folder absent)")
    rows = load_instructions(str(AE_DATA / "gpt4_1106_preview.model_outputs.json"), n)
    gemma = {r["instruction"]: r["output"] for r in json.loads((AE_DATA / "gemma-7b-it.model_outputs.json").read_text())}
    return rows, {r["id"]: gemma[r["instruction"]] for r in rows}


@pytest.mark.parametrize("name", [AE2, "alpaca_eval_gpt4", "weighted_alpaca_eval_vllm_llama3_70b"])
def test_preferences_and_statistics_equal_alpaca_eval_itself(name, endpoint, tmp_path):
    from harness.evaluate.annotators import config_path, load_config

    rows, outputs = _shared_rows()
    server = endpoint()
    generator = "gemma-7b-it"
    # the judge model served under the config's own model name, so that both sides send the same requests
    (cfg,) = load_config(config_path(name)).values()
    served = cfg["completions_kwargs"]["model_name"]
    ours_ann = annotate_alpaca_eval(AlpacaEvalAnnotator(name, Endpoint(server.url, served, api_key_env=KEY_ENV)),
                                    rows, outputs, generator)
    ours, _ = compute_metrics(ours_ann, list(outputs.values()), len(rows))
    ours_requests = [r["body"] for r in server.requests]
    server.requests.clear()
    theirs, their_ann = alpaca_eval_itself(name, rows, outputs, generator, server.url, "sekrit")

    # the same prompts went out, in the same form (messages, max_tokens, temperature, logprobs, ...)
    canon = lambda reqs: sorted(json.dumps(r, sort_keys=True) for r in reqs)  # noqa: E731
    assert canon(ours_requests) == canon(r["body"] for r in server.requests)
    assert len(ours_requests) == N
    # per-instruction preferences, NaN (unparsable) included
    by_instr = {a["instruction"]: a["preference"] for a in their_ann}
    mine = [a["preference"] for a in ours_ann]
    theirs_p = [by_instr[r["instruction"]] for r in rows]
    theirs_p = [None if p is None or (isinstance(p, float) and math.isnan(p)) else p for p in theirs_p]
    assert mine == theirs_p
    valid = [p for p in mine if p is not None]
    assert len(valid) < N and min(valid) < 1.5 < max(valid)   # not degenerate: failures, wins and losses
    if name != "alpaca_eval_gpt4":
        assert len(set(valid)) == len(valid) and all(1 < p < 2 for p in valid)   # continuous, from log-probs
    else:
        assert set(valid) == {1.0, 2.0}
    # statistics, every digit
    for k in METRICS:
        assert ours[f"alpaca_eval/{k}"] == theirs[k], k
    assert ours["alpaca_eval/avg_length"] == theirs["avg_length"]
    assert ours["alpaca_eval/n_total"] < N and ours["alpaca_eval/coverage"] == ours["alpaca_eval/n_total"] / N


def _section(ins: str, url: str, **kw) -> AlpacaEvalSection:
    from harness.config.experiment import parse

    doc = {"experiment": {"name": "t"}, "model": {"base": "tiny"}, "method": {"name": "spin"},
           "data": {"train": "tiny:sft"},
           "eval": {"alpaca_eval": {"instructions": ins, **kw,
                                    "judge": {"name": "openai", "batch_size": 3,
                                              "openai": {"base_url": url, "model": "gpt-4-1106-preview",
                                                         "api_key_env": KEY_ENV, "max_retries": 1}}}}}
    return parse(doc).eval.alpaca_eval


def _write_instructions(path: Path, n: int) -> str:
    path.write_text(json.dumps([{"instruction": f"Write a haiku about the number {i}.", "output": "ref " * (i % 4 + 1),
                                 "generator": "ref_model", "dataset": "unit"} for i in range(n)]))
    return str(path)


def test_run_with_an_annotator_writes_protocol_and_resumes(tiny, endpoint, tmp_path):
    model, tok = tiny
    server = endpoint()
    ins = _write_instructions(tmp_path / "ae.json", 8)
    section = _section(ins, server.url, annotator=AE2, min_coverage=0.0)
    kw = dict(seed_key=(0, 1), generator="tiny/iter_001", max_new_tokens=6, batch_size=4)
    out = tmp_path / "out"
    m = run_alpaca_eval(model, tok, section, None, out, **kw)
    saved = json.loads((out / "metrics.json").read_text())
    proto = saved["protocol"]
    assert proto["annotator"] == AE2 and proto["judge_model"] == "gpt-4-1106-preview"
    assert proto["endpoint_kind"] == "openai:chat/completions" and proto["base_url"] == server.url
    assert proto["completion_parser"] == ["logprob_parser"] and len(proto["template_hash"]) == 64
    assert proto["reference"] == {"instructions": ins, "reference": "instructions", "generator": ["ref_model"]}
    assert (proto["n"], proto["n_instructions"], proto["coverage"]) == (m["alpaca_eval/n_total"], 8,
                                                                      m["alpaca_eval/coverage"])
    assert proto["cost"]["calls"] == len(server.requests) == 8 and proto["cost"]["prompt_tokens"] > 800
    # a local server serving the name gpt-4-1106-preview: its endpoint is recorded, and it is not charged
    # at GPT-4 Turbo's price (no price at all)
    assert proto["endpoint"] == {"base_url": server.url, "model": "gpt-4-1106-preview"}
    assert proto["cost"]["price_usd"] is None and proto["max_new_tokens"] == 6
    assert proto["length_controlled"]["status"] == "unavailable" and "805" in proto["length_controlled"]["reason"]
    ann = json.loads((out / "annotations.json").read_text())
    assert [a["id"] for a in ann] == [r["id"] for r in load_instructions(ins)]
    assert all(a["annotator"] == AE2 and a["output_1"].startswith("ref") for a in ann)
    # the same inputs: no valid annotation is asked again, each failed one is (and fails the same way)
    n_failed = 8 - m["alpaca_eval/n_total"]
    assert n_failed >= 1
    assert run_alpaca_eval(model, tok, section, None, out, **kw) == m
    assert len(server.requests) == 8 + n_failed
    # the tiny oracle through the rubric protocol names itself
    rubric = AlpacaEvalSection(instructions="tiny:alpaca_eval", limit=4)
    assert rubric.protocol == RUBRIC
    from harness.judges import build_judge

    run_alpaca_eval(model, tok, rubric, lambda: build_judge(rubric.judge, seed_key=(0, 1)), tmp_path / "rubric", **kw)
    proto = json.loads((tmp_path / "rubric" / "metrics.json").read_text())["protocol"]
    assert proto["annotator"] == RUBRIC and proto["endpoint_kind"] == "oracle" and proto["position"] == "random"


def test_transport_faults_are_retried_and_never_stored(tiny, endpoint, tmp_path):
    model, tok = tiny
    ins = _write_instructions(tmp_path / "ae.json", 6)
    down = {"on": True}
    # one prompt's endpoint is down (503) until told otherwise; the others answer
    victims: set[bytes] = set()

    def fail(body, n):
        d = _digest(body)
        if down["on"] and (not victims or d in victims):
            victims.add(d)
            return 503
        return None

    server = endpoint(fail)
    section = _section(ins, server.url, annotator=AE2, min_coverage=0.0)
    from harness.evaluate import annotators

    kw = dict(seed_key=(0, 1), generator="g", max_new_tokens=6, batch_size=4)
    orig = annotators.EndpointCompletions.__init__
    annotators.EndpointCompletions.__init__ = lambda self, ep, backoff_s=1.0: orig(self, ep, backoff_s=0.01)
    try:
        with pytest.raises(JudgeTransportError, match="1 of 6 instructions"):
            run_alpaca_eval(model, tok, section, None, tmp_path / "out", **kw)
        log = [json.loads(x) for x in (tmp_path / "out" / "annotations.jsonl").read_text().splitlines()]
        assert len(log) == 5 and not (tmp_path / "out" / "annotations.json").exists()
        assert sum(1 for r in server.requests if _digest(r["body"]) in victims) == 2   # max_retries 1: two attempts
        down["on"] = False
        n_before = len(server.requests)
        m = run_alpaca_eval(model, tok, section, None, tmp_path / "out", **kw)
    finally:
        annotators.EndpointCompletions.__init__ = orig
    # only the missing instruction and the failed (unparsable) annotations are asked again
    assert len(server.requests) == n_before + 1 + sum(r["preference"] is None for r in log)
    assert m["alpaca_eval/n_instructions"] == 6


def _logprob_reply(lp_m: float | None, lp_M: float | None) -> dict:
    """A chat completion whose top log-probabilities give m / M (None: the token is absent)."""
    top = [{"token": t, "logprob": lp} for t, lp in (("m", lp_m), ("M", lp_M), ("Both", -9.5)) if lp is not None]
    top.sort(key=lambda t: -t["logprob"])
    content = top[0]["token"]
    return {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content},
                         "logprobs": {"content": [{"token": content, "logprob": top[0]["logprob"],
                                                   "top_logprobs": top}]}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101}}


def test_failed_annotations_are_asked_again_until_the_fixed_endpoint_heals_the_evaluation(tiny, tmp_path,
                                                                                          monkeypatch):
    """The endpoint answers two instructions with log-probabilities above 0 (impossible) and one
    without the m / M tokens (unparsable): three failed annotations, never scored, and the
    evaluation fails on coverage with a line saying a rerun asks again; once the endpoint is
    fixed, the rerun asks for exactly those three and passes."""
    from harness.judges import CoverageError

    model, tok = tiny
    monkeypatch.setenv(KEY_ENV, "sekrit")
    ins = _write_instructions(tmp_path / "ae.json", 6)
    broken, asked = {"on": True}, []

    def on_post(handler, body):
        i = next(i for i in range(6) if f"the number {i}." in json.dumps(body["messages"]))
        asked.append(i)
        lp = {1: (2.3, -0.1), 4: (-0.1, 1e-3), 2: (None, None)}.get(i) if broken["on"] else None
        send_json(handler, 200, json.dumps(_logprob_reply(*(lp or (-0.2, -1.9)))))

    httpd, thread = local_server(on_post)
    thread.start()
    try:
        section = _section(ins, f"http://127.0.0.1:{httpd.server_address[1]}/v1", annotator=AE2, min_coverage=0.9)
        kw = dict(seed_key=(0, 1), generator="g", max_new_tokens=6, batch_size=4)
        with pytest.raises(CoverageError) as info:
            run_alpaca_eval(model, tok, section, None, tmp_path / "out", **kw)
        msg = str(info.value)
        assert "3/6 instructions got a valid judgment" in msg
        assert "rerun the same command: it asks again for exactly the 3 failed instructions" in msg
        ann = json.loads((tmp_path / "out" / "annotations.json").read_text())
        assert [a["preference"] is None for a in ann] == [False, True, True, False, True, False]
        assert sorted(asked) == list(range(6))
        broken["on"] = False
        m = run_alpaca_eval(model, tok, section, None, tmp_path / "out", **kw)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert sorted(asked[6:]) == [1, 2, 4]
    assert m["alpaca_eval/n_total"] == 6 and m["alpaca_eval/coverage"] == 1.0


def test_impossible_logprobs_are_found_in_both_reply_formats():
    from harness.evaluate.annotators import impossible_logprob

    chat = _logprob_reply(-0.2, -1.9)["choices"][0]["logprobs"]
    assert impossible_logprob(chat) is None and impossible_logprob(None) is None
    assert impossible_logprob(_logprob_reply(-0.2, 1e-9)["choices"][0]["logprobs"]) is None   # float noise at 0
    assert "above 0" in impossible_logprob(_logprob_reply(-0.2, 0.5)["choices"][0]["logprobs"])
    assert "not a number" in impossible_logprob(_logprob_reply(float("nan"), -1.0)["choices"][0]["logprobs"])
    legacy = {"tokens": ["m"], "token_logprobs": [-0.1], "top_logprobs": [{"m": -0.1, "M": -2.0}]}
    assert impossible_logprob(legacy) is None
    assert "above 0" in impossible_logprob({**legacy, "top_logprobs": [{"m": -0.1, "M": 3.0}]})
    assert "not a number" in impossible_logprob({**legacy, "token_logprobs": ["-0.1"]})


def test_config_checks_name_the_annotator_and_its_endpoint(tmp_path):
    from harness.config.experiment import parse
    from harness.config.schema import ConfigError

    def errors(ae: dict) -> str:
        doc = {"experiment": {"name": "t"}, "model": {"base": "tiny"}, "method": {"name": "spin"},
               "data": {"train": "tiny:sft"}, "eval": {"alpaca_eval": ae}}
        try:
            parse(doc)
        except ConfigError as e:
            return str(e)
        return ""

    assert errors({"instructions": "tiny:alpaca_eval"}) == ""                       # rubric + oracle
    assert "did you mean 'weighted_alpaca_eval_gpt4_turbo'" in errors(
        {"instructions": "tiny:alpaca_eval", "annotator": "weighted_alpaca_eval_gpt4_trbo"})
    msg = errors({"instructions": "alpaca_eval"})                                     # default: AlpacaEval 2.0
    assert "eval.alpaca_eval.judge.name" in msg and "weighted_alpaca_eval_gpt4_turbo" in msg
    assert "vllm_local_completions" in errors({"instructions": "tiny:alpaca_eval",
                                               "annotator": "alpaca_eval_vllm_llama3_70b_fn"})
    assert "batch_size" in " ".join(config_problems("alpaca_farm_greedy_gpt4"))
    for name in (AE2, "alpaca_eval_gpt4", "weighted_alpaca_eval_vllm_llama3_70b", "alpaca_eval_llama3_70b_fn"):
        assert config_problems(name) == [], name
    # a user's configs.yaml, with its prompt beside it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "p.txt").write_text("{instruction} {output_1} {output_2}")
    (tmp_path / "mine" / "configs.yaml").write_text("mine:\n  prompt_template: mine/p.txt\n  fn_completions: "
                                                    "openai_completions\n  completions_kwargs:\n    model_name: x\n")
    assert config_problems(str(tmp_path / "mine" / "configs.yaml")) == []
    assert config_problems(str(tmp_path / "nope.yaml"))


def _df_gamed_cache(tmp_path: Path, monkeypatch) -> str:
    import huggingface_hub.constants

    from test_eval_fixtures import write_df_gamed

    rev = "1" * 40
    write_df_gamed(tmp_path / "hub", rev, AE_SET_SIZE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HARNESS_ONLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return rev


def test_length_controlled_win_rate_from_a_cached_df_gamed_only(tmp_path, monkeypatch):
    """df_gamed.csv alone (no instruction_difficulty.csv) in the local HF cache: alpaca_eval's LC
    model runs and its file's revision and hash are recorded; without it: unavailable, with why."""
    import random

    from alpaca_eval.metrics import get_length_controlled_winrate

    rng = random.Random(1)
    ann = [{"instruction": f"i{i}", "output_1": "r" * rng.randrange(5, 50), "output_2": "m" * rng.randrange(5, 80),
            "generator_1": "ref", "generator_2": "model", "annotator": "j", "preference": 1 + rng.random()}
           for i in range(AE_SET_SIZE)]
    empty = tmp_path / "empty"
    empty.mkdir()
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    m, notes = compute_metrics(ann, [a["output_2"] for a in ann], AE_SET_SIZE)
    assert m["alpaca_eval/length_controlled_winrate"] is None
    assert notes["length_controlled_winrate"].startswith("unavailable: alpaca_eval's df_gamed.csv")
    assert "not in the local Hugging Face cache" in notes["length_controlled_winrate"]

    rev = _df_gamed_cache(tmp_path, monkeypatch)
    m, notes = compute_metrics(ann, [a["output_2"] for a in ann], AE_SET_SIZE)
    import pandas as pd

    expect = get_length_controlled_winrate(pd.DataFrame(ann), save_weights_dir=None,
                                           is_add_glm_preference_inplace=False)["length_controlled_winrate"]
    assert m["alpaca_eval/length_controlled_winrate"] == float(expect)
    data = notes["length_controlled_data"]
    snap = tmp_path / "hub" / "datasets--tatsu-lab--alpaca_eval" / "snapshots" / rev / "df_gamed.csv"
    assert data["revision"] == rev and data["sha256"] == hashlib.sha256(snap.read_bytes()).hexdigest()


def test_only_openais_own_api_is_priced(monkeypatch):
    """alpaca_eval prices a completion by the config's model name; the harness passes that price
    on only for OpenAI's API: a local or unknown endpoint under the same name gets none (NaN)."""
    from harness.config.annotator_configs import OPENAI_API, official_endpoint
    from harness.evaluate.annotators import EndpointCompletions

    monkeypatch.setenv(KEY_ENV, "sekrit")
    assert official_endpoint(OPENAI_API + "/") and not official_endpoint("http://127.0.0.1:8000/v1")
    assert not official_endpoint("https://api.openai.com.example/v1") and not official_endpoint(None)
    prices = {}
    for url in (OPENAI_API, "http://127.0.0.1:8000/v1", "https://judge.example.org/v1"):
        fn = EndpointCompletions(Endpoint(url, "gpt-4-1106-preview", api_key_env=KEY_ENV))
        fn.client.request = lambda body, path: (json.dumps(answer(body)), "")
        got = fn(["<|im_start|>user\nWhich is better?\n<|im_end|>"], model_name="gpt-4-1106-preview")
        prices[url] = got["price_per_example"][0]
    assert prices[OPENAI_API] > 0
    assert math.isnan(prices["http://127.0.0.1:8000/v1"]) and math.isnan(prices["https://judge.example.org/v1"])
