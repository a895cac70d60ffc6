"""The leaderboard in one call: rows loaded, tabulated, rendered, written (``leaderboard``),
and the boards ``harness run`` writes: each run's own, and the one across its runs.

Not here: the parts (rows, table, files, terminal, html, plots modules) or the
command line's parsing and printing (harness.cli).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple, Sequence

import pandas as pd

from harness.report.files import to_csv, to_markdown
from harness.report.html import GENERATOR, to_html
from harness.report.plots import render_plots, save_plots
from harness.report.rows import ResultsError, load_rows
from harness.report.table import build_table, selected
from harness.report.columns import SEEDS
from harness.report.terminal import TERMINAL_WIDTH, to_terminal
from harness.store.rundir import RunDir
from harness.store.files import atomic_write_text

FORMATS = ("text", "markdown", "csv", "html")
RUN_STEM, BOARD_STEM = "results", "leaderboard"  # file names of a run's tables and of the board across runs


class Board(NamedTuple):
    text: str                # for stdout: the table, or "" when it went to ``out``
    written: list[Path]      # files written (``out``, the saved tables, then plots)
    left_out: list[str]      # columns the text table left out to fit its width


def _render(df: pd.DataFrame, fmt: str, pngs: dict[str, bytes], width: int, title: str) -> tuple[str, list[str]]:
    if fmt == "text":
        return to_terminal(df, width)
    if fmt == "markdown":
        return to_markdown(df), []
    if fmt == "csv":
        return to_csv(df), []
    return to_html(df, images=list(pngs.items()), title=title), []


def leaderboard(paths: Sequence[Path], *, fmt: str = "text", out: Path | None = None, save_as: Path | None = None,
                sort_by: str | None = None, filters: dict | None = None, columns: list[str] | None = None,
                plot_dir: Path | None = None, plots: bool | Sequence[str] = True, width: int = TERMINAL_WIDTH,
                title: str = "Leaderboard", per_seed: bool = False) -> Board:
    """The leaderboard of the results under ``paths`` (see harness.report.table for
    ``sort_by``, ``filters`` and ``columns``).

    ``text`` is the table in ``fmt`` (text: fitted to ``width``, the columns left out
    in ``left_out``; html: the page with the plots inlined), or "" when ``out`` is given:
    then the table goes to that file (its directory is made; a directory or an unwritable
    path is a ResultsError naming it). ``save_as`` (a path without suffix) also writes
    every column as ``<save_as>.csv``, ``.md`` and ``.html`` (the page inlining every
    plot), and ``<save_as>.per-seed.csv`` (one row per seed) when the table averages
    seeds. PNG plots are written only into ``plot_dir`` (none without it): all of them,
    or the ones ``plots`` names (e.g. ("comparison",)). ``per_seed``: one row per seed
    (harness.report.table).
    """
    if fmt not in FORMATS:
        raise ResultsError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rows = load_rows(paths)
    df = build_table(rows, sort_by=sort_by, filters=filters, columns=columns, per_seed=per_seed)
    if out is not None:
        _check_out(Path(out), paths)
        _check_writable(Path(out))
    pngs = render_plots(selected(rows, df)) if plot_dir is not None or save_as is not None or fmt == "html" else {}
    text, left_out = _render(df, fmt, pngs, width, title)
    written: list[Path] = []
    if out is not None:
        try:  # through a temporary file: a failed write leaves the old table whole
            atomic_write_text(Path(out), text if text.endswith("\n") else text + "\n")
        except OSError as e:
            raise ResultsError(f"{out}: cannot write the table ({e.strerror or e})") from None
        written.append(Path(out))
        text = ""
    if save_as is not None:
        stem = Path(save_as)
        stem.parent.mkdir(parents=True, exist_ok=True)
        saved = [stem.with_name(f"{stem.name}.{ext}") for ext in ("csv", "md", "html")]
        to_csv(df, saved[0])
        saved[1].write_text(to_markdown(df) + "\n", encoding="utf-8")
        to_html(df, saved[2], images=list(pngs.items()), title=title)
        written += saved
        if SEEDS in df.columns and not per_seed:  # the seeds one by one
            each = stem.with_name(f"{stem.name}.per-seed.csv")
            to_csv(build_table(rows, sort_by=sort_by, filters=filters, columns=columns, per_seed=True), each)
            written.append(each)
    if plot_dir is not None:
        written += save_plots(pngs if plots is True else {k: v for k, v in pngs.items() if plots and k in plots},
                              Path(plot_dir))
    return Board(text, written, left_out)


# how an existing file is recognised as a table `harness table` wrote (its first line; HTML: its generator tag)
_TABLE_HEAD = re.compile(r"experiment,method(,|$)|\|\s*experiment\s*\|\s*method\s*\||\(no results match\)$")


def is_table(path: Path) -> bool:
    """Whether the file at ``path`` is a table ``harness table`` wrote, by how each format
    starts: CSV with its header ``experiment,method,...`` (CSV has no comments to mark it),
    Markdown and the text table with their header row ``| experiment | method |`` (or the
    empty table's "(no results match)"), HTML with its ``GENERATOR`` tag in the head."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    return _TABLE_HEAD.match(head.split("\n", 1)[0]) is not None or GENERATOR in head


def _check_out(out: Path, paths: Sequence[Path]) -> None:
    """``out`` may take the table: it is none of the files read (``paths`` given as files),
    nothing inside a run directory (``RunDir.is_run``: its results.jsonl, config, manifests,
    stage folders are the run's own), and, when it exists, a table written by ``harness
    table`` (``is_table``). Else a ResultsError naming it; nothing is written."""
    target = out.resolve()
    if any(Path(p).is_file() and Path(p).resolve() == target for p in paths):
        raise ResultsError(f"{out}: is a file this table reads; --out names another file")
    run = next((d for d in target.parents if RunDir(d).is_run()), None)
    if run is not None:
        raise ResultsError(f"{out}: is inside the run directory {run}, whose files are the run's own; "
                           "write the table outside it")
    if target.is_file() and not is_table(target):
        raise ResultsError(f"{out}: exists and is not a table written by harness table; not replaced "
                           "(remove it or name another file)")


def _check_writable(out: Path) -> None:
    """``out`` can take the table: not a directory, its nearest existing parent a writable directory."""
    if out.is_dir():
        raise ResultsError(f"{out}: is a directory; --out names the file to write the table to")
    probe = out if out.exists() else out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir() and probe != out:
        raise ResultsError(f"{out}: cannot write the table ({probe} is not a directory)")
    if not os.access(probe, os.W_OK):
        raise ResultsError(f"{out}: cannot write the table (permission denied on {probe})")


def run_board(run_dir: Path, title: str, width: int = TERMINAL_WIDTH) -> Board:
    """A run's own tables (``results.csv``, ``.md``, ``.html``) and plots in its directory;
    the text is its terminal table."""
    return leaderboard([run_dir], save_as=Path(run_dir) / RUN_STEM, plot_dir=run_dir, title=title, width=width)


def combined_board(run_dirs: Sequence[Path], width: int = TERMINAL_WIDTH) -> Board:
    """The leaderboard across several runs: written beside them (``leaderboard.csv``,
    ``.md``, ``.html``, ``comparison.png``) when they share a parent directory, else
    only its terminal table."""
    parents = {Path(d).resolve().parent for d in run_dirs}
    if len(parents) != 1:
        return leaderboard(run_dirs, width=width)
    board = parents.pop()
    (board / "comparison.png").unlink(missing_ok=True)  # never point at an older run's plot
    return leaderboard(run_dirs, save_as=board / BOARD_STEM, plot_dir=board, plots=("comparison",), width=width)
