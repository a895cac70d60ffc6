"""Leaderboard tables from synthetic results.jsonl files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from harness.results import (ResultsError, build_table, load_rows, read_csv, render_leaderboard, to_csv,
                             to_html, to_markdown)

EM = "lm_eval/tiny_gen/exact_match"
ACC = "lm_eval/tiny_mc/acc,none"
WR = "alpaca_eval/win_rate"
LC = "alpaca_eval/length_controlled_winrate"


def _prov(commit="0123456789abcdef", dirty=False, seed=0):
    return {"config_hash": "c0ffee00c0ffee00", "seed": seed, "git_commit": commit, "git_dirty": dirty,
            "versions": {"torch": "2.13.0", "transformers": "5.23.0", "trl": "1.16"}}


def _row(exp, method, it, metrics, **prov):
    return {"experiment": exp, "method": method, "iteration": it, "metrics": metrics, "provenance": _prov(**prov)}


def _write(run_dir: Path, rows: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    base = tmp_path / "results"
    _write(base / "tiny-spin", [
        _row("tiny-spin", "spin", it, {EM: em, EM + "_stderr": 0.05, ACC: acc, WR: wr,
                                       "alpaca_eval/standard_error": 2.5, LC: None,
                                       "indicators/distinct_1": 0.5 - 0.1 * it, "indicators/mean_length": 40.0 + 10 * it,
                                       "gen/tokens": 1000 * it, "wall_time_s": 12.5 * (it + 1)})
        for it, (em, acc, wr) in enumerate([(0.25, 0.5, 50.0), (0.375, 0.5, 56.25), (0.5, 0.625, 61.0)])
    ])
    _write(base / "tiny-sr", [
        _row("tiny-sr", "self_rewarding", 0, {EM: 0.3, WR: 40.0}, dirty=True, seed=7),
        _row("tiny-sr", "self_rewarding", 1, {EM: 0.2, WR: 45.5}, dirty=True, seed=7),
    ])
    _write(base / "published", [
        {"experiment": "SPIN paper iter3", "method": "published", "iteration": 0, "metrics": {WR: 70.0, EM: 0.9}},
    ])
    return base


def _cell(df, exp, it, col):
    return df[(df.experiment == exp) & (df.iteration == it)][col].item()


def test_deltas_vs_iteration_0(runs):
    df = build_table(load_rows([runs]))
    assert _cell(df, "tiny-spin", 2, f"Δ {EM}") == pytest.approx(0.25)
    assert _cell(df, "tiny-spin", 2, f"Δ {ACC}") == pytest.approx(0.125)
    assert _cell(df, "tiny-spin", 1, f"Δ {WR}") == pytest.approx(6.25)
    assert _cell(df, "tiny-spin", 0, f"Δ {WR}") == 0.0
    assert _cell(df, "tiny-sr", 1, f"Δ {EM}") == pytest.approx(-0.1)  # per experiment, not across
    assert math.isnan(_cell(df, "tiny-sr", 1, f"Δ {ACC}"))  # metric absent in that experiment
    assert math.isnan(_cell(df, "SPIN paper iter3", 0, f"Δ {WR}"))  # published: no deltas
    assert "Δ indicators/distinct_1" not in df.columns and "Δ wall_time_s" not in df.columns
    # Filtering out iteration 0 keeps the deltas (computed before filtering).
    df2 = build_table(load_rows([runs]), filters={"iteration": "2"})
    assert df2[f"Δ {EM}"].tolist() == [pytest.approx(0.25)]


def test_columns_provenance_and_default_order(runs):
    df = build_table(load_rows([runs]))
    assert list(df.columns[:3]) == ["experiment", "method", "iteration"]
    assert list(df.columns[-6:]) == ["config_hash", "seed", "commit", "torch", "transformers", "trl"]
    assert df.columns.get_loc(EM + " ±") == df.columns.get_loc(EM) + 1
    assert df.columns.get_loc(WR) < df.columns.get_loc("indicators/distinct_1") < df.columns.get_loc("gen/tokens")
    assert EM + "_stderr" not in df.columns and "alpaca_eval/standard_error" not in df.columns
    assert list(df.experiment) == ["tiny-spin"] * 3 + ["tiny-sr"] * 2 + ["SPIN paper iter3"]  # published last
    assert _cell(df, "tiny-spin", 0, "commit") == "0123456"
    assert _cell(df, "tiny-sr", 1, "commit") == "0123456-dirty"
    assert _cell(df, "tiny-sr", 1, "seed") == 7
    assert _cell(df, "tiny-spin", 1, "trl") == "1.16"
    assert pd.isna(_cell(df, "SPIN paper iter3", 0, "commit"))


def test_sort_and_filter(runs):
    rows = load_rows([runs])
    df = build_table(rows, sort_by="win_rate")  # unique last component of alpaca_eval/win_rate
    assert df[WR].tolist() == [70.0, 61.0, 56.25, 50.0, 45.5, 40.0]
    asc = build_table(rows, sort_by=ACC, descending=False)
    assert asc[ACC].tolist()[:3] == [0.5, 0.5, 0.625] and asc[ACC].isna().sum() == 3  # missing sort last
    assert build_table(rows, filters={"method": "spin"}).iteration.tolist() == [0, 1, 2]
    assert set(build_table(rows, filters={"experiment": "tiny-*"}).experiment) == {"tiny-spin", "tiny-sr"}
    assert len(build_table(rows, filters={"method": ["spin", "published"], "iteration": "0"})) == 2
    picked = build_table(rows, columns=[EM, "wall_time_s"])
    assert list(picked.columns[3:6]) == [EM, EM + " ±", "wall_time_s"] and WR not in picked.columns
    with pytest.raises(ResultsError, match="did you mean 'method'"):
        build_table(rows, filters={"methd": "spin"})
    with pytest.raises(ResultsError, match="ambiguous"):
        build_table([_row("e", "m", 0, {"lm_eval/a/acc": 1.0, "lm_eval/b/acc": 2.0})], sort_by="acc")


def test_markdown_unavailable_and_plus_minus(runs):
    df = build_table(load_rows([runs]))
    md = to_markdown(df)
    lines = md.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert LC in header and f"{EM} ±" not in header and f"{WR} ±" not in header
    spin1 = [c.strip() for c in lines[3].strip("|").split("|")]
    cell = dict(zip(header, spin1))
    assert cell["experiment"] == "tiny-spin" and cell["iteration"] == "1"
    assert cell[LC] == "unavailable"
    assert cell[EM] == "0.375 ± 0.050"
    assert cell[WR] == "56.25 ± 2.50"
    assert cell[f"Δ {EM}"] == "+0.125" and cell[f"Δ {WR}"] == "+6.25" and cell["trl"] == "1.16"
    assert cell["gen/tokens"] == "1000" and cell["wall_time_s"] == "25.00" and cell["seed"] == "0"
    sr = dict(zip(header, [c.strip() for c in lines[6].strip("|").split("|")]))  # tiny-sr, iteration 1
    assert sr[LC] == "" and sr[EM] == "0.200" and sr["commit"] == "0123456-dirty"  # no key, no stderr
    assert to_markdown(build_table(load_rows([runs]), filters={"method": "nope"})) == "(no results match)"


def test_csv_round_trip(runs, tmp_path):
    df = build_table(load_rows([runs]))
    text = to_csv(df, tmp_path / "t.csv")
    assert "unavailable" in text and "Δ " in text
    back = read_csv(tmp_path / "t.csv")
    assert list(back.columns) == list(df.columns)
    pd.testing.assert_frame_equal(back, df)  # values and dtypes
    assert back[LC].tolist()[:3] == ["unavailable"] * 3
    assert back["trl"].tolist()[0] == "1.16"  # a version is text, not the float 1.16
    assert back["seed"].dtype == "Int64" and back["gen/tokens"].dtype == "Int64"  # counts stay integers


def test_html_is_self_contained(runs, tmp_path):
    out = tmp_path / "board" / "leaderboard.html"
    text = render_leaderboard([runs], fmt="html", out=out, plot_dir=tmp_path / "board")
    page = out.read_text(encoding="utf-8")
    assert f"wrote {out}" in text and "<style>" in page and "</table>" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    assert page.count('src="data:image/png;base64,') == 3  # two experiments + comparison
    assert "0.375 ± 0.050" in page and "unavailable" in page
    evil = to_html(build_table([_row("<b>x</b>", "spin", 0, {WR: 1.0})]))
    assert "<b>x</b>" not in evil and "&lt;b&gt;x&lt;/b&gt;" in evil


def test_plots_written(runs, tmp_path):
    from harness.plots import write_plots

    paths = write_plots(load_rows([runs]), tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["comparison.png", "tiny-spin.png", "tiny-sr.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert write_plots([_row("empty", "spin", 0, {"train/loss": 0.1})], tmp_path / "none") == []
    # one experiment alone has nothing to compare with
    one = [r for r in load_rows([runs]) if r["experiment"] == "tiny-spin"]
    assert [p.name for p in write_plots(one, tmp_path / "one")] == ["tiny-spin.png"]


def test_render_markdown_and_csv(runs, tmp_path):
    text = render_leaderboard([runs / "tiny-spin"], sort_by="iteration", filters={"iteration": ["1", "2"]})
    body = [[c.strip() for c in line.strip("|").split("|")][:3] for line in text.splitlines()[2:]]
    assert body == [["tiny-spin", "spin", "2"], ["tiny-spin", "spin", "1"]]  # sorted descending
    csv = render_leaderboard([runs], fmt="csv")
    assert csv.startswith("experiment,method,iteration,")
    with pytest.raises(ResultsError, match="fmt"):
        render_leaderboard([runs], fmt="xlsx")


def test_load_errors(runs, tmp_path):
    with pytest.raises(ResultsError, match="nowhere"):
        load_rows([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResultsError, match="no results.jsonl"):
        load_rows([tmp_path / "empty"])
    bad = runs / "tiny-sr" / "results.jsonl"
    bad.write_text(bad.read_text() + '{"experiment": "tiny-sr", "method"\n')
    with pytest.raises(ResultsError, match=r"tiny-sr/results.jsonl:3: not valid JSON"):
        load_rows([runs])
    _write(tmp_path / "b", [_row("x", "spin", 0, {WR: "high"})])
    with pytest.raises(ResultsError, match=r"b/results.jsonl:1: metrics\['alpaca_eval/win_rate'\]"):
        load_rows([tmp_path / "b"])
    _write(tmp_path / "c", [{"experiment": "x", "method": "spin", "iteration": "1", "metrics": {}}])
    with pytest.raises(ResultsError, match=r"c/results.jsonl:1: field 'iteration'"):
        load_rows([tmp_path / "c"])


def test_duplicates(runs, tmp_path):
    rows = load_rows([runs, runs / "tiny-spin", runs / "tiny-spin" / "results.jsonl"])  # same file thrice
    assert len(rows) == 6
    _write(tmp_path / "copy", [_row("tiny-sr", "self_rewarding", 0, {EM: 0.3})])
    with pytest.raises(ResultsError, match="also in"):
        load_rows([runs, tmp_path / "copy"])
    _write(tmp_path / "re", [_row("e", "spin", 0, {EM: 0.1}), _row("e", "spin", 0, {EM: 0.2})])
    assert [r["metrics"][EM] for r in load_rows([tmp_path / "re"])] == [0.2]  # re-evaluation: last wins
