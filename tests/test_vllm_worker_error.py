"""A vLLM worker that dies says why on the line the terminal shows: the first line of its
``WorkerError`` (the one ``harness run`` prints as ``error:``) carries the worker's own exception
lines, not only "its log ends:". No vLLM needed: a fake worker command stands in for it."""

from __future__ import annotations

import pytest

from harness.engines.vllm_client import Worker, WorkerError, worker_failure

VLLM_LOG = """INFO 12-05 08:00:01 [core.py:93] Initializing a V1 LLM engine with config: model='/p'
(EngineCore_DP0 pid=41) Traceback (most recent call last):
(EngineCore_DP0 pid=41)   File "/v/vllm/v1/attention/selector.py", line 120, in get_attn_backend
(EngineCore_DP0 pid=41)     raise ValueError(f"Head size {head_size} is not supported")
(EngineCore_DP0 pid=41) ValueError: Head size 16 is not supported by CPU_ATTN. Supported head sizes are: [32, 64]
Traceback (most recent call last):
  File "/w/vllm_worker.py", line 60, in main
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def fake_worker(tmp_path, monkeypatch, stderr: str, rc: int = 1):
    """A "vLLM environment" whose Python writes ``stderr`` and exits with ``rc``, as a worker
    whose engine failed to start does."""
    (tmp_path / "log.txt").write_text(stderr)
    py = tmp_path / "python"
    py.write_text(f"#!/bin/sh\ncat {tmp_path / 'log.txt'} >&2\nexit {rc}\n")
    py.chmod(0o755)
    monkeypatch.setenv("HARNESS_VLLM_PYTHON", str(py))


def test_a_dead_worker_names_its_exception_on_the_first_line(tmp_path, monkeypatch):
    fake_worker(tmp_path, monkeypatch, VLLM_LOG)
    with pytest.raises(WorkerError) as e:
        Worker(tmp_path / "policy")
    first = str(e.value).splitlines()[0]
    assert first.startswith("the vLLM worker exited (rc=1): ValueError: Head size 16 is not supported by "
                            "CPU_ATTN"), first
    assert first.endswith("-> RuntimeError: Engine core initialization failed. See root cause above. Failed core "
                          "proc(s): {}; its log ends:"), first
    assert VLLM_LOG.strip() in str(e.value)  # the whole tail still follows (harness.log keeps it)


@pytest.mark.parametrize("log, summary", [
    ("", "no output"),
    ("loading\nkilled by the out-of-memory killer\n\n", "killed by the out-of-memory killer"),
    ("    raise ValueError(msg)\nsomething else\n", "something else"),   # a source line is not an exception
    ("KeyboardInterrupt\n", "KeyboardInterrupt"),
])
def test_worker_failure_without_an_exception_line(log, summary):
    assert worker_failure(log) == summary
