"""Run-directory invariants: torn JSONL lines, stage manifests, changed inputs, the lock."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from harness.store.files import JsonlLog, RunLocked, Stage, StageChanged, run_lock


def test_torn_last_line_is_dropped_and_appending_continues(tmp_path):
    p = tmp_path / "log.jsonl"
    log = JsonlLog(p)
    log.append([{"id": "a", "v": 1}, {"id": "b", "v": 2}])
    with open(p, "a") as f:
        f.write('{"id": "c", "v": 3')  # killed mid-write
    again = JsonlLog(p)
    assert set(again.records) == {"a", "b"}
    again.append([{"id": "c", "v": 3}])
    assert [line for line in p.read_text().splitlines()] == [
        '{"id": "a", "v": 1}', '{"id": "b", "v": 2}', '{"id": "c", "v": 3}']


def test_corrupt_line_with_newline_is_dropped_too(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"id": "a"}\n{"id": \n')
    assert set(JsonlLog(p).records) == {"a"}
    assert p.read_text() == '{"id": "a"}\n'


def test_stage_lifecycle_and_changed_inputs(tmp_path):
    st = Stage(tmp_path / "iter_001" / "generate", {"config": {"generation": {"max_new_tokens": 8}}})
    assert not st.done()
    work = st.begin()
    (work / "out.txt").write_text("x")
    assert not st.final.exists()          # nothing visible before commit
    st.commit({"hash": "abc"})
    assert st.done() and (st.final / "out.txt").read_text() == "x" and not st.tmp.exists()
    assert st.outputs()["hash"] == "abc"
    changed = Stage(tmp_path / "iter_001" / "generate", {"config": {"generation": {"max_new_tokens": 9}}})
    with pytest.raises(StageChanged, match=r"changed: config\.generation\.max_new_tokens"):
        changed.done()


def test_partial_work_for_other_inputs_is_discarded(tmp_path):
    st = Stage(tmp_path / "iter_001" / "judge", {"a": 1})
    (st.begin() / "judgments.jsonl").write_text('{"id": "x"}\n')
    same = Stage(tmp_path / "iter_001" / "judge", {"a": 1})
    assert (same.begin() / "judgments.jsonl").exists()        # resumed
    other = Stage(tmp_path / "iter_001" / "judge", {"a": 2})
    assert not (other.begin() / "judgments.jsonl").exists()   # never resumed across inputs


def _hold_lock(path, ready, release):
    with run_lock(path):
        ready.set()
        release.wait(10)


def test_second_process_cannot_run_the_same_directory(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    proc.start()
    try:
        assert ready.wait(10)
        with pytest.raises(RunLocked, match="another process"):
            with run_lock(tmp_path):
                pass
    finally:
        release.set()
        proc.join(10)
    with run_lock(tmp_path):  # free again once the holder exits
        pass
