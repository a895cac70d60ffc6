"""A run killed (SIGKILL) in the middle of generation, of training, of judging and of
AlpacaEval annotation resumes to the same artifacts and metrics as an uninterrupted
run, without recomputing finished stages or re-asking the judge for recorded
judgments. The judged runs use an OpenAI-compatible endpoint served by the test
itself, which holds requests at a chosen point so the kill lands mid-stage."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_eval_fixtures import experiment_head
from test_judges_http import local_server, send_json
from test_lifeline import survivors, with_arg

from harness.store.files import run_lock

pytestmark = pytest.mark.slow

N_PROMPTS = 48


def write_experiment(tmp: Path, model_dir: Path, out: Path) -> Path:
    data = tmp / "sft.jsonl"
    if not data.exists():
        words = ["fox", "dog", "yes", "no", "lazy", "quick", "brown", "the"]
        with open(data, "w") as f:
            for i in range(N_PROMPTS):
                a, b = words[i % 8], words[(i * 3 + 1) % 8]
                f.write(json.dumps({"id": f"q{i}", "prompt": f"say {a} {b} {i}", "response": f"{a} {b}"}) + "\n")
    exp = tmp / f"exp_{out.name}.toml"
    exp.write_text(experiment_head("resume", 3, out, model_dir) + f"""
[method]
name = "spin"
iterations = 2
beta = 0.1

[method.spin]
temperature = 1.0

[data]
train = "{data}"

[generation]
max_new_tokens = 12
batch_size = 2

[training]
learning_rate = 0.005
batch_size = 4
epochs = 2
max_length = 64

[eval.indicators]
num_prompts = 0
""")
    return exp


def harness(*args, env_extra=None, wait=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "harness.cli", *args]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(proc, condition, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail("the run finished before the kill point was reached")
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail("kill point never reached")


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def artifacts(run: Path) -> dict:
    """Everything a run produced that must not depend on interruptions."""
    out = {}
    for rel in ("iter_001/generate/samples.jsonl", "iter_001/pairs/pairs.jsonl",
                "iter_002/generate/samples.jsonl", "iter_002/pairs/pairs.jsonl",
                "iter_001/train/adapter/adapter_model.safetensors",
                "iter_002/train/adapter/adapter_model.safetensors"):
        out[rel] = (run / rel).read_bytes()
    rows = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    # timings and cost (what the finishing attempt did) depend on interruptions
    out["metrics"] = [{k: v for k, v in r["metrics"].items()
                       if not k.endswith(("seconds", "wall_time_s", "_mb")) and not k.startswith("cost/")}
                      for r in rows]
    return out


def test_kill_during_generation_and_training_then_resume(tiny_dir, tmp_path):
    straight = tmp_path / "straight"
    r = harness("run", str(write_experiment(tmp_path, tiny_dir, straight)))
    assert r.returncode == 0, r.stderr[-3000:]

    killed = tmp_path / "killed"
    exp = write_experiment(tmp_path, tiny_dir, killed)
    run = killed / "resume"
    gen_log = run / "iter_001" / "generate.tmp" / "samples.jsonl"
    kill_when(harness("run", str(exp), wait=False), lambda: lines(gen_log) >= 4)
    assert not (run / "iter_001" / "generate" / "manifest.json").exists()
    kept = lines(gen_log)
    assert 0 < kept < N_PROMPTS

    train_dir = run / "iter_001" / "train.tmp" / "trainer"
    kill_when(harness("run", str(exp), wait=False), lambda: train_dir.exists())
    gen_manifest = json.loads((run / "iter_001" / "generate" / "manifest.json").read_text())
    assert gen_manifest["outputs"]["resumed_records"] >= kept   # continued, not restarted
    assert not (run / "iter_001" / "train" / "manifest.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in run.rglob("manifest.json")}

    r = harness("run", str(exp))
    assert r.returncode == 0, r.stderr[-3000:]
    for p, mtime in finished.items():
        assert p.stat().st_mtime_ns == mtime, f"{p} was recomputed"
    assert artifacts(run) == artifacts(straight / "resume")

    # a complete run reruns as a no-op
    before = {p: p.stat().st_mtime_ns for p in run.rglob("manifest.json")}
    r = harness("run", str(exp))
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("manifest.json")} == before

    status = harness("status", str(run))
    assert status.returncode == 0
    done = [line.split()[1:4] for line in status.stdout.splitlines() if line.strip().startswith("iter")]
    assert ["2", "train", "done"] in done and not any("partial" in d for d in done)


def test_changed_config_stops_with_the_changed_field(tiny_dir, tmp_path):
    out = tmp_path / "c"
    exp = write_experiment(tmp_path, tiny_dir, out)
    text = exp.read_text().replace("iterations = 2", "iterations = 1")
    exp.write_text(text)
    other = tmp_path / "other.toml"
    other.write_text(text.replace('name = "resume"', 'name = "other"'))
    both = harness("run", str(exp), str(other))  # two experiments: one combined leaderboard and plot
    assert both.returncode == 0, both.stderr[-3000:]
    board = both.stdout.split("results: ")[-1]
    assert "| resume " in board and "| other " in board
    # no evaluation metrics here, so no comparison plot is written or announced
    assert "comparison plot" not in both.stdout and not (out / "comparison.png").exists()
    exp.write_text(text.replace("max_new_tokens = 12", "max_new_tokens = 10"))
    r = harness("run", str(exp))
    assert r.returncode == 1
    # said before any compute, for every finished stage that read the field
    assert "iter_001/generate: generation.max_new_tokens was 12, now 10: the run would stop there" in r.stderr
    fresh = harness("run", "--fresh", str(exp))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert (out / "resume-2" / "results.jsonl").exists()


def test_replaced_base_weights_are_not_reused(tmp_path):
    """Stages key on the base model's content, not its path."""
    from test_eval_fixtures import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", seed=0)
    exp = write_experiment(tmp_path, model_dir, tmp_path / "w")
    exp.write_text(exp.read_text().replace("iterations = 2", "iterations = 1"))
    assert harness("run", str(exp)).returncode == 0
    build_tiny_model(model_dir, seed=1)  # same path, other weights
    r = harness("run", str(exp))
    assert r.returncode == 1 and "changed: upstream.policy" in r.stderr, r.stderr[-2000:]


