"""Leaderboard tables from synthetic results.jsonl files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from harness.report import (ResultsError, build_table, leaderboard, load_rows, read_csv, to_csv, to_html, to_markdown,
                            to_terminal)

EM = "lm_eval/tiny_gen/exact_match"
ACC = "lm_eval/tiny_mc/acc,none"
WR = "alpaca_eval/win_rate"
LC = "alpaca_eval/length_controlled_winrate"


def _prov(commit="0123456789abcdef", dirty=False, seed=0):
    return {"config_hash": "c0ffee00c0ffee00", "seed": seed, "git_commit": commit, "git_dirty": dirty,
            "versions": {"torch": "2.13.0", "transformers": "5.23.0", "trl": "1.16"}}


def _row(exp, method, it, metrics, model=None, **prov):
    row = {"experiment": exp, "method": method, "iteration": it, "metrics": metrics, "provenance": _prov(**prov)}
    if model is not None:
        row["model"] = model
    return row


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
                                       "alpaca_eval/n_total": 100, "alpaca_eval/coverage": 1.0,
                                       "indicators/distinct_1": 0.5 - 0.1 * it, "indicators/mean_length": 40.0 + 10 * it,
                                       "gen/tokens": 1000 * it, "wall_time_s": 12.5 * (it + 1)})
        for it, (em, acc, wr) in enumerate([(0.25, 0.5, 50.0), (0.375, 0.5, 56.25), (0.5, 0.625, 61.0)])
    ])
    for r in (rows := [json.loads(x) for x in (base / "tiny-spin" / "results.jsonl").read_text().splitlines()]):
        r["model"] = "tiny"
    _write(base / "tiny-spin", rows)
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
    assert list(df.columns[:4]) == ["experiment", "method", "model", "iteration"]
    assert list(df.columns[-6:]) == ["config_hash", "seed", "commit", "torch", "transformers", "trl"]
    assert df.columns.get_loc(EM + " ±") == df.columns.get_loc(EM) + 1
    assert df.columns.get_loc(WR) < df.columns.get_loc("indicators/distinct_1") < df.columns.get_loc("gen/tokens")
    # a win rate comes with its n and coverage
    assert df.columns.get_loc(WR) < df.columns.get_loc("alpaca_eval/n_total") < df.columns.get_loc("alpaca_eval/coverage")
    assert _cell(df, "tiny-spin", 0, "model") == "tiny"
    assert _cell(df, "SPIN paper iter3", 0, "model") == "SPIN paper iter3"  # a published system is its own model
    assert pd.isna(_cell(df, "tiny-sr", 0, "model"))  # rows written before models were recorded
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
    assert list(picked.columns[4:7]) == [EM, EM + " ±", "wall_time_s"] and WR not in picked.columns
    assert build_table(rows, filters={"model": "tiny"}).experiment.unique().tolist() == ["tiny-spin"]
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
    text, written, _ = leaderboard([runs], fmt="html", out=out, plot_dir=tmp_path / "board")
    page = out.read_text(encoding="utf-8")
    assert text == "" and written[0] == out and "<style>" in page and "</table>" in page and "<script>" in page
    assert sorted(p.name for p in written[1:]) == ["comparison.png", "tiny-spin.png", "tiny-sr.png"]
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script src" not in page
    assert page.count('src="data:image/png;base64,') == 3  # two experiments + comparison
    assert "0.375 ± 0.050" in page and "unavailable" in page
    # sortable, filterable, published systems marked (behaviour: tests/test_leaderboard_html.py)
    assert f'<th data-name="{WR}" data-type="num"' in page and 'data-v="56.25"' in page
    assert 'id="f-method"' in page and 'id="f-model"' in page and 'id="f-experiment"' in page
    assert page.count('class="published"') == 1 and "imported published AlpacaEval systems" in page
    # without --out: the page itself, plots inlined, no file written
    alone = leaderboard([runs], fmt="html")
    assert alone.text.startswith("<!DOCTYPE html>") and alone.written == []
    assert alone.text.count('src="data:image/png;base64,') == 3
    evil = to_html(build_table([_row("<b>x</b>", "spin", 0, {WR: 1.0})]))
    assert "<b>x</b>" not in evil and "&lt;b&gt;x&lt;/b&gt;" in evil


def test_plots_written(runs, tmp_path):
    from matplotlib.image import imread

    from harness.report.plots import write_plots

    paths = write_plots(load_rows([runs]), tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["comparison.png", "tiny-spin.png", "tiny-sr.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    # small multiples: one panel per quantity (tiny-spin: 2 lm-eval metrics, win rate, 2 indicators -> 4 + 1)
    h, w = imread(tmp_path / "plots" / "tiny-spin.png").shape[:2]
    assert w > 4 * 300 and h > 2 * 240
    h, w = imread(tmp_path / "plots" / "tiny-sr.png").shape[:2]
    assert w < 2.2 * 340
    assert write_plots([_row("empty", "spin", 0, {"train/loss": 0.1})], tmp_path / "none") == []
    # one experiment alone has nothing to compare with
    one = [r for r in load_rows([runs]) if r["experiment"] == "tiny-spin"]
    assert [p.name for p in write_plots(one, tmp_path / "one")] == ["tiny-spin.png"]


def test_render_markdown_and_csv(runs, tmp_path):
    text = leaderboard([runs / "tiny-spin"], fmt="markdown", sort_by="iteration",
                       filters={"iteration": ["1", "2"]}).text
    table, note = text.split("\n\n")
    body = [[c.strip() for c in line.strip("|").split("|")][:4] for line in table.splitlines()[2:]]
    assert body == [["tiny-spin", "spin", "tiny", "2"], ["tiny-spin", "spin", "tiny", "1"]]  # sorted descending
    assert note == "AlpacaEval protocol: unknown (rows written before results rows recorded their protocol)."
    csv = leaderboard([runs], fmt="csv")
    assert csv.text.startswith("experiment,method,model,iteration,") and csv.written == []
    assert not list(runs.rglob("*.png"))  # plots only when asked for
    with pytest.raises(ResultsError, match="fmt"):
        leaderboard([runs], fmt="xlsx")


def _terminal_rows(text: str) -> list[dict]:
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [list(zip(header, [c.strip() for c in line.strip("|").split("|")])) for line in lines[2:]]


def test_terminal_table(runs):
    df = build_table(load_rows([runs]))
    text, left_out = to_terminal(df)
    assert left_out == [] and max(map(len, text.splitlines())) <= 120
    rows = _terminal_rows(text)
    header = [h for h, _ in rows[0]]
    # main metric per evaluation, each followed by its delta; n and coverage beside the win rate
    assert header == ["experiment", "method", "iter", "tiny_gen exact_match", "Δ", "tiny_mc acc", "Δ",
                      "win rate", "Δ", "n", "judged"] or header == [
        "experiment", "method", "iter", "tiny_gen", "Δ", "tiny_mc", "Δ", "win rate", "Δ", "n", "judged"]
    spin1 = rows[1]
    assert spin1[3][1].startswith("0.375") and spin1[4][1] == "+0.125" and spin1[7][1].startswith("56.25")
    alone = _terminal_rows(to_terminal(build_table(load_rows([runs / "tiny-spin"])))[0])
    assert alone[1][3][1] == "0.375 ± 0.050" and alone[1][7][1] == "56.25 ± 2.50"  # ± when there is room
    assert spin1[9][1] == "100" and spin1[10][1] == "100%"
    assert rows[0][4][1] == ""  # no delta at iteration 0 itself
    assert "indicators" not in text and "config_hash" not in text

    # many evaluations: the table still fits, drops metrics from the right, never the win rate's n / coverage alone
    many = {f"lm_eval/task_number_{i}/exact_match": 0.1 * i for i in range(8)}
    wide = build_table([_row("an-experiment-with-a-long-name", "self_rewarding", it,
                             {**many, WR: 40.0 + it, "alpaca_eval/standard_error": 1.5, "alpaca_eval/n_total": 99,
                              "alpaca_eval/coverage": 0.99}) for it in range(3)])
    for width in (120, 100, 80):
        text, left_out = to_terminal(wide, width)
        assert max(map(len, text.splitlines())) <= width, width
        assert "task_number_0" in text and "lm_eval/task_number_7/exact_match" in left_out
        if width == 120:
            assert "win rate" in text and "| judged |" in text and "99.0%" in text
        assert ("win rate" in text) == ("| judged |" in text) == (" n |" in text)
    # several models: a model column (a published system's name does not count as one)
    assert "| model" not in to_terminal(df)[0]
    two = build_table(load_rows([runs]) + [_row("other", "spin", 0, {EM: 0.1}, model="smollm2")])
    assert "| model" in to_terminal(two)[0]


def test_saved_tables(runs, tmp_path):
    table, written, left_out = leaderboard([runs / "tiny-spin"], save_as=tmp_path / "out" / "results",
                                           plot_dir=tmp_path / "out")
    assert sorted(p.name for p in written) == ["results.csv", "results.html", "results.md", "tiny-spin.png"]
    assert "win rate" in table and left_out == []
    pd.testing.assert_frame_equal(read_csv(tmp_path / "out" / "results.csv"), build_table(load_rows([runs / "tiny-spin"])))
    _, written, _ = leaderboard([runs], save_as=tmp_path / "board" / "leaderboard", plot_dir=tmp_path / "board",
                                plots=("comparison",))
    assert sorted(p.name for p in written) == ["comparison.png", "leaderboard.csv", "leaderboard.html", "leaderboard.md"]


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
