"""The leaderboard fitted to a terminal: the main metric of each evaluation and its delta.

Which columns are main, their headers and (for a percentage) their format are the
metric catalogue's ``terminal`` view (harness.metrics); the rest stays in the CSV /
Markdown / HTML files. A Δ shows its paired 95% interval where the row has one
("+0.120 [+0.058, +0.182]*", the interval dropped first when space is short) and a
trailing "*" when that interval excludes 0; rows over several seeds show "mean ± sd" and
a "seeds" column; a legend under the table says so (none for a table without either). The
AlpacaEval protocol is a note under the table: the one protocol of its rows, or which
protocol each "[P1]", "[P2]" ... of the split win-rate columns is (harness.report.table);
each protocol's win rate comes with its own n, coverage and Δ. Not here: those files'
renderers, or the stage lines.
"""

from __future__ import annotations

import math
import textwrap
from numbers import Real
from typing import Any

import pandas as pd

from harness import fmt
from harness.metrics import COST, LC_WIN_RATE, WIN_RATE, companions, find, header, ordered, qualified
from harness.report.files import cell, legend
from harness.report.rows import PUBLISHED
from harness.report.seeds import marked
from harness.report.columns import (COMPANIONS, DELTA, HI, ID_COLS, LO, PROV_COLS, SD, SE, SEEDS, SIG, SWEEP,
                                    is_protocol_column)

TERMINAL_WIDTH = 120


def _main_columns(df: pd.DataFrame) -> tuple[list[str], set[str]]:
    """The main metric of each evaluation (lm-eval tasks' primary metrics, the win rate
    with its n and coverage, the LC win rate where a row has one); every metric column
    when none of those is there. Also the columns shown in their catalogue format (the
    main ones: a percentage as such)."""
    metric_cols = [c for c in df.columns if c not in ID_COLS + PROV_COLS + [SEEDS, SWEEP] and not is_protocol_column(c)
                   and not c.startswith(DELTA)
                   and not any(c.endswith(x) and c[: -len(x)] in df.columns for x in COMPANIONS)]
    cols = []
    for c in ordered(metric_cols, "terminal"):
        if qualified(c)[0] == LC_WIN_RATE and not any(isinstance(v, Real) and not math.isnan(v) for v in df[c]):
            continue  # offline it is null: an "unavailable" column says nothing
        cols += [c] + [k for k in companions(c) if k in df.columns]
    if not cols:  # cost columns stay in the files: the terminal gets harness.store.cost.cost_summary's line
        return [c for c in metric_cols if not (find(c) is not None and find(c).producer == COST)], set()
    return cols, set(cols)


def _cell(col: str, v: Any, se: Any = math.nan, styled: bool = False) -> str:
    if styled and find(col).format == "percent":
        return fmt.percent(v, blank="")
    text = cell(v)
    return f"{text} ± {cell(se)}" if text and cell(se) else text


def _delta_cell(r: pd.Series, col: str, with_se: bool, with_ci: bool) -> str:
    """A Δ: "+0.12", with the seeds' sd ("+0.12 ± 0.03"), its paired interval ("+0.12 [+0.06, +0.18]")
    and "*" when the interval excludes 0 (over seeds: every seed's, on one side)."""
    d = DELTA + col
    text = cell(r[d], signed=True)
    if not text:
        return text
    if with_se and d + SD in r.index and cell(r[d + SD]):
        text += f" ± {cell(r[d + SD])}"
    if with_ci and d + LO in r.index and cell(r[d + LO]) and cell(r[d + HI]):
        text += f" [{cell(r[d + LO], signed=True)}, {cell(r[d + HI], signed=True)}]"
    if d + SIG in r.index and marked(r[d + SIG]):
        text += "*"
    return text


def _pipe(header_cells: list[str], rows: list[list[str]], right: list[bool]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header_cells)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else (":" + "-" * (w + 1)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(header_cells), rule] + [line(r) for r in rows])


