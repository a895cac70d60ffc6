"""The leaderboard as display strings, Markdown and CSV (and the CSV read back).

Markdown and CSV carry every column of the table: Markdown as formatted cells ("v ± se",
signed deltas, blanks for missing), CSV as raw values with the ± columns numeric.
Not here: the terminal's fitted table (harness.report.terminal) or the HTML page.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from harness import fmt
from harness.report.table import DELTA, PROV_COLS, SE, TEXT_COLS, UNAVAILABLE


def cell(v: Any, signed: bool = False) -> str:
    """A cell's text: integers as is, floats to ~3-4 significant digits, blanks for missing."""
    return fmt.number(None if v is pd.NA else v, grouped=False, signed=signed, blank="")


def formatted(df: pd.DataFrame) -> pd.DataFrame:
    """The table as display strings: "v ± se" cells, signed deltas, blanks for missing."""
    out = {}
    for c in df.columns:
        if c.endswith(SE) and c[: -len(SE)] in df.columns:
            continue
        cells = [cell(v, signed=c.startswith(DELTA)) for v in df[c]]
        if c + SE in df.columns:
            cells = [f"{t} ± {cell(se)}" if t and cell(se) else t for t, se in zip(cells, df[c + SE])]
        out[c] = cells
    return pd.DataFrame(out, columns=list(out), dtype=object)


def to_markdown(df: pd.DataFrame) -> str:
    """A pipe table of every column (pandas' to_markdown, i.e. tabulate).

    disable_numparse: cells are already formatted; tabulate must not re-parse
    "0.500" or a numeric-looking commit hash as numbers and reformat them.
    """
    if df.empty:
        return "(no results match)"
    text_cols = set(TEXT_COLS + PROV_COLS)
    cells = formatted(df)
    align = ["left" if c in text_cols else "right" for c in cells.columns]
    return cells.to_markdown(index=False, disable_numparse=True, colalign=align)


def to_csv(df: pd.DataFrame, path: Path | None = None) -> str:
    """Raw values (± as separate numeric columns); written to ``path`` when given."""
    text = df.to_csv(index=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    return text


def read_csv(path: Path) -> pd.DataFrame:
    """A table written by to_csv, with its types restored (the inverse of to_csv).

    Text columns stay text (a commit "1234567" or version "1.16" is not a number,
    an experiment named "NA" is not missing); metric cells are floats, blank
    (NaN) or the literal "unavailable".
    """
    text_cols = [c for c in [*TEXT_COLS, *PROV_COLS] if c != "seed"]
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    for c in df.columns:
        if c in text_cols:
            df[c] = df[c].where(df[c] != "")
        elif c in ("iteration", "seed") or (any(df[c]) and all(v.lstrip("-").isdigit() for v in df[c] if v)):
            # to_csv writes integer columns without a decimal point, floats always with one
            df[c] = pd.array([int(v) if v else None for v in df[c]], dtype="int64" if c == "iteration" else "Int64")
        else:
            df[c] = pd.Series([v if v == UNAVAILABLE else float(v) if v else math.nan for v in df[c]],
                              index=df.index).infer_objects()
    return df
