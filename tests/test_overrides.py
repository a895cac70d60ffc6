"""``harness run|validate FILE --set KEY=VALUE``: command-line overrides written into the TOML
document before it is validated, validated like the file (their errors name ``--set``), recorded
in the run's config (a rerun without them says what differs) and passed to ``--jobs`` children."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_validate import errors_of, run_validate, spin, world  # noqa: F401  (world: the fixture)

from harness.config import experiment as config
from harness.cli import main
from harness.store.files import read_json


def config_hash(out: str) -> str:
    return re.search(r"config ([0-9a-f]+)", out).group(1)


def test_set_writes_fields_before_validation(world, tiny_dir, capsys):
    path = world / "exp.toml"
    path.write_text(spin(world, tiny_dir))
    sets = ["training.learning_rate=1e-5", 'lora.target_modules=["q_proj"]', "experiment.name=other",
            "data.system_prompt=Be brief.", "method.spin.temperature=0.5"]
    cfg = config.load(path, sets)
    assert cfg.training.learning_rate == 1e-5 and cfg.lora.target_modules == ("q_proj",)
    assert cfg.experiment.name == "other" and cfg.data.system_prompt == "Be brief."  # bare words: a string
    assert cfg.options.temperature == 0.5 and cfg.run_dir == world / "out" / "other"
    assert cfg.hash() != config.load(path).hash()
    assert main(["validate", str(path), *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr()
    assert config_hash(out.out) == cfg.hash(), out.err


@pytest.mark.parametrize("override, field, words", [
    ("model.bse=x", "--set model.bse", "unknown key; did you mean 'base'?"),
    ("modle.base=x", "--set modle", "unknown key; did you mean 'model'?"),
    ("training.learning_rate=fast", "--set training.learning_rate", "expected a number, got str 'fast'"),
    ('eval.lm_eval_tasks=["a", 1]', "--set eval.lm_eval_tasks[1]", "expected str, got int 1"),
    ("lora.r=0", "--set lora.r", "below the minimum 1"),
    ("training", "--set training", "expected KEY=VALUE"),
    ("training.batch_size=[2", "--set training.batch_size", "'[2' is not a TOML value"),
    ("model.base.x=1", "--set model.base.x", "model.base is a value in the file, not a table"),
    ("data.train=missing.jsonl", "--set data.train", "file not found"),  # found by validate, not by parsing
])
def test_a_bad_override_is_one_line_naming_set(world, tiny_dir, capsys, override, field, words):
    code, path, err = run_validate(world, spin(world, tiny_dir), capsys, "--set", override)
    assert code == 1
    found = errors_of(err, path)
    assert field in found, err
    assert words in found[field], err
    assert len(err.strip().splitlines()) == 1, err


def test_an_error_the_file_makes_still_names_the_file(world, tiny_dir, capsys):
    text = spin(world, tiny_dir).replace("batch_size = 2", "batch_size = 2\nlearning_rat = 1")
    code, path, err = run_validate(world, text, capsys, "--set", "training.learning_rate=1e-5")
    assert code == 1 and "training.learning_rat" in errors_of(err, path), err


def write_tiny_spin(root: Path) -> Path:
    """A one-iteration SPIN run on a few prompts of the tiny world (seconds)."""
    from harness.models.sources import resolve_ref

    data = root / "sft.jsonl"
    data.write_text("".join(line + "\n" for line in Path(resolve_ref("tiny:sft_train")).read_text().splitlines()[:16]))
    path = root / "spin.toml"
    path.write_text(f"""
[experiment]
name = "spin"
output_dir = "{root / 'out'}"
[model]
base = "tiny"
device = "cpu"
cpu_threads = 1
[lora]
r = 4
alpha = 8
[method]
name = "spin"
iterations = 1
[data]
train = "{data}"
[generation]
max_new_tokens = 12
[training]
learning_rate = 5e-4
batch_size = 8
max_length = 96
[eval.indicators]
num_prompts = 0
""")
    return path


@pytest.mark.slow
def test_a_run_records_its_overrides_and_a_rerun_without_them_says_what_differs(tmp_path, capfd):
    path = write_tiny_spin(tmp_path)
    assert main(["run", str(path), "-q", "--set", "generation.max_new_tokens=10"]) == 0
    capfd.readouterr()
    run_dir = tmp_path / "out" / "spin"
    recorded = read_json(run_dir / "config.json")
    assert recorded["config"]["generation"]["max_new_tokens"] == 10
    assert recorded["hash"] == config.load(path, ["generation.max_new_tokens=10"]).hash()
    # the same command again finds every stage done; without the override the run stops before any compute
    assert main(["run", str(path), "-q", "--set", "generation.max_new_tokens=10"]) == 0
    capfd.readouterr()
    before = sorted(p.name for p in run_dir.rglob("*"))
    assert main(["run", str(path)]) == 1
    err = capfd.readouterr().err
    assert "iter_001/generate: generation.max_new_tokens was 10, now 12: the run would stop there" in err, err
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_jobs_children_receive_the_overrides(world, tiny_dir, monkeypatch):
    """Each ``--jobs`` child is ``harness run FILE --seeds k`` with the parent's ``--set`` pairs, in order."""
    from harness.run import launch

    path = world / "exp.toml"
    path.write_text(spin(world, tiny_dir))
    commands = []

    class Done:  # a child that ran and succeeded
        returncode = 0

        def communicate(self):
            return "", ""

    def spawn(cmd, **_):
        commands.append(cmd)
        return Done()

    monkeypatch.setattr(launch, "spawn", spawn)
    sets = ["training.learning_rate=1e-5", "experiment.name=jobs"]
    assert main(["run", str(path), "--seeds", "0,1", "--jobs", "2", *[a for s in sets for a in ("--set", s)]]) == 0
    assert sorted(c[c.index("--seeds") + 1] for c in commands) == ["0", "1"]
    for child in commands:
        assert str(path) in child
        assert [child[i + 1] for i, a in enumerate(child) if a == "--set"] == sets
