"""Strict experiment files: every error at once, with dotted paths; every shipped file validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import experiment as config
from harness.cli import main
from harness.config.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").rglob("*.toml"))

MINIMAL = """
[experiment]
name = "x"

[model]
base = "tiny"

[method]
name = "spin"

[data]
train = "tiny:sft_train"
"""


def write(tmp_path, text, name="exp.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_three_mistakes_three_errors_nonzero_exit(tmp_path, capsys):
    bad = write(tmp_path, MINIMAL.replace('name = "x"', 'name = "x"\nseeed = 3')
                .replace('base = "tiny"', 'base = "tiny"\nquantization = "5bit"')
                .replace('name = "spin"', 'name = "spin"\niterations = 0'))
    assert main(["validate", str(bad)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"{bad}: experiment.seeed: unknown key; did you mean 'seed'?",
        f"{bad}: model.quantization: '5bit' is not one of ['none', '4bit', '8bit'] (did you mean '8bit'?)",
        f"{bad}: method.iterations: 0 is below the minimum 1",
    ]


def test_minimal_file_gets_defaults_and_stable_hash(tmp_path):
    cfg = config.load(write(tmp_path, MINIMAL))
    assert cfg.method.loss == "sigmoid" and cfg.lora.r == 16 and cfg.chain == "merge"
    assert cfg.options.data_mix == "newest_plus_previous"
    again = config.load(write(tmp_path, MINIMAL + "\n# a comment\n", "other.toml"))
    assert cfg.hash() == again.hash()
    changed = config.load(write(tmp_path, MINIMAL.replace("[data]", "[generation]\nmax_new_tokens = 7\n\n[data]"), "c.toml"))
    assert changed.hash() != cfg.hash()


@pytest.mark.parametrize("snippet, path, words", [
    ('[method]\nname = "spni"', "method.name", "did you mean 'spin'"),
    ('[method]\nname = "dno"', "judge.name", "needs a judge"),
    ('[method]\nname = "spin"\n[method.dno]\nmargin = 1.0', "method.dno", "another method"),
    ('[method]\nname = "spin"\n[method.spin]\ndata_mixx = "all"', "method.spin.data_mixx", "did you mean 'data_mix'"),
    ('[method]\nname = "spin"\nbeta = "high"', "method.beta", "expected a number"),
    ('[method]\nname = "spin"\n[lora]\ntarget_modules = "q_proj"', "lora.target_modules", "expected list"),
    ('[method]\nname = "spin"\n[evaluation]\nx = 1', "evaluation", "did you mean 'eval'"),
    # eval.num_fewshot: a number or a table of numbers (per task), each at least 0
    ('[method]\nname = "spin"\n[eval]\nnum_fewshot = {gsm8k = 5, arc_easy = -1}', "eval.num_fewshot.arc_easy",
     "-1 is below the minimum 0"),
    ('[method]\nname = "spin"\n[eval]\nnum_fewshot = {gsm8k = "five"}', "eval.num_fewshot",
     "expected int or table of int"),
    ('[method]\nname = "spin"\n[eval.validation]\nnum_fewshot = -2', "eval.validation.num_fewshot",
     "-2 is below the minimum 0"),
])
def test_errors_name_the_dotted_path(tmp_path, snippet, path, words):
    text = MINIMAL.replace('[method]\nname = "spin"', snippet)
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, text))
    assert any(err.path == path and words in err.message for err in e.value.errors), str(e.value)
    assert str(e.value).startswith(str(tmp_path / "exp.toml") + ": ")


def test_num_fewshot_is_unset_a_number_or_a_table(tmp_path):
    assert config.load(write(tmp_path, MINIMAL)).eval.num_fewshot is None  # each task's own count
    text = MINIMAL + "\n[eval]\nnum_fewshot = {gsm8k = 5}\n[eval.validation]\nnum_fewshot = 2\n"
    cfg = config.load(write(tmp_path, text, "t.toml"))
    assert cfg.eval.num_fewshot == {"gsm8k": 5} and cfg.eval.validation.num_fewshot == 2


def test_malformed_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[experiment\nname="))
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.toml")


def test_missing_required_tables_all_reported(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, "[experiment]\nname = 'x'\n"))
    assert {err.path for err in e.value.errors} == {"model", "method", "data"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[str(p.relative_to(REPO)) for p in EXPERIMENTS])
def test_every_shipped_experiment_validates(path):
    """Parses, and every referenced file, model and task resolves (what this machine lacks
    must be declared in experiment.requires: hub ids, CUDA, judge endpoints)."""
    from harness.validate.experiment import check

    cfg = config.load(path)
    report = check(cfg)
    assert report.errors == []
    assert report.unmet <= set(cfg.experiment.requires)


def test_explain_lists_every_field(capsys):
    assert main(["validate", "--explain"]) == 0
    out = capsys.readouterr().out
    for key in ("`experiment.seed`", "`eval.alpaca_eval.position`", "`method.dno.margin`", "`lora.chain`"):
        assert key in out
