"""AlpacaEval adapter: position-bias control, coverage, alpaca_eval's own statistics,
and the import of published systems reproducing the published leaderboard."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from test_eval_fixtures import SHARED_DATA, require, tiny, tiny_dir  # noqa: F401  (fixtures)

from harness.config.eval_sections import AlpacaEvalSection
from harness.evaluate.alpaca import CoverageError, annotate, run_alpaca_eval
from harness.evaluate.alpaca_instructions import load_instructions
from harness.evaluate.published import import_published, write_published_run
from harness.judges.base import Verdict

AE_DATA = SHARED_DATA / "alpaca_eval"
SYSTEMS = ("gemma-7b-it", "alpaca-7b")


class FirstWins:
    """A maximally position-biased pairwise judge: whatever it sees first wins."""
    name, scale = "first_wins", (1.0, 2.0)

    def __init__(self):
        self.calls = 0

    def score(self, items):
        raise AssertionError("pairwise judge: compare() must be used")

    def compare(self, firsts, seconds):
        self.calls += len(firsts)
        return [1.0] * len(firsts)


class LongerWins:
    """A position-free pointwise judge: the longer response scores higher."""
    name, scale = "longer_wins", (0.0, 1e9)

    def score(self, items):
        return [Verdict(score=float(len(i.response))) for i in items]


class Flaky(LongerWins):
    """Fails (score None) on the items whose instruction number is odd."""
    name = "flaky"

    def score(self, items):
        return [Verdict(score=None) if int(i.instruction.split()[-1]) % 2 else v
                for i, v in zip(items, super().score(items))]


def _rows(n: int) -> list[dict]:
    return [{"instruction": f"write something {i}", "output": "ref " * (i % 5), "generator": "ref_model",
             "dataset": "unit", "id": f"q{i}"} for i in range(n)]


def _outputs(n: int) -> dict[str, str]:
    return {f"q{i}": "model " * ((i * 3) % 7) for i in range(n)}


def test_both_orders_cancel_a_first_position_judge():
    ann = annotate(FirstWins(), _rows(10), _outputs(10), "both", (0, 1), "m")
    assert [a["preference"] for a in ann] == [1.5] * 10
    from harness.evaluate.alpaca import compute_metrics

    m, _ = compute_metrics(ann, list(_outputs(10).values()), 10)
    assert m["alpaca_eval/win_rate"] == 50.0 and m["alpaca_eval/n_draws"] == 10


def test_random_positions_are_seeded_and_undone():
    rows, outs = _rows(40), _outputs(40)
    ann = annotate(FirstWins(), rows, outs, "random", (0, 1), "m")
    # the biased judge's "first wins" maps back to: model wins exactly when it was shown first
    assert all(a["preference"] == (2.0 if a["position"] == "model_first" else 1.0) for a in ann)
    n_model_first = sum(a["position"] == "model_first" for a in ann)
    assert 10 <= n_model_first <= 30
    assert [a["position"] for a in annotate(FirstWins(), rows, outs, "random", (0, 1), "m")] == \
        [a["position"] for a in ann]  # seeded: same order every time
    assert [a["position"] for a in annotate(FirstWins(), rows, outs, "random", (1, 1), "m")] != \
        [a["position"] for a in ann]
    # a position-free judge gives the same verdicts whatever the order
    rand = annotate(LongerWins(), rows, outs, "random", (0, 1), "m")
    both = annotate(LongerWins(), rows, outs, "both", (0, 1), "m")
    expect = [2.0 if len(outs[r["id"]]) > len(r["output"]) else 1.0 if len(outs[r["id"]]) < len(r["output"])
              else 1.5 for r in rows]
    assert [a["preference"] for a in rand] == [a["preference"] for a in both] == expect
    assert all(a["output_1"] == r["output"] and a["output_2"] == outs[r["id"]] for a, r in zip(rand, rows))


def _write_instructions(path: Path, n: int) -> Path:
    path.write_text(json.dumps([{k: v for k, v in r.items() if k != "id"} for r in _rows(n)]))
    return path


def test_win_rate_statistics_on_hand_made_annotations():
    """Known answers, counted by hand: 3 wins, 1 loss, 1 exact draw, 1 weighted 1.75, and one
    failed judgment (null) out of 7 instructions."""
    import statistics

    from harness.evaluate.alpaca import compute_metrics

    prefs = [2.0, 2.0, 2.0, 1.0, 1.5, 1.75, None]
    ann = [{"instruction": f"i{i}", "output_1": "ref", "output_2": "model", "generator_1": "r",
            "generator_2": "m", "preference": p} for i, p in enumerate(prefs)]
    m, info = compute_metrics(ann, ["ab", "abcd", "abc", "a", "abcdef", "ab", "abcd"], 7)
    credit = [1, 1, 1, 0, 0.5, 0.75]                     # preference - 1 of the six judged
    assert m["alpaca_eval/win_rate"] == pytest.approx(100 * 4.25 / 6)
    assert m["alpaca_eval/standard_error"] == pytest.approx(100 * statistics.stdev(credit) / 6 ** 0.5)
    assert (m["alpaca_eval/n_wins"], m["alpaca_eval/n_draws"], m["alpaca_eval/n_total"]) == (4, 1, 6)
    assert m["alpaca_eval/discrete_win_rate"] == pytest.approx(100 * 4.5 / 6)   # 1.75 rounds to a win
    assert m["alpaca_eval/avg_length"] == 3 and m["alpaca_eval/n_instructions"] == 7   # int(22 / 7)
    assert m["alpaca_eval/coverage"] == pytest.approx(6 / 7)
    assert m["alpaca_eval/length_controlled_winrate"] is None and "805" in info["length_controlled_winrate"]


def test_run_writes_files_and_metrics_come_from_alpaca_eval(tiny, tmp_path):
    import statistics

    model, tok = tiny
    section = AlpacaEvalSection(instructions=str(_write_instructions(tmp_path / "ae.json", 12)), limit=10)
    out = tmp_path / "out"
    m = run_alpaca_eval(model, tok, section, LongerWins, out, seed_key=(0, 1), generator="tiny/iter_001",
                        max_new_tokens=8, batch_size=4)
    outputs = json.loads((out / "model_outputs.json").read_text())
    assert len(outputs) == 10 and {o["generator"] for o in outputs} == {"tiny/iter_001"}
    # the judge prefers the longer answer: the expected preferences follow from the texts alone
    refs = [r["output"] for r in _rows(10)]
    lens = [(len(o["output"]), len(r)) for o, r in zip(outputs, refs)]
    credit = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in lens]
    assert len(set(credit)) > 1, lens   # not a degenerate case
    assert m["alpaca_eval/win_rate"] == pytest.approx(100 * sum(credit) / 10)
    assert m["alpaca_eval/standard_error"] == pytest.approx(100 * statistics.stdev(credit) / 10 ** 0.5)
    assert m["alpaca_eval/n_wins"] == sum(c == 1.0 for c in credit)
    assert m["alpaca_eval/n_draws"] == sum(c == 0.5 for c in credit) and m["alpaca_eval/n_total"] == 10
    assert m["alpaca_eval/avg_length"] == sum(a for a, _ in lens) // 10
    assert m["alpaca_eval/length_controlled_winrate"] is None  # no df_gamed.csv here: never a made-up number
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["notes"]["length_controlled_winrate"].startswith("unavailable")
    assert m["alpaca_eval/coverage"] == 1.0 and m["alpaca_eval/n_instructions"] == 10

    # a rerun reuses the generations and annotations instead of asking the judge again
    judge = FirstWins()
    run_alpaca_eval(model, tok, section, lambda: judge, out, seed_key=(0, 1), generator="tiny/iter_001",
                    max_new_tokens=8, batch_size=4)
    assert judge.calls == 10  # judge changed -> annotation keys differ -> re-judged
    run_alpaca_eval(model, tok, section, lambda: judge, out, seed_key=(0, 1), generator="tiny/iter_001",
                    max_new_tokens=8, batch_size=4)
    assert judge.calls == 10  # same inputs: nothing re-judged


def test_coverage_below_threshold_raises(tiny, tmp_path):
    model, tok = tiny
    ins = str(_write_instructions(tmp_path / "ae.json", 10))
    kwargs = dict(seed_key=(0, 1), generator="g", max_new_tokens=4, batch_size=8)
    with pytest.raises(CoverageError, match=r"5/10 instructions.*min_coverage 0.95"):
        run_alpaca_eval(model, tok, AlpacaEvalSection(instructions=ins), Flaky, tmp_path / "a", **kwargs)
    ann = json.loads((tmp_path / "a" / "annotations.json").read_text())  # kept for inspection
    assert sum(a["preference"] is None for a in ann) == 5
    m = run_alpaca_eval(model, tok, AlpacaEvalSection(instructions=ins, min_coverage=0.5), Flaky,
                        tmp_path / "b", **kwargs)
    assert (m["alpaca_eval/n_total"], m["alpaca_eval/n_instructions"], m["alpaca_eval/coverage"]) == (5, 10, 0.5)


def test_load_instructions_errors_and_limit(tmp_path):
    p = _write_instructions(tmp_path / "ae.json", 5)
    rows = load_instructions(str(p), limit=3)
    assert [r["instruction"] for r in rows] == [f"write something {i}" for i in range(3)]
    assert len({r["id"] for r in rows}) == 3
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(ValueError, match="row 0 needs"):
        load_instructions(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError, match="eval.alpaca_eval.instructions"):
        load_instructions(str(tmp_path / "missing.json"))


# --- published systems ------------------------------------------------------------------------

def _leaderboard_rows() -> dict[str, dict[str, str]]:
    import alpaca_eval

    path = (Path(alpaca_eval.__file__).parent / "leaderboards" / "data_AlpacaEval_2"
            / "weighted_alpaca_eval_gpt4_turbo_leaderboard.csv")
    with path.open() as f:
        return {row[""]: row for row in csv.DictReader(f)}


def _published(name: str) -> tuple[Path, Path]:
    return (AE_DATA / f"{name}.model_outputs.json",
            AE_DATA / f"{name}.weighted_alpaca_eval_gpt4_turbo.annotations.json")


@pytest.mark.parametrize("name", SYSTEMS)
def test_import_reproduces_published_leaderboard(name):
    require(AE_DATA.is_dir(), f"published AlpacaEval files not found at {AE_DATA} (shared data folder absent)")
    m = import_published(*_published(name), name)
    row = _leaderboard_rows()[name]
    for k in ("win_rate", "standard_error", "discrete_win_rate"):
        assert repr(m[f"alpaca_eval/{k}"]) == row[k], k  # every printed digit
    for k in ("n_wins", "n_draws", "n_total", "avg_length"):
        assert m[f"alpaca_eval/{k}"] == int(row[k]), k
    assert m["alpaca_eval/length_controlled_winrate"] is None  # the published LC needs df_gamed.csv


def test_published_run_row(tmp_path):
    require(AE_DATA.is_dir(), f"published AlpacaEval files not found at {AE_DATA} (shared data folder absent)")
    outs, ann = _published("alpaca-7b")
    path = write_published_run(tmp_path / "alpaca-7b", "alpaca-7b", outs, ann)
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert (row["experiment"], row["method"], row["iteration"]) == ("alpaca-7b", "published", 0)
    assert row["metrics"]["alpaca_eval/n_wins"] == 17
    src = row["provenance"]["imported_from"]
    assert src["annotations"]["sha256"] == hashlib.sha256(ann.read_bytes()).hexdigest()
    assert src["model_outputs"]["path"] == str(outs.resolve())


def test_length_controlled_win_rate_comes_from_alpaca_eval_when_its_data_is_cached(tmp_path, monkeypatch):
    """With alpaca_eval's GLM data in the local hub cache, LC is alpaca_eval's length-controlled
    model's number. The cached files here are synthetic stand-ins with the columns alpaca_eval
    reads, so the expectations are the properties LC has whatever the data: it removes wins
    that length explains, keeps wins that it does not, and is 50 for a system against itself."""
    import huggingface_hub.constants
    import pandas as pd

    from harness.evaluate.alpaca import AE_SET_SIZE, compute_metrics

    from test_eval_fixtures import write_df_gamed

    snap, difficulty, rng = write_df_gamed(tmp_path / "hub", "0" * 40, AE_SET_SIZE)
    pd.Series(difficulty, name="instruction_difficulty").to_csv(snap / "instruction_difficulty.csv")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def annotations(prefs, len_ref, len_model, generator="model"):
        return [{"instruction": f"i{i}", "output_1": "r" * a, "output_2": "m" * b, "generator_1": "ref",
                 "generator_2": generator, "annotator": "j", "preference": p}
                for i, (p, a, b) in enumerate(zip(prefs, len_ref, len_model))]

    len_ref = [rng.randrange(10, 60) for _ in range(AE_SET_SIZE)]
    # a length gamer: answers longer than the reference 85% of the time, and it wins exactly then
    len_gamer = [a + (rng.randrange(5, 40) if rng.random() < 0.85 else -rng.randrange(5, 9)) for a in len_ref]
    wins = [b > a for a, b in zip(len_ref, len_gamer)]
    ann = annotations([2.0 if w else 1.0 for w in wins], len_ref, len_gamer)
    m, info = compute_metrics(ann, [a["output_2"] for a in ann], AE_SET_SIZE)
    raw, lc = m["alpaca_eval/win_rate"], m["alpaca_eval/length_controlled_winrate"]
    assert raw == pytest.approx(100 * sum(wins) / AE_SET_SIZE) and "length_controlled_winrate" not in info
    assert lc < raw - 15          # the wins are explained by length: length control takes most of them away
    # wins that do not depend on length keep about their raw rate
    len_model = [rng.randrange(10, 60) for _ in range(AE_SET_SIZE)]
    fair = [rng.random() < 0.8 for _ in range(AE_SET_SIZE)]
    m, _ = compute_metrics(annotations([2.0 if w else 1.0 for w in fair], len_ref, len_model),
                           ["m" * b for b in len_model], AE_SET_SIZE)
    assert abs(m["alpaca_eval/length_controlled_winrate"] - m["alpaca_eval/win_rate"]) < 5
    # a system against itself: 50 by definition, whatever the raw preferences
    m, _ = compute_metrics(annotations([2.0 if w else 1.0 for w in wins], len_ref, len_gamer, generator="ref"),
                           ["m" * b for b in len_gamer], AE_SET_SIZE)
    assert m["alpaca_eval/length_controlled_winrate"] == 50.0
    # a subset (limit) is not the AlpacaEval set: unavailable, never an extrapolated number
    m, info = compute_metrics(ann[:100], [a["output_2"] for a in ann[:100]], 100)
    assert m["alpaca_eval/length_controlled_winrate"] is None and "805" in info["length_controlled_winrate"]


def test_import_refuses_one_systems_outputs_with_another_systems_annotations(tmp_path, capfd):
    """gemma-7b-it's outputs with alpaca-7b's annotations (or the same system on other
    instructions, or with its answers changed) is refused with one line, nothing written."""
    require(AE_DATA.is_dir(), f"published AlpacaEval files not found at {AE_DATA} (shared data folder absent)")
    from harness.cli import main

    dest = tmp_path / "results"

    def imp(outs, ann, name="sys"):
        code = main(["import-alpaca-eval", "--name", name, "--outputs", str(outs), "--annotations", str(ann),
                     "--dest", str(dest)])
        err = capfd.readouterr().err.splitlines()
        return code, err

    gemma, alpaca = _published("gemma-7b-it"), _published("alpaca-7b")
    code, err = imp(gemma[0], alpaca[1])
    assert code == 1 and len(err) == 1 and "holds the outputs of gemma-7b-it" in err[0]
    assert "annotates alpaca-7b (generator_2)" in err[0]
    # no generator names to go by: the annotated answers tell
    outs = json.loads(gemma[0].read_text())
    nameless = tmp_path / "nameless.model_outputs.json"
    nameless.write_text(json.dumps([{k: v for k, v in r.items() if k != "generator"} for r in outs]))
    code, err = imp(nameless, alpaca[1])
    assert code == 1 and len(err) == 1 and "805 of 805 annotated answers (output_2) differ" in err[0]
    # the same system on fewer instructions
    fewer = tmp_path / "fewer.model_outputs.json"
    fewer.write_text(json.dumps(outs[:800]))
    code, err = imp(fewer, gemma[1])
    assert code == 1 and len(err) == 1 and "not on the same instructions: 5 annotated instruction(s) have no output" \
        in err[0]
    assert not dest.exists()
    code, err = imp(*gemma, name="gemma-7b-it")   # its own annotations: imported
    assert code == 0 and (dest / "gemma-7b-it" / "results.jsonl").is_file()
