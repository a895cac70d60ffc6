"""No process outlives its parent: a child started with ``harness.lifeline.spawn`` (the
``--jobs`` children, vLLM workers and servers) and everything it started end when the parent
dies, kill -9 included, or when the child itself dies; a child started from a thread that
ends lives on. The vLLM worker's path is checked with a fake worker that starts a fake
engine process and, like vLLM, leaves it running when its stdin closes (tests/test_vllm.py
does the same with the real worker)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.lifeline import spawn, stop_group

REPO = Path(__file__).resolve().parents[1]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
# a child that starts a grandchild of its own (plain subprocess) and prints the grandchild's pid
CHILD = [sys.executable, "-c", "import subprocess, sys, time; "
         f"g = subprocess.Popen({SLEEPER!r}); print(g.pid, flush=True); time.sleep(120)"]


# ----- processes, from /proc -----------------------------------------------------------------

def stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, ...)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its reaper."""
    s = stat(pid)
    return s is not None and s[0] not in (b"Z", b"X")


def session(sid: int) -> set[int]:
    """The live processes of session ``sid`` (a spawned child's, with everything it started)."""
    return {pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if (s := stat(pid)) is not None and int(s[3]) == sid and alive(pid)}


def with_arg(text: str) -> set[int]:
    """The live processes whose command line contains ``text``."""
    found = set()
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and alive(int(d)):
            found.add(int(d))
    return found


def survivors(pids, timeout: float = 10.0) -> set[int]:
    """Those of ``pids`` still alive after waiting up to ``timeout`` seconds for all to end;
    the survivors are killed afterwards, so that a failing test leaves nothing behind."""
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return left


def python(code: str, *args: str) -> subprocess.Popen:
    """A parent process running ``code`` from the checkout, its stdout piped here."""
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


# ----- spawn --------------------------------------------------------------------------------

PARENT = f"""
import subprocess, sys, time
from harness.lifeline import spawn
child = spawn({CHILD!r}, stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(120)
"""


def test_a_killed_parent_takes_its_child_and_grandchild_down():
    parent = python(PARENT)
    try:
        child, grandchild = map(int, parent.stdout.readline().split())
        group = session(child)  # the child, its grandchild and the child's sentinel
        assert {child, grandchild} < group and len(group) == 3
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert survivors(group) == set()
    finally:
        parent.kill()
        parent.wait()


def test_a_killed_child_takes_what_it_started_down():
    child = spawn(CHILD, stdout=subprocess.PIPE, text=True)
    grandchild = int(child.stdout.readline())
    group = session(child.pid)
    assert grandchild in group
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert survivors(group) == set()
    assert child.stdout.read() == ""  # EOF at once: nothing else holds the child's pipe


def test_a_child_spawned_by_a_thread_outlives_the_thread():
    """A parent-death signal set for the child would fire when the spawning thread ends."""
    box = []
    t = threading.Thread(target=lambda: box.append(spawn(SLEEPER)))
    t.start()
    t.join()
    child = box[0]
    try:
        time.sleep(1.0)
        assert child.poll() is None and alive(child.pid)
    finally:
        group = session(child.pid)
        stop_group(child, grace_s=5)
    assert child.returncode == -signal.SIGTERM
    assert survivors(group) == set()


def test_a_spawned_command_keeps_its_output_and_exit_status():
    t0 = time.monotonic()
    done = spawn([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], stdout=subprocess.PIPE, text=True)
    assert done.communicate(timeout=30) == ("out\n", None) and done.returncode == 3
    assert time.monotonic() - t0 < 10  # the pipe closed with the command, not after its sentinel's grace
    missing = spawn(["no-such-command-here"], stderr=subprocess.PIPE, text=True)
    _, err = missing.communicate(timeout=30)
    assert missing.returncode == 127 and err == "error: cannot run no-such-command-here: No such file or directory\n"
    with pytest.raises(TypeError):
        spawn(SLEEPER, start_new_session=False)


# ----- the vLLM worker's path, with a fake worker -------------------------------------------

FAKE_WORKER = f"""
import json, os, subprocess, sys
engine = subprocess.Popen({SLEEPER!r})  # as vLLM's engine-core process
open(os.environ["FAKE_ENGINE_PID"], "w").write(str(engine.pid))
print(json.dumps({{"ready": True, "start_s": 0.0}}), flush=True)
for line in sys.stdin:  # like the real worker: stdin's end ends the loop, the engine is left running
    if json.loads(line)["op"] == "exit":
        break
"""

WORKER_PARENT = """
import sys, time
import harness.engines.vllm_client as ve
ve.WORKER = sys.argv[1]
worker = ve.Worker("unused")
print(worker.proc.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("victim", ["parent", "worker"])
def test_a_fake_vllm_worker_takes_its_engine_down(victim, tmp_path, monkeypatch):
    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER)
    engine_pid = tmp_path / "engine.pid"
    monkeypatch.setenv("HARNESS_VLLM_PYTHON", sys.executable)
    monkeypatch.setenv("FAKE_ENGINE_PID", str(engine_pid))
    parent = python(WORKER_PARENT, str(fake))
    try:
        worker = int(parent.stdout.readline())
        engine = int(engine_pid.read_text())
        group = session(worker)
        assert {worker, engine} <= group
        os.kill(parent.pid if victim == "parent" else worker, signal.SIGKILL)
        assert survivors(group) == set()
        assert (parent.poll() is None) == (victim == "worker")  # killing the worker leaves its parent
    finally:
        parent.kill()
        parent.wait()


def test_the_fake_worker_speaks_the_protocol(tmp_path, monkeypatch):
    """The fake above answers as the real worker does, so the Worker class accepts it."""
    from harness.engines import vllm_client as vllm_engine

    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER)
    monkeypatch.setenv("HARNESS_VLLM_PYTHON", sys.executable)
    monkeypatch.setenv("FAKE_ENGINE_PID", str(tmp_path / "engine.pid"))
    monkeypatch.setattr(vllm_engine, "WORKER", fake)
    worker = vllm_engine.Worker("unused")
    engine = int((tmp_path / "engine.pid").read_text())
    group = session(worker.proc.pid)
    worker.close()  # "exit", then stop_group: the engine it left is ended by the sentinel
    assert worker.proc.returncode == 0
    assert survivors(group) == set() and engine in group