def held(lock: Path) -> bool:
    """Whether some process holds a flock on ``lock`` (/proc/locks lists each by inode)."""
    ino = str(lock.stat().st_ino) if lock.exists() else None
    return ino is not None and any(line.split()[5].rsplit(":", 1)[-1] == ino
                                   for line in Path("/proc/locks").read_text().splitlines()
                                   if len(line.split()) > 5 and "FLOCK" in line)


def test_killed_jobs_parent_takes_its_runs_and_their_locks_down(tiny_dir, tmp_path):
    """``harness run --jobs 2`` killed with SIGKILL while both seeds run: no run goes on
    unsupervised and both run locks are free for the rerun."""
    out = tmp_path / "jobs"
    exp = write_experiment(tmp_path, tiny_dir, out)
    runs = [out / "resume" / f"seed-{k}" for k in (0, 1)]
    parent = harness("run", str(exp), "--seeds", "0,1", "--jobs", "2", wait=False)
    try:
        t0 = time.time()
        while not all(held(r / "run.lock") for r in runs):
            assert parent.poll() is None, "the run finished before both seeds held their locks"
            assert time.time() - t0 < 300, "the seeds never held their run locks"
            time.sleep(0.05)
        children = with_arg(str(exp)) - {parent.pid}  # the two seeds' runs (and their sentinels)
        assert len(children) >= 2
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert survivors(children) == set()
    finally:
        parent.kill()
        parent.wait()
    assert not any(held(r / "run.lock") for r in runs)
    for r in runs:  # what a rerun takes first (RunLocked while a killed run's child still held it)
        with run_lock(r):
            pass


# --- kill during judging and during AlpacaEval annotation ------------------------------------

N_JUDGED = 8      # training prompts (DNO: 2 samples each, judged)
N_ALPACA = 8      # AlpacaEval instructions
KEY_ENV = "HARNESS_TEST_JUDGE_KEY"


