"""A run killed (SIGKILL) in the middle of generation and in the middle of training
resumes to the same artifacts and metrics as an uninterrupted run, without
recomputing finished stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    exp.write_text(f"""
[experiment]
name = "resume"
seed = 3
output_dir = "{out}"

[model]
base = "{model_dir}"
device = "cpu"
cpu_threads = 1

[lora]
r = 4
alpha = 8

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
    out["metrics"] = [{k: v for k, v in r["metrics"].items() if not k.endswith(("seconds", "wall_time_s", "_mb"))}
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
    assert "changed: config.generation.max_new_tokens" in r.stderr
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
