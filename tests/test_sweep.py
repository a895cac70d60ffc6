"""``harness run|validate FILE --sweep KEY=V1,V2,...``: the grid of points, each validated before
any runs (errors name ``--sweep KEY=VALUE``), each in its own run directory named by its values
and recorded in its config; tables with one row per point; the ``--jobs`` pool's children get
the point, and a run on CUDA never shares a GPU with another. The Ray launcher's tests are in
tests/test_ray.py."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
from test_overrides import write_tiny_spin
from test_report_seeds import EM, _paired, _row, _write
from test_validate import spin, world  # noqa: F401  (world: the fixture)

from harness.config import experiment as config
from harness.cli import main
from harness.report import build_table, read_csv, to_csv, to_terminal
from harness.store.files import read_json


def test_the_grid_is_every_combination_of_the_values():
    grid = config.sweep_grid(["training.learning_rate=1e-5,5e-5", 'lora.target_modules=["q_proj"],["q_proj","v_proj"]',
                              'data.system_prompt="Be brief, please.",plain'])
    assert len(grid) == 8
    assert grid[0] == ("training.learning_rate=1e-5", 'lora.target_modules=["q_proj"]',
                       'data.system_prompt="Be brief, please."')  # commas inside brackets and quotes stay
    assert grid[-1] == ("training.learning_rate=5e-5", 'lora.target_modules=["q_proj","v_proj"]',
                        "data.system_prompt=plain")
    assert config.sweep_grid([]) == [()]


@pytest.mark.parametrize("sweeps, words", [
    (["training.learning_rate"], "expected KEY=V1,V2,..."),
    (["training.learning_rate=1e-5,,2e-5"], "an empty value in '1e-5,,2e-5'"),
    (["training.learning_rate=1e-5,0.00001"], "'0.00001' repeats '1e-5'"),
    (["a..b=1,2"], "'a..b' is not a dotted key"),
    (["lora.r=4,8", "lora.r=16"], "lora.r is swept twice"),
])
def test_a_malformed_sweep_is_one_error(sweeps, words, capsys):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(".", r"\.")):
        config.sweep_grid(sweeps)
    assert main(["validate", "x.toml", *[a for s in sweeps for a in ("--sweep", s)]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--sweep" in err and "Traceback" not in err, err


def test_point_directories_are_safe_and_distinct():
    assert config.point_dirs({"training.learning_rate": 1e-5, "method.beta": 0.1}) == ["learning_rate-1e-05",
                                                                                      "beta-0.1"]
    # two keys with one last part: the whole key; a value with unsafe characters: cut, with a hash
    dirs = config.point_dirs({"training.learning_rate": 5e-4, "method.self_rewarding.sft.learning_rate": 1e-4,
                              "lora.target_modules": ["q_proj", "v_proj"], "data.system_prompt": "../x"})
    assert dirs[:2] == ["training.learning_rate-0.0005", "method.self_rewarding.sft.learning_rate-0.0001"]
    assert dirs[2].startswith("target_modules-__q_proj___v_proj__-") and dirs[3].startswith("system_prompt-.._x-")
    assert all("/" not in d for d in dirs)
    other = config.point_dirs({"data.system_prompt": "..x"})
    assert other[0] != dirs[3]  # "../x" and "..x" are both cut to something like "..x": the hashes differ


def test_each_point_is_its_own_run_directory_and_records_its_values(world, tiny_dir):
    path = world / "exp.toml"
    path.write_text(spin(world, tiny_dir))
    cfgs = [config.load(path, [], point) for point in config.sweep_grid(["training.learning_rate=1e-5,5e-5",
                                                                         "method.beta=0.1,0.5"])]
    assert [c.run_dir.relative_to(world / "out" / "x").as_posix() for c in cfgs] == [
        "learning_rate-1e-05/beta-0.1", "learning_rate-1e-05/beta-0.5",
        "learning_rate-5e-05/beta-0.1", "learning_rate-5e-05/beta-0.5"]
    assert cfgs[3].training.learning_rate == 5e-5 and cfgs[3].method.beta == 0.5
    assert cfgs[3].experiment.sweep == ("training.learning_rate", "method.beta")
    assert cfgs[3].sweep_point == {"training.learning_rate": 5e-5, "method.beta": 0.5}
    assert cfgs[3].to_dict()["experiment"]["sweep"] == ["training.learning_rate", "method.beta"]
    assert len({c.hash() for c in cfgs}) == 4
    seeded = cfgs[0].for_seeds((0, 1))
    assert seeded[1].run_dir == world / "out" / "x" / "learning_rate-1e-05" / "beta-0.1" / "seed-1"
    assert seeded[1].point == cfgs[0].point


def test_every_point_is_checked_before_any_runs(world, tiny_dir, capfd):
    """Bad values in two points and a good one: every problem said once, naming the point; nothing runs."""
    path = world / "exp.toml"
    path.write_text(spin(world, tiny_dir))
    code = main(["run", str(path), "--sweep", "training.learning_rate=fast,1e-5", "--sweep", "lora.r=0,4"])
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err
    lines = [x for x in err.splitlines() if "warning" not in x]
    assert sorted(lines) == [f"{path}: --sweep lora.r=0: 0 is below the minimum 1",
                             f"{path}: --sweep training.learning_rate=fast: expected a number, got str 'fast'"], err
    assert not (world / "out").exists()
    assert main(["validate", str(path), "--sweep", "trainig.learning_rate=1e-5"]) == 1
    assert f"{path}: --sweep trainig.learning_rate=1e-5: unknown key; did you mean 'training'?" in capfd.readouterr().err
    assert main(["validate", str(path), "--sweep", "experiment.name=a,b"]) == 1
    err = capfd.readouterr().err
    assert "--sweep experiment.name=a: 'experiment.name': the experiment's own fields name its run directories" in err
    assert main(["validate", str(path), "--sweep", "lora.r=4,8", "--set", "lora.r=2"]) == 1
    assert f"{path}: --sweep lora.r: also given by --set; give it once" in capfd.readouterr().err


def test_two_values_that_are_one_run_are_refused(world, tiny_dir, capfd):
    path = world / "exp.toml"
    path.write_text(spin(world, tiny_dir))
    assert main(["run", str(path), "--sweep", "training.learning_rate=1,1.0"]) == 1
    err = capfd.readouterr().err
    assert "--sweep training.learning_rate=1.0: the run directory" in err and "is also" in err, err
    assert not (world / "out").exists()


def _point_row(lr, it, seed, em):
    row = _row("tiny-spin", it, seed, em, 30.0, {f"{EM},none": _paired(em - 0.3, 0.05)} if it else None)
    return {**row, "sweep": {"training.learning_rate": lr}}


def test_the_table_has_one_row_per_point_with_the_spread_over_seeds(tmp_path):
    base = tmp_path / "results" / "tiny-spin"
    for lr, gains in ((5e-4, (0.1, 0.2)), (1e-5, (0.0, 0.02))):
        for seed, gain in zip((0, 1), gains):
            _write(base / f"learning_rate-{lr!r}" / f"seed-{seed}",
                   [_point_row(lr, 0, seed, 0.3), _point_row(lr, 1, seed, 0.3 + gain)])
    from harness.report import load_rows

    rows = load_rows([tmp_path / "results"])
    assert len(rows) == 8  # the same (experiment, method, iteration, seed) in two points is no clash
    df = build_table(rows)
    assert list(df["sweep"]) == ["learning_rate=1e-05"] * 2 + ["learning_rate=0.0005"] * 2  # by value, not text
    assert list(df["seeds"]) == [2] * 4
    one = df.iloc[3]
    assert one["iteration"] == 1 and one[EM] == pytest.approx(0.45) and one[EM + " sd"] == pytest.approx(0.0707, abs=1e-3)
    assert one["Δ " + EM] == pytest.approx(0.15)  # each seed against its own point's iteration 0
    assert df.iloc[1]["Δ " + EM] == pytest.approx(0.01)
    text, _ = to_terminal(df)
    assert "| sweep" in text and "learning_rate=0.0005" in text
    to_csv(df, tmp_path / "t.csv")
    assert list(read_csv(tmp_path / "t.csv")["sweep"]) == list(df["sweep"])
    per_seed = build_table(rows, per_seed=True, filters={"sweep": "learning_rate=1e-05"})
    assert len(per_seed) == 4 and set(per_seed["seed"]) == {0, 1}


def test_jobs_children_get_their_point_and_a_gpu_each(world, tiny_dir, monkeypatch):
    """``--jobs 4`` over 2 points x 2 seeds of a run on CUDA ("auto" with GPUs) on a machine with
    two GPUs: each child is ``harness run FILE --seeds k --sweep KEY=VALUE``, sees one GPU, and no
    two children run on one GPU at once; with one GPU they run one at a time."""
    from harness.run import launch

    path = world / "exp.toml"
    path.write_text(spin(world, tiny_dir).replace('device = "cpu"', 'device = "auto"'))
    lock = threading.Lock()
    running: dict[str, int] = {}
    most: dict[str, int] = {}
    commands = []

    class Child:
        returncode = 0

        def __init__(self, gpu):
            self.gpu = gpu

        def communicate(self):
            with lock:
                running[self.gpu] = running.get(self.gpu, 0) + 1
                most[self.gpu] = max(most.get(self.gpu, 0), running[self.gpu])
            time.sleep(0.3)
            with lock:
                running[self.gpu] -= 1
            return "", ""

    def spawn(cmd, env, **_):
        commands.append(cmd)
        return Child(env.get("CUDA_VISIBLE_DEVICES"))

    monkeypatch.setattr(launch, "spawn", spawn)
    for devices in (["0", "1"], ["3"]):
        monkeypatch.setattr(launch, "_visible_gpus", lambda: list(devices))
        commands.clear()
        most.clear()
        assert main(["run", str(path), "--seeds", "0,1", "--jobs", "4", "--sweep", "lora.r=4,8", "-q"]) == 0
        assert most == {d: 1 for d in devices}  # every child on a GPU of its own, every GPU used
        points = sorted((c[c.index("--sweep") + 1], c[c.index("--seeds") + 1]) for c in commands)
        assert points == [("lora.r=4", "0"), ("lora.r=4", "1"), ("lora.r=8", "0"), ("lora.r=8", "1")]


@pytest.mark.slow
def test_a_sweep_of_two_learning_rates_and_two_seeds_gives_a_row_per_rate(tmp_path, capfd):
    """The local launcher: 2 x 2 runs of one iteration in their own directories, one table row per rate."""
    path = write_tiny_spin(tmp_path)
    assert main(["run", str(path), "-q", "--sweep", "training.learning_rate=1e-5,5e-4", "--seeds", "0,1"]) == 0
    out = capfd.readouterr().out
    for lr in ("1e-05", "0.0005"):
        for seed in (0, 1):
            run = tmp_path / "out" / "spin" / f"learning_rate-{lr}" / f"seed-{seed}"
            recorded = read_json(run / "config.json")["config"]
            assert recorded["training"]["learning_rate"] == float(lr)
            assert recorded["experiment"]["sweep"] == ["training.learning_rate"]
            assert json.loads((run / "results.jsonl").read_text().splitlines()[-1])["sweep"] == {
                "training.learning_rate": float(lr)}
    assert out.count("learning_rate=1e-05") == 2 and out.count("learning_rate=0.0005") == 2, out  # iterations 0, 1
    from harness.report import load_rows

    df = build_table(load_rows([tmp_path / "out"]), filters={"iteration": "1"})
    assert list(df["sweep"]) == ["learning_rate=1e-05", "learning_rate=0.0005"] and list(df["seeds"]) == [2, 2]


def test_the_ray_launcher_without_ray_or_an_address_without_it_is_one_line(world, tiny_dir, monkeypatch, capfd):
    path = world / "exp.toml"
    path.write_text(spin(world, tiny_dir))
    assert main(["run", str(path), "--address", "auto"]) == 2
    assert capfd.readouterr().err.strip() == "error: harness run: --address goes with --launcher ray"
    monkeypatch.setitem(sys.modules, "ray", None)  # as where Ray is not installed: its import fails
    assert main(["run", str(path), "--launcher", "ray"]) == 1
    err = capfd.readouterr().err
    assert "error: harness run --launcher ray: Ray is not installed in this environment (./install.sh --ray)" in err
    assert "Traceback" not in err and not (world / "out").exists()


def test_explain_documents_experiment_sweep_and_not_the_point_it_came_from(capsys):
    assert main(["validate", "--explain"]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "harness run --sweep" in rows["`experiment.sweep`"]
    assert "`point`" not in rows  # Config.point: the command line's --sweep texts, not a field of the file