class JudgeServer:
    """An OpenAI-compatible chat-completions endpoint on 127.0.0.1 for the run subprocesses.

    Answers "...\\nScore: N" with N a hash of the judge prompt (deterministic). Paths
    /judge/... and /alpaca/... are the two judges. ``down`` holds the paths answering
    503; ``quota[path]`` (when set) is how many more answers that path gives before
    further requests wait for ``release()`` -- so a test can kill a run at a known
    point with judge requests in flight. ``answered`` counts answers per (path, prompt)."""

    def __init__(self):
        self.down: set[str] = set()
        self.quota: dict[str, int] = {}
        self.blocked = 0
        self.answered = collections.Counter()
        self.lock = threading.Lock()
        self.gate = threading.Event()
        outer = self

        def on_post(handler, body):
            prompt = body["messages"][-1]["content"]
            path = handler.path.split("/")[1]
            if path in outer.down:
                return send_json(handler, 503, "judge endpoint down")
            with outer.lock:
                wait = outer.quota.get(path) == 0
                outer.blocked += wait
                if path in outer.quota and not wait:
                    outer.quota[path] -= 1
            if wait:
                outer.gate.wait(120)
                return send_json(handler, 503, "released")  # the client that asked has been killed
            with outer.lock:
                outer.answered[path, prompt] += 1
            score = 1 + int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 5
            send_json(handler, 200, json.dumps({"choices": [{"message": {"role": "assistant",
                                                                         "content": f"Judged.\nScore: {score}"}}]}))

        self.httpd, self.thread = local_server(on_post)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}/v1"

    def hold_after(self, path, n):
        self.gate.clear()
        self.blocked = 0
        self.quota = {path: n}

    def release(self):
        self.quota = {}
        self.gate.set()

    def answers(self, path):
        return {prompt: n for (p, prompt), n in self.answered.items() if p == path}


@pytest.fixture
def judge_server():
    server = JudgeServer()
    yield server
    server.release()
    server.httpd.shutdown()
    server.httpd.server_close()


def write_judged_experiment(tmp: Path, model_dir: Path, out: Path, server: JudgeServer) -> Path:
    """DNO, one iteration, judged by the test's endpoint; AlpacaEval judged by it too."""
    data, alpaca = tmp / "prompts.jsonl", tmp / "alpaca.json"
    if not data.exists():
        words = ["fox", "dog", "yes", "no", "lazy", "quick", "brown", "the"]
        data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"say {words[i % 8]} {words[(i * 3 + 1) % 8]} {i}"})
                                + "\n" for i in range(N_JUDGED)))
        alpaca.write_text(json.dumps([{"id": f"a{i}", "instruction": f"what is {i} plus {words[i % 8]}",
                                       "output": f"{i} {words[(i + 2) % 8]}", "generator": "ref"}
                                      for i in range(N_ALPACA)]))
    judge = """model = "fake-judge"
api_key_env = "{key}"
base_url = "{url}"
timeout_s = 60
max_retries = 0"""
    exp = tmp / f"exp_{out.name}.toml"
    exp.write_text(experiment_head("judged", 5, out, model_dir) + f"""
[method]
name = "dno"
iterations = 1
beta = 0.1

[method.dno]
num_samples = 2
temperature = 1.0
student_margin = 1.0
cut_chosen = "keep"  # the random model's 8-token answers are all cut; this test is about judging

[judge]
name = "openai"
batch_size = 2
min_coverage = 0.5

[judge.openai]
{judge.format(key=KEY_ENV, url=server.url("judge"))}

[data]
train = "{data}"

[generation]
max_new_tokens = 8
batch_size = 4

[training]
learning_rate = 0.005
batch_size = 4
epochs = 1
max_length = 64

[eval.alpaca_eval]
instructions = "{alpaca}"

[eval.alpaca_eval.judge]
name = "openai"
batch_size = 2

[eval.alpaca_eval.judge.openai]
{judge.format(key=KEY_ENV, url=server.url("alpaca"))}

[eval.indicators]
num_prompts = 0
""")
    return exp


