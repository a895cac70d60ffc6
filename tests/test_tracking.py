"""Experiment tracking ([tracking] report_to, ``harness.train.tracking``): a tiny SPIN run reporting to
TensorBoard and W&B (offline) leaves its training curves and one entry per iteration with the
results row's metrics; a rerun of the finished run logs nothing twice, an extended one logs
only its new iteration; a tracker whose package is missing is a validate error.

TensorBoard is read back from its event files, W&B from its offline run file."""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import pytest

from harness.console import terminal as console
from harness.train import tracking
from harness.config.experiment import parse
from harness.config.schema import ConfigError
from harness.store.files import read_json
from test_stage_inputs import run, spin_doc

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("library_console")]


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard run directory: [(step, value), ...] in write order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(run_file: Path) -> list:
    """The records of a W&B offline run file (.wandb: a LevelDB-style log of protobuf Records
    in 32 KiB blocks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, part, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += block - pos % block
            continue
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last piece
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def history(run_file: Path) -> list[dict]:
    import json

    return [{(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in r.history.item}
            for r in wandb_records(run_file) if r.WhichOneof("record_type") == "history"]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A finished one-iteration SPIN run of seed 0 with report_to = tensorboard and wandb (offline:
    the hub is off and WANDB_MODE unset): (its document, its run directory, its rows)."""
    mp = pytest.MonkeyPatch()
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "HARNESS_ONLINE"):
        mp.delenv(var, raising=False)
    mp.setenv("WANDB_SILENT", "true")
    console.reset()  # module-scoped: set up before library_console, after CLI tests that closed their stream
    root = tmp_path_factory.mktemp("tracking")
    doc = spin_doc(root, "tracked")
    doc["experiment"]["seeds"] = [0]
    doc["tracking"] = {"report_to": ["tensorboard", "wandb"]}
    run_dir, rows = run(doc)
    yield doc, run_dir, rows
    mp.undo()


def test_tensorboard_holds_the_training_curve_and_each_iterations_metrics(tracked):
    doc, run_dir, rows = tracked
    assert run_dir.name == "seed-0"
    train = scalars(run_dir / "tracking" / "iter_001-train")
    losses = train["train/loss"]
    manifest = read_json(run_dir / "iter_001" / "train" / "manifest.json")["outputs"]["metrics"]
    assert [s for s, _ in losses] == list(range(1, manifest["train/steps"] + 1))
    assert losses[-1][1] == pytest.approx(manifest["train/loss"], rel=1e-6)
    entries = scalars(run_dir / "tracking" / "iterations")
    # every metric of the rows as written per iteration ("selected" marks the final iterate
    # after the last row: it is in results.jsonl only)
    written = [{k: v for k, v in tracking.row_metrics(r).items() if k != "iteration/selected"} for r in rows]
    assert len(written[1]) > 10
    for row, metrics in zip(rows, written):
        for key, value in metrics.items():
            assert (row["iteration"], pytest.approx(value, rel=1e-6, abs=1e-6)) in entries[key], key
    assert [s for s, _ in entries["iteration/train/loss"]] == [1]
    assert [s for s, _ in entries["iteration/wall_time_s"]] == [0, 1]
    assert set(entries) == {k for m in written for k in m}


def test_wandb_offline_run_has_curves_and_iteration_entries(tracked):
    doc, run_dir, rows = tracked
    (run_file,) = (run_dir / "tracking" / "wandb").glob("offline-run-*/run-*.wandb")
    runs = [r.run for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].display_name == "tracked/seed-0" and runs[0].run_group == "tracked"
    steps = history(run_file)
    assert [h["train/loss"] for h in steps if "train/loss" in h]  # trl's per-step curve
    entries = [h for h in steps if "iteration" in h]
    assert [h["iteration"] for h in entries] == [0, 1]
    for h, row in zip(entries, rows):
        assert h["iteration/wall_time_s"] == pytest.approx(row["metrics"]["wall_time_s"])


