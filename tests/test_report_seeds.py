"""Leaderboards over seeds, gains with paired intervals, paired comparisons of two runs,
and the table / import commands' error lines (synthetic results.jsonl and items.jsonl)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main
from harness.report import ResultsError, build_table, leaderboard, load_rows, read_csv, to_csv, to_markdown, to_terminal

EM = "lm_eval/tiny_gen/exact_match"
WR = "alpaca_eval/win_rate"


def _paired(mean, half, n=100):
    return {"n": n, "mean": mean, "se": half / 2, "ci_low": mean - half, "ci_high": mean + half,
            "significant": mean - half > 0 or mean + half < 0}


def _row(exp, it, seed, em, wr, paired=None, method="spin"):
    return {"experiment": exp, "method": method, "iteration": it, "seed": seed, "model": "tiny",
            "metrics": {EM: em, EM + "_stderr": 0.04, WR: wr, "alpaca_eval/standard_error": 3.5,
                        "alpaca_eval/n_total": 100, "alpaca_eval/coverage": 1.0},
            "paired": paired or {}, "provenance": {"config_hash": f"h{seed}", "seed": seed, "git_commit": "abcdef0",
                           "versions": {"torch": "2.13.0", "transformers": "5.23.0", "trl": "1.16"}}}


def _write(run_dir: Path, rows: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return run_dir


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    """tiny-spin with seeds 0 and 1 (gains +0.05 / +0.15 exact match, both significant at iteration 2;
    win rate +2 [-2, +6] and +8 [+2, +14]) and a single-seed tiny-sr."""
    base = tmp_path / "results"
    _write(base / "tiny-spin" / "seed-0", [
        _row("tiny-spin", 0, 0, 0.35, 26.0),
        _row("tiny-spin", 1, 0, 0.40, 28.0, {f"{EM},none": _paired(0.05, 0.04), WR: _paired(2.0, 4.0)}),
        _row("tiny-spin", 2, 0, 0.45, 30.0, {f"{EM},none": _paired(0.10, 0.05), WR: _paired(4.0, 3.0)}),
    ])
    _write(base / "tiny-spin" / "seed-1", [
        _row("tiny-spin", 0, 1, 0.35, 26.0),
        _row("tiny-spin", 1, 1, 0.50, 34.0, {f"{EM},none": _paired(0.15, 0.06), WR: _paired(8.0, 6.0)}),
        _row("tiny-spin", 2, 1, 0.55, 20.0, {f"{EM},none": _paired(0.20, 0.05), WR: _paired(-6.0, 3.0)}),
    ])
    _write(base / "tiny-sr", [
        _row("tiny-sr", 0, 0, 0.30, 40.0, method="self_rewarding"),
        _row("tiny-sr", 1, 0, 0.20, 45.0, {f"{EM},none": _paired(-0.10, 0.05), WR: _paired(5.0, 6.0)},
             method="self_rewarding"),
    ])
    return base


def _at(df, exp, it, col):
    return df[(df.experiment == exp) & (df.iteration == it)][col].item()


# ---------------------------------------------------------------- seeds

def test_seeds_are_one_row_with_mean_sd_and_count(seeds):
    df = build_table(load_rows([seeds]))
    assert list(df.columns[:5]) == ["experiment", "method", "model", "iteration", "seeds"]
    assert len(df) == 5 and df[df.experiment == "tiny-spin"].seeds.tolist() == [2, 2, 2]
    assert _at(df, "tiny-sr", 1, "seeds") == 1
    assert _at(df, "tiny-spin", 1, EM) == pytest.approx(0.45)
    assert _at(df, "tiny-spin", 1, EM + " sd") == pytest.approx(math.sqrt(2) * 0.05)  # ddof 1
    assert math.isnan(_at(df, "tiny-spin", 1, EM + " ±"))  # within-seed errors: per-seed rows
    assert _at(df, "tiny-sr", 1, EM + " ±") == pytest.approx(0.04) and math.isnan(_at(df, "tiny-sr", 1, EM + " sd"))
    assert _at(df, "tiny-spin", 2, f"Δ {EM}") == pytest.approx(0.15)  # each seed against its own iteration 0
    assert _at(df, "tiny-spin", 0, "alpaca_eval/n_total") == 100 and df["alpaca_eval/n_total"].dtype == "Int64"
    assert pd.isna(_at(df, "tiny-spin", 0, "seed")) and _at(df, "tiny-spin", 0, "config_hash") == "h0,h1"
    # one row per seed, on request
    per = build_table(load_rows([seeds]), per_seed=True)
    assert "seeds" not in per.columns and len(per) == 8
    assert per[per.experiment == "tiny-spin"].seed.tolist() == [0, 1, 0, 1, 0, 1]
    assert per[(per.experiment == "tiny-spin") & (per.seed == 1) & (per.iteration == 2)][f"Δ {EM}"].item() == \
        pytest.approx(0.20)
    # a seed filter picks seeds before they are averaged
    one = build_table(load_rows([seeds]), filters={"seed": "1", "experiment": "tiny-spin"})
    assert "seeds" not in one.columns and _at(one, "tiny-spin", 1, EM) == 0.5


def test_same_seed_in_two_files_is_still_an_error(seeds, tmp_path):
    _write(tmp_path / "copy", [_row("tiny-spin", 0, 1, 0.35, 26.0)])
    with pytest.raises(ResultsError, match=r"\('tiny-spin', 'spin', 0, 'seed 1'\) is also in"):
        load_rows([seeds, tmp_path / "copy"])


def test_mean_gain_significant_only_when_every_seed_is_on_one_side(seeds):
    df = build_table(load_rows([seeds]))
    assert _at(df, "tiny-spin", 1, f"Δ {EM} sig") == True  # noqa: E712  [+0.01, +0.09] and [+0.09, +0.21]
    assert _at(df, "tiny-spin", 1, f"Δ {WR} sig") == False  # noqa: E712  [-2, +6] and [+2, +14]
    assert _at(df, "tiny-spin", 2, f"Δ {WR} sig") == False  # noqa: E712  [+1, +7] and [-9, -3]: opposite sides
    assert math.isnan(_at(df, "tiny-spin", 1, f"Δ {EM} lo"))  # a mean's interval: the seeds' rows have them
    assert _at(df, "tiny-sr", 1, f"Δ {EM} lo") == pytest.approx(-0.15) and _at(df, "tiny-sr", 1, f"Δ {EM} sig")
    md = to_markdown(df)
    cells = {line.split("|")[1].strip() + "/" + line.split("|")[4].strip(): line for line in md.splitlines()[2:7]}
    assert "+0.100 ± 0.071*" in cells["tiny-spin/1"] and "+0.150 ± 0.071*" in cells["tiny-spin/2"]
    assert "Rows over several seeds" in md and "every seed's paired 95% interval excludes 0" in md


def test_terminal_over_seeds_fits_and_says_what_it_shows(seeds):
    text, left_out = to_terminal(build_table(load_rows([seeds])))
    assert max(map(len, text.splitlines())) <= 120 and left_out == []
    head = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    assert head[:4] == ["experiment", "method", "iter", "seeds"]
    assert "+0.150" in text and "Rows over several seeds (seeds > 1): mean over seeds" in text


def test_csv_keeps_the_interval_and_seed_columns(seeds, tmp_path):
    df = build_table(load_rows([seeds]))
    to_csv(df, tmp_path / "t.csv")
    back = read_csv(tmp_path / "t.csv")
    pd.testing.assert_frame_equal(back, df)
    assert {f"Δ {EM} lo", f"Δ {EM} hi", f"Δ {EM} sig", f"{EM} sd", "seeds"} <= set(back.columns)
    # a saved board also writes the seeds one by one
    _, written, _ = leaderboard([seeds], save_as=tmp_path / "b" / "leaderboard")
    assert sorted(p.name for p in written) == ["leaderboard.csv", "leaderboard.html", "leaderboard.md",
                                               "leaderboard.per-seed.csv"]
    each = read_csv(tmp_path / "b" / "leaderboard.per-seed.csv")
    assert len(each) == 8 and "seeds" not in each.columns


# ---------------------------------------------------------------- gains with paired intervals

def test_single_seed_gains_show_their_interval_and_mark(seeds):
    rows = [r for r in load_rows([seeds]) if r["experiment"] == "tiny-spin" and r["seed"] == 0]
    df = build_table(rows)
    assert "seeds" not in df.columns  # one seed: as without seeds
    assert _at(df, "tiny-spin", 2, f"Δ {EM} lo") == pytest.approx(0.05)
    assert _at(df, "tiny-spin", 2, f"Δ {EM} hi") == pytest.approx(0.15)
    assert pd.isna(_at(df, "tiny-spin", 0, f"Δ {EM} sig"))
    text, _ = to_terminal(df)
    assert max(map(len, text.splitlines())) <= 120
    assert "+0.100 [+0.050, +0.150]*" in text and "+2.00 [-2.00, +6.00] |" in text
    assert "[lo, hi]: its paired 95% interval on the items both evaluated; * the interval excludes 0" in \
        " ".join(text.split())
    for width in (100, 80):  # narrower: still fits, the legend says what is shown
        narrow, _ = to_terminal(df, width)
        assert max(map(len, narrow.splitlines())) <= width and "+0.100" in narrow and "*" in narrow
        assert ("[lo, hi]" in narrow) == ("[+0.050, +0.150]*" in narrow)
    md = to_markdown(df)
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    line = dict(zip(header, [c.strip() for c in md.splitlines()[4].strip("|").split("|")]))
    assert line[f"Δ {EM}"] == "+0.100*" and line[f"Δ {EM} lo"] == "+0.050" and line[f"Δ {EM} hi"] == "+0.150"
    assert line[f"Δ {WR}"] == "+4.00*" and f"Δ {EM} sig" not in header
    page = leaderboard([seeds / "tiny-spin" / "seed-0"], fmt="html").text
    assert f'data-name="Δ {EM} lo"' in page and "+0.100*" in page and "paired 95% interval" in page


def test_comparison_plot_draws_gain_intervals():
    from harness.report.plots import _bar_error, render_plots

    r = _row("a", 2, 0, 0.45, 30.0, {f"{EM},none": _paired(0.10, 0.05)})
    assert _bar_error(r, EM, EM + "_stderr") == [[pytest.approx(0.05)], [pytest.approx(0.05)]]
    assert _bar_error(r, WR, "alpaca_eval/standard_error") == 3.5  # no paired gain: its standard error
    rows = [_row(e, it, 0, 0.3 + 0.1 * it, 30.0, {f"{EM},none": _paired(0.1 * it, 0.05)} if it else None)
            for e in ("a", "b") for it in range(3)]
    assert set(render_plots(rows)) == {"a", "b", "comparison"}


# ---------------------------------------------------------------- harness table --compare

def _items(run: Path, it: int, values: dict[str, list[float]]):
    d = run / f"iter_{it:03d}" / "evaluate"
    d.mkdir(parents=True, exist_ok=True)
    (d / "items.jsonl").write_text("".join(json.dumps({"metric": m, "item": f"i{k}", "value": v}) + "\n"
                                           for m, vs in values.items() for k, v in enumerate(vs)))


def test_compare_two_runs(tmp_path, capfd):
    a, b = tmp_path / "a", tmp_path / "b"
    _items(a, 0, {WR: [0.0, 100.0, 0.0, 100.0], f"{EM},none": [0, 1, 0, 1]})
    _items(b, 0, {WR: [100.0, 100.0, 100.0, 100.0], f"{EM},none": [0, 1, 1, 0]})
    _items(a, 1, {WR: [0.0, 0.0, 0.0, 0.0]})
    _items(b, 1, {WR: [0.0, 50.0, 0.0, 50.0]})
    assert main(["table", "--compare", str(a), str(b), "--iteration", "0"]) == 0
    got = capfd.readouterr()
    assert got.err == "" and "B - A at iteration 0" in got.out
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
             for line in got.out.splitlines() if line.startswith("| ")}
    assert lines["win rate"][1:] == ["+50.00", "28.87", "[-41.87, +141.9]", "4", ""]
    assert lines["tiny_gen exact_match"][1] == "+0.000"
    assert main(["table", "--compare", str(a), str(b)]) == 0  # default: the last iteration both evaluated
    assert "B - A at iteration 1" in capfd.readouterr().out
    # no shared items: one error line, no traceback
    c = tmp_path / "c"
    _items(c, 1, {WR: [1.0, 2.0]})
    (c / "iter_001" / "evaluate" / "items.jsonl").write_text(
        "".join(json.dumps({"metric": WR, "item": f"other{k}", "value": 1.0}) + "\n" for k in range(3)))
    assert main(["table", "--compare", str(a), str(c)]) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "share no evaluated items" in err and str(c) in err and "Traceback" not in err
    assert main(["table", "--compare", str(a), str(tmp_path / "nowhere")]) == 1
    assert "nowhere: not a directory" in capfd.readouterr().err


# ---------------------------------------------------------------- error lines

def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def _one_error(capfd, *needles):
    got = capfd.readouterr()
    lines = got.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in got.err, got.err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_table_errors_are_one_line(seeds, tmp_path, capfd):
    bad = _write(tmp_path / "bad", [])
    (bad / "results.jsonl").write_bytes(b'{"experiment": "caf\xe9", "method": "spin"}\n')
    before = _snapshot(tmp_path)
    assert main(["table", str(bad)]) == 1
    _one_error(capfd, str(bad / "results.jsonl") + ":1", "not UTF-8")
    # --out a directory, --out below a file
    (tmp_path / "dir").mkdir()
    before = _snapshot(tmp_path)
    assert main(["table", str(seeds), "--out", str(tmp_path / "dir")]) == 1
    _one_error(capfd, str(tmp_path / "dir"), "is a directory")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    before = _snapshot(tmp_path)
    assert main(["table", str(seeds), "--out", str(blocker / "t.md"), "--format", "markdown"]) == 1
    _one_error(capfd, str(blocker / "t.md"), "not a directory")
    assert _snapshot(tmp_path) == before
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["table", str(seeds), "--out", str(locked / "t.csv")]) == 1
        _one_error(capfd, str(locked / "t.csv"), "permission denied")
    # html with --out: the page only (its plots are inlined); PNGs only with --plots
    out = tmp_path / "page" / "board.html"
    assert main(["table", str(seeds), "--format", "html", "--out", str(out)]) == 0
    assert capfd.readouterr().err.splitlines() == [f"wrote {out}"] and sorted(os.listdir(out.parent)) == ["board.html"]


def test_table_out_never_replaces_an_input_a_run_file_or_a_file_that_is_not_a_table(seeds, tmp_path, capfd):
    """--out is refused, with one line and nothing written, when it names a file the table
    reads, anything inside a run directory (results.jsonl, config, a stage's manifest, a new
    file) or an existing file that is not a table of ours; a table of ours (any format,
    the empty one included) is replaced, through a temporary file."""
    from harness.report.board import is_table

    run = seeds / "tiny-sr"
    (run / "config.json").write_text("{}")
    (run / "provenance.json").write_text("{}")
    stage = run / "iter_001" / "judge"
    stage.mkdir(parents=True)
    (stage / "manifest.json").write_text("{}")
    loose = tmp_path / "rows.jsonl"
    loose.write_bytes((run / "results.jsonl").read_bytes())
    notes = tmp_path / "notes.md"
    notes.write_text("| experiment notes |\nnot a table of ours\n")
    before = _snapshot(tmp_path)
    for out, fmt in ((run / "results.jsonl", "csv"), (stage / "manifest.json", "markdown"),
                     (run / "config.json", "html"), (run / "new.md", "text")):
        assert main(["table", str(run), "--out", str(out), "--format", fmt]) == 1
        _one_error(capfd, str(out), f"inside the run directory {run}")
    assert main(["table", str(loose), "--out", str(loose), "--format", "csv"]) == 1
    _one_error(capfd, str(loose), "is a file this table reads")
    assert main(["table", str(seeds), "--out", str(notes), "--format", "markdown"]) == 1
    _one_error(capfd, str(notes), "exists and is not a table written by harness table")
    assert _snapshot(tmp_path) == before
    board = tmp_path / "board.out"
    for fmt, filters in (("csv", []), ("markdown", []), ("text", []), ("html", []),
                         ("markdown", ["--filter", "method=nope"]), ("csv", ["--filter", "method=nope"]), ("csv", [])):
        assert main(["table", str(seeds), "--out", str(board), "--format", fmt, *filters]) == 0
        assert capfd.readouterr().err.splitlines() == [f"wrote {board}"] and is_table(board)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["board.out", "notes.md", "results", "rows.jsonl"]
    assert board.read_text(encoding="utf-8") == to_csv(build_table(load_rows([seeds])))


def test_import_published_errors_are_one_line(tmp_path, capfd):
    from harness.report.published import SAFE_NAME
    from harness.validate.experiment import _SAFE_NAME

    assert SAFE_NAME.pattern == _SAFE_NAME.pattern  # the rule of experiment.name
    dest = tmp_path / "results"
    run = _write(dest / "my-run", [_row("my-run", 0, 0, 0.3, 30.0)])
    (run / "config.json").write_text("{}")
    outs = tmp_path / "x.model_outputs.json"
    outs.write_text(json.dumps([{"instruction": "i", "output": "o", "generator": "x"}]))
    ann = tmp_path / "x.annotations.json"
    ann.write_text(json.dumps([{"instruction": "i", "preference": 2.0}]))
    before = _snapshot(tmp_path)

    def imp(name, o=outs, a=ann):
        return main(["import-alpaca-eval", "--name", name, "--outputs", str(o), "--annotations", str(a),
                     "--dest", str(dest)])

    for name in ("../other-run", str(tmp_path / "abs"), "a/b", "..", ".hidden"):
        assert imp(name) == 1
        _one_error(capfd, repr(name), "one safe path component")
    assert imp("my-run") == 1
    _one_error(capfd, str(run), "holds something other than an imported published system")
    nofield = tmp_path / "nofield.json"
    nofield.write_text(json.dumps([{"instruction": "i", "answer": "o"}]))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "i", "output": ')
    assert imp("sys", o=nofield) == 1
    _one_error(capfd, str(nofield), "no 'output' field")
    assert imp("sys", o=broken) == 1
    _one_error(capfd, str(broken), "not valid JSON")
    assert imp("sys", o=tmp_path / "missing.json") == 1
    _one_error(capfd, str(tmp_path / "missing.json"), "no such file")
    assert imp("sys", a=broken) == 1
    _one_error(capfd, str(broken), "not valid JSON")
    assert _snapshot(tmp_path) == {**before, "broken.json": broken.read_bytes(), "nofield.json": nofield.read_bytes()}