def judged_artifacts(run: Path) -> dict:
    out = {}
    for rel in ("iter_001/generate/samples.jsonl", "iter_001/judge/judgments.jsonl", "iter_001/pairs/pairs.jsonl",
                "iter_001/train/adapter/adapter_model.safetensors",
                "iter_000/evaluate/alpaca_eval/annotations.json", "iter_001/evaluate/alpaca_eval/annotations.json"):
        out[rel] = (run / rel).read_bytes()
    rows = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    # timings and cost (what the finishing attempt did) depend on interruptions
    out["metrics"] = [{k: v for k, v in r["metrics"].items()
                       if not k.endswith(("seconds", "wall_time_s", "_mb")) and not k.startswith("cost/")}
                      for r in rows]
    return out


def test_kill_during_judging_and_annotation_then_resume(tiny_dir, tmp_path, judge_server):
    """SIGKILL in the middle of AlpacaEval annotation and in the middle of the judge
    stage (judge requests in flight), and a run with the judge endpoint down in
    between: the finished run equals an uninterrupted one, and every judge prompt
    got exactly as many answers as in the uninterrupted run."""
    server, env = judge_server, {KEY_ENV: "test-key"}
    straight = tmp_path / "straight"
    r = harness("run", str(write_judged_experiment(tmp_path, tiny_dir, straight, server)), env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    reference = {p: server.answers(p) for p in ("judge", "alpaca")}
    assert reference["judge"] and len(reference["alpaca"]) >= N_ALPACA
    server.answered.clear()

    killed = tmp_path / "killed"
    exp = write_judged_experiment(tmp_path, tiny_dir, killed, server)
    run = killed / "judged"
    ann_log = run / "iter_000" / "evaluate.tmp" / "alpaca_eval" / "annotations.jsonl"
    server.hold_after("alpaca", 4)  # 2 instructions x (reference, model) per chunk: the 2nd chunk waits
    kill_when(harness("run", str(exp), env_extra=env, wait=False), lambda: lines(ann_log) >= 2 and server.blocked)
    server.release()
    kept = lines(ann_log)
    assert 0 < kept < N_ALPACA and not (run / "iter_000" / "evaluate" / "manifest.json").exists()

    # the judge endpoint is down: the judge stage fails with a clear message and records nothing
    server.down = {"judge"}
    n_before = sum(server.answers("alpaca").values())
    r = harness("run", str(exp), env_extra=env)
    assert r.returncode == 1
    assert "judging of iteration 1:" in r.stderr and "had judge transport errors" in r.stderr, r.stderr[-3000:]
    assert "rerun the same command" in r.stderr and "Traceback" not in r.stderr
    assert (run / "iter_000" / "evaluate" / "manifest.json").exists()
    assert not (run / "iter_001" / "judge" / "manifest.json").exists()
    judge_log = run / "iter_001" / "judge.tmp" / "judgments.jsonl"
    assert "[judge error]" not in (judge_log.read_text() if judge_log.exists() else "")
    assert sum(server.answers("alpaca").values()) - n_before == 2 * (N_ALPACA - kept)  # resumed, not redone
    server.down = set()

    server.hold_after("judge", 4)  # about 2 prompts x 2 samples, then the judge's requests wait
    kill_when(harness("run", str(exp), env_extra=env, wait=False), lambda: lines(judge_log) >= 2 and server.blocked)
    server.release()
    done = [json.loads(x)["id"] for x in judge_log.read_text().splitlines()]
    assert 0 < len(done) < N_JUDGED and not (run / "iter_001" / "judge" / "manifest.json").exists()

    before = dict(server.answered)
    r = harness("run", str(exp), env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert judged_artifacts(run) == judged_artifacts(straight / "judged")
    # the judgments recorded before the kill were not asked for again
    prompts = {json.loads(x)["id"]: json.loads(x)["prompt"] for x in (tmp_path / "prompts.jsonl").read_text().splitlines()}
    asked_again = [p for (path, p), n in server.answered.items() if path == "judge" and n > before.get((path, p), 0)]
    assert asked_again and not any(f"<request>\n{prompts[i]}\n</request>" in p for p in asked_again for i in done)
    # AlpacaEval chunks (2 instructions = 4 requests) were killed on a boundary: nothing was judged twice
    assert server.answers("alpaca") == reference["alpaca"]
