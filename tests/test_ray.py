"""``harness run --launcher ray``: runs as Ray tasks on a real local Ray instance (CPU).

Two tiny seeds through a local instance the command starts, with the combined leaderboard
and ``harness table`` showing them as one row; GPUs declared to Ray on a CPU machine
(``ray.init(num_gpus=2)``) given to two runs as distinct CUDA_VISIBLE_DEVICES, recorded in
each run's provenance; a 2 x 2 sweep (two learning rates x two seeds) giving one row per rate;
a run whose Ray worker is killed reported in one line and resumed by the same command. These
need Ray (./install.sh --ray): CI's Ray tier runs them; without Ray they skip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (./install.sh --ray; CI's Ray tier runs these tests)")

from test_lifeline import survivors, with_arg  # noqa: E402
from test_overrides import write_tiny_spin  # noqa: E402
from test_resume import held  # noqa: E402

from harness.run import launch_ray  # noqa: E402
from harness.cli import main  # noqa: E402
from harness.report import build_table, load_rows  # noqa: E402
from harness.store.files import read_json  # noqa: E402

pytestmark = pytest.mark.slow


def harness(*args, wait=True, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "harness.cli", *args]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


@pytest.fixture
def two_gpus():
    """A local Ray instance that declares two GPUs this CPU machine does not have."""
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_seeds_through_a_local_ray_instance(tmp_path):
    path = write_tiny_spin(tmp_path)
    r = harness("run", str(path), "--seeds", "0,1", "--launcher", "ray")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "spin seed 0: done" in r.stderr and "spin seed 1: done" in r.stderr, r.stderr
    assert "seeds" in r.stdout and "| spin " in r.stdout, r.stdout  # the combined board
    for seed in (0, 1):
        assert (tmp_path / "out" / "spin" / f"seed-{seed}" / "results.jsonl").exists()
    table = harness("table", str(tmp_path / "out" / "spin"), "--format", "csv")
    rows = [line.split(",") for line in table.stdout.splitlines()]
    head = rows[0]
    assert [(r[head.index("iteration")], r[head.index("seeds")]) for r in rows[1:]] == [("0", "2"), ("1", "2")]


def test_runs_on_cuda_get_distinct_gpus_recorded_in_provenance(tmp_path, two_gpus, monkeypatch, capfd):
    """Ray's declared GPUs: two runs that ask for one each see different CUDA_VISIBLE_DEVICES."""
    path = write_tiny_spin(tmp_path)
    monkeypatch.setattr(launch_ray, "uses_cuda", lambda cfg, gpus: True)  # as a CUDA run would ask
    assert main(["run", str(path), "--seeds", "0,1", "--launcher", "ray"]) == 0, capfd.readouterr().err[-3000:]
    assert ray.is_initialized()  # the caller's instance is left to the caller
    seen = [read_json(tmp_path / "out" / "spin" / f"seed-{k}" / "provenance.json")["hardware"]["cuda_visible_devices"]
            for k in (0, 1)]
    assert sorted(seen) == ["0", "1"], seen


def test_a_sweep_of_two_rates_and_two_seeds_through_ray(tmp_path, two_gpus, capfd):
    path = write_tiny_spin(tmp_path)
    code = main(["run", str(path), "--launcher", "ray", "--sweep", "training.learning_rate=1e-5,5e-4", "--seeds", "0,1"])
    err = capfd.readouterr().err
    assert code == 0, err[-3000:]
    for lr in ("1e-05", "0.0005"):
        assert f"spin training.learning_rate={'1e-5' if lr == '1e-05' else '5e-4'} seed 1: done" in err, err
        for seed in (0, 1):
            run = tmp_path / "out" / "spin" / f"learning_rate-{lr}" / f"seed-{seed}"
            assert read_json(run / "config.json")["config"]["training"]["learning_rate"] == float(lr)
    df = build_table(load_rows([tmp_path / "out"]), filters={"iteration": "1"})
    assert list(df["sweep"]) == ["learning_rate=1e-05", "learning_rate=0.0005"] and list(df["seeds"]) == [2, 2]


def _args(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_killed_worker_is_one_line_and_the_same_command_resumes(tmp_path):
    path = write_tiny_spin(tmp_path)
    cmd = ("run", str(path), "--launcher", "ray", "--set", "method.iterations=2")
    run = tmp_path / "out" / "spin"
    driver = harness(*cmd, wait=False)
    try:
        t0 = time.time()
        while not (run / "iter_001" / "generate" / "manifest.json").exists():
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.time() - t0 < 300, "the run never finished its first stage"
            time.sleep(0.05)
        # the run's own process: `python -m harness.cli run -q FILE ...` (not the driver, not its lifeline sentinel)
        run_pid, = [p for p in with_arg(str(path)) if _args(p)[1:5] == ["-m", "harness.cli", "run", "-q"]]
        worker = _parent(run_pid)
        assert "--launcher" not in _args(worker) and worker != driver.pid
        os.kill(worker, signal.SIGKILL)
        out, err = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 1, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "spin: its Ray task ended without a result" in lines[0], err
    assert "rerun the same command to resume" in lines[0]
    assert survivors({run_pid}) == set() and not held(run / "run.lock")
    assert not (run / "results.jsonl").exists() or len((run / "results.jsonl").read_text().splitlines()) < 3
    finished = {p: p.stat().st_mtime_ns for p in run.rglob("manifest.json")}
    assert finished

    again = harness(*cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    for p, mtime in finished.items():
        assert p.stat().st_mtime_ns == mtime, f"{p} was recomputed"
    rows = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