def to_terminal(df: pd.DataFrame, width: int = TERMINAL_WIDTH) -> tuple[str, list[str]]:
    """A pipe table at most ``width`` columns wide: experiment, method (model when
    rows differ in it), iteration, and per evaluation its main metric (± its
    standard error) followed by "Δ" against iteration 0; n and coverage after a
    win rate. Returns (table, the metric columns left out to fit).

    To fit: as many evaluations as fit in the most compact style (task names
    without the metric name, no ± values, names cut to 16 characters), shown in
    the richest style that fits them. The full table is in the CSV / Markdown /
    HTML files."""
    if df.empty:
        return "(no results match)", []
    main, styled = _main_columns(df)
    runs = df[df["method"] != PUBLISHED] if "model" in df.columns else df.iloc[:0]
    show_model = runs["model"].nunique(dropna=True) > 1  # a published system's model is its name
    ids = ["experiment", "method"] + (["model"] if show_model else []) + ([SWEEP] if SWEEP in df.columns else []) \
        + ["iteration"] + ([SEEDS] if SEEDS in df.columns else [])

    def render(cols: list[str], short: bool, with_se: bool, with_ci: bool, cut: int | None) -> str:
        head, right = [], []
        for c in ids:
            head.append("iter" if c == "iteration" else c)
            right.append(c in ("iteration", SEEDS))
        for c in cols:
            head.append(header(c, short))
            right.append(True)
            if DELTA + c in df.columns:
                head.append("Δ")
                right.append(True)
        rows = []
        for _, r in df.iterrows():
            cells = []
            for c in ids:
                t = cell(r[c])
                cells.append(t if cut is None else fmt.cut(t, cut))
            for c in cols:
                se = r[c + SE] if with_se and c + SE in df.columns else math.nan
                if with_se and c + SD in df.columns and fmt.missing(se):
                    se = r[c + SD]  # a row over seeds: the standard deviation between them
                cells.append(_cell(c, r[c], se, c in styled))
                if DELTA + c in df.columns:  # blank at iteration 0 itself
                    cells.append(_delta_cell(r, c, with_se, with_ci) if r["iteration"] != 0 else "")
            rows.append(cells)
        return _pipe(head, rows, right)

    def wide(text: str) -> int:
        return max(len(line) for line in text.splitlines())

    # (short names, ± values, Δ intervals, cut names to): richest first
    plain = [(False, True, None), (True, True, None), (True, False, None), (True, False, 24), (True, False, 16)]
    styles = {ci: [(short, se, ci, cut) for short, se, cut in plain] for ci in (True, False)}

    # as many evaluations as fit in the most compact style, then the richest style that fits them;
    # dropped in this order: the LC win rate, lm-eval metrics from the right (the first stays), then
    # the win rate with its n and coverage (never one of them without the others); with several
    # AlpacaEval protocols, each one's win rate group, the last protocol's first
    win_group = (WIN_RATE, *companions(WIN_RATE))
    groups: dict[str, list[str]] = {}
    for c in main:
        base, tag = qualified(c)
        if base in win_group:
            groups.setdefault(tag, []).append(c)
    wins = list(groups.values())
    win = [c for g in wins for c in g]
    lm = [c for c in main if c not in win and qualified(c)[0] != LC_WIN_RATE]
    # (several protocols: their n and coverage go before any protocol's win rate does)
    counts = [[c for g in wins for c in g[1:]]] if len(wins) > 1 else []
    drops = [[c] for c in main if qualified(c)[0] == LC_WIN_RATE] + [[c] for c in reversed(lm[1:])] + counts \
        + list(reversed(wins[1:])) + ([wins[0]] if wins and lm else [])
    def fits(cols: list[str], with_ci: bool) -> bool:
        return wide(render(cols, *styles[with_ci][-1])) <= width

    def fit(with_ci: bool) -> list[str]:
        cols = list(main)
        for group in [[]] + ([d for d in drops if d not in wins] if with_ci and win and lm else drops):
            cols = [c for c in cols if c not in group]
            if fits(cols, with_ci) or not cols:
                break
        return cols

    # the Δ intervals come before more lm-eval metrics (never before the win rate or the first
    # lm-eval metric): without room for them then, the table is as without them
    has_ci = lambda cols: any(DELTA + c + LO in df.columns and df[DELTA + c + LO].notna().any()  # noqa: E731
                              for c in cols)
    cols = fit(True)
    if not (has_ci(cols) and fits(cols, True)):
        cols = fit(False)
    with_ci = has_ci(cols) and fits(cols, True)
    for style in styles[with_ci]:
        text = render(cols, *style)
        if wide(text) <= width:
            break
    with_se = style[1]
    shown = [c for c in df.columns if any(c == DELTA + m + SIG for m in cols)] + [c for c in (SEEDS,) if c in df]
    notes = legend(df[[c for c in df.columns if c in shown or not (c.endswith(SIG) or c == SEEDS)]], bracketed=True,
                   intervals=with_ci, spread=with_se)
    if notes:
        text += "\n" + "\n".join(textwrap.fill(n, width=min(width, max(40, wide(text)))) for n in notes)
    return text, [c for c in main if c not in cols]