def test_a_rerun_logs_no_iteration_twice_and_an_extended_run_only_its_new_one(tracked):
    doc, run_dir, rows = tracked
    events = sorted((run_dir / "tracking").glob("iter_*/events.*"))
    again_dir, again = run(doc)  # finished: every stage reused
    assert again_dir == run_dir and [r["metrics"]["wall_time_s"] for r in again] == \
        [r["metrics"]["wall_time_s"] for r in rows]
    assert sorted((run_dir / "tracking").glob("iter_*/events.*")) == events  # no training curve rewritten
    entries = scalars(run_dir / "tracking" / "iterations")
    assert [s for s, _ in entries["iteration/wall_time_s"]] == [0, 1]
    longer = copy.deepcopy(doc)
    longer["method"]["iterations"] = 2
    _, rows3 = run(longer)
    entries = scalars(run_dir / "tracking" / "iterations")
    assert [s for s, _ in entries["iteration/wall_time_s"]] == [0, 1, 2]
    assert entries["iteration/train/loss"][-1] == (2, pytest.approx(rows3[2]["metrics"]["train/loss"], rel=1e-6))
    assert (run_dir / "tracking" / "iter_002-train").is_dir()
    logged = [h["iteration"] for f in (run_dir / "tracking" / "wandb").glob("offline-run-*/run-*.wandb")
              for h in history(f) if "iteration" in h]
    assert sorted(logged) == [0, 1, 2]  # three W&B runs (one per process), each iteration once


def test_run_names(tmp_path):
    doc = spin_doc(tmp_path, "exp")
    cfg = parse(copy.deepcopy(doc), "t.toml")
    assert tracking.run_name(cfg, cfg.run_dir) == "exp"
    doc["experiment"]["seeds"] = [3, 4]
    (seed3, _) = parse(doc, "t.toml").for_seeds()
    assert tracking.run_name(seed3, seed3.run_dir) == "exp/seed-3"
    assert tracking.run_name(seed3, seed3.run_dir.with_name("seed-3-2")) == "exp/seed-3-2"  # harness run --fresh
    assert tracking.run_name(seed3, tmp_path / "elsewhere") == "exp/seed-3"


def test_tracking_is_not_in_the_hash_and_names_are_checked(tmp_path):
    doc = spin_doc(tmp_path, "t")
    plain = parse(copy.deepcopy(doc), "t.toml")
    doc["tracking"] = {"report_to": ["tensorboard"]}
    tracked = parse(copy.deepcopy(doc), "t.toml")
    assert tracked.tracking.report_to == ("tensorboard",) and tracked.hash() == plain.hash()
    assert tracked.to_dict()["tracking"] == {"report_to": ["tensorboard"]}  # config.json says where it went
    doc["tracking"] = {"report_to": ["tensorbord"]}
    with pytest.raises(ConfigError, match=r"tracking\.report_to"):
        parse(doc, "t.toml")


def test_a_missing_trackers_package_is_a_one_line_validate_error(tmp_path, monkeypatch):
    from harness.validate import experiment as validate

    doc = spin_doc(tmp_path, "t")
    doc["tracking"] = {"report_to": ["tensorboard", "wandb"]}
    cfg = parse(doc, "t.toml")
    assert not [e for e in validate.check(cfg).errors if e.path.startswith("tracking")]
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    errors = [e for e in validate.check(cfg).errors if e.path.startswith("tracking")]
    assert [(e.path, e.message) for e in errors] == [(
        "tracking.report_to[1]", "'wandb' needs the package 'wandb', which is not installed: install the "
                                 "\"tracking\" extra (pip install -e \".[tracking]\"; ./install.sh installs it)")]


def test_a_stage_restarted_after_an_interruption_keeps_only_its_own_curve(tmp_path):
    """The stage's TensorBoard directory is emptied when its training starts again: the killed
    attempt's steps would otherwise sit beside the finishing attempt's at the same step numbers."""
    doc = spin_doc(tmp_path, "t")
    doc["tracking"] = {"report_to": ["tensorboard", "wandb", "wandb"]}
    tracker = tracking.Tracker(parse(doc, "t.toml"), tmp_path / "run")
    stale = tmp_path / "run" / "tracking" / "iter_002-train" / "events.out.tfevents.killed"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    (callback,) = tracker.callbacks(tmp_path / "run" / "iter_002" / "train.tmp")
    assert not stale.exists() and stale.parent.is_dir()
    callback.tb_writer.close()
    assert tracker.trainer_settings() == {"report_to": ["wandb"], "run_name": "t", "project": "t"}
