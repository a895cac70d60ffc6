"""The leaderboard as display strings, Markdown and CSV (and the CSV read back).

Markdown and CSV carry every column of the table: Markdown as formatted cells ("v ± se",
"mean ± sd" over seeds, signed deltas with a "*" where the paired interval excludes 0, the
intervals' "Δ <metric> lo" / "hi" columns, blanks for missing) and the legend of what it
shows under it, CSV as raw values with the ±, sd, lo, hi and sig columns as their own.
Protocols (harness.report.table): CSV has its protocol columns always; Markdown (and the
terminal table and HTML page) name a table's one AlpacaEval protocol and each lm-eval
task's one protocol in note lines under it, and where a scope's rows have several, show
that scope's protocol column and a note saying which protocol each "[P1]", "[P2]" ... of
its split columns is.
Not here: the terminal's fitted table (harness.report.terminal) or the HTML page.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from harness import fmt
from harness.report.protocol import AE_SCOPE, LM_PREFIX, MT_SCOPE, UNKNOWN
from harness.report.seeds import marked
from harness.report.columns import (DELTA, LO, PROTOCOL, PROV_COLS, SD, SE, SEEDS, SIG, SWEEP, TEXT_COLS, UNAVAILABLE,
                                    column_scope, is_protocol_column, protocol_tags)


def cell(v: Any, signed: bool = False) -> str:
    """A cell's text: integers as is, floats to ~3-4 significant digits, blanks for missing."""
    return fmt.number(None if v is pd.NA else v, grouped=False, signed=signed, blank="")


def _merged(df: pd.DataFrame, c: str) -> bool:
    """A column shown inside another's cell (its ±, sd or significance)."""
    return any(c.endswith(x) and c[: -len(x)] in df.columns for x in (SE, SD, SIG))


def formatted(df: pd.DataFrame) -> pd.DataFrame:
    """The table as display strings: "v ± se" cells ("mean ± sd" over seeds), signed deltas
    ("*" after one whose paired 95% interval excludes 0), blanks for missing."""
    out = {}
    for c in df.columns:
        if _merged(df, c):
            continue
        cells = [cell(v, signed=c.startswith(DELTA)) for v in df[c]]
        for spread in (SE, SD):
            if c + spread in df.columns:
                cells = [f"{t} ± {cell(e)}" if t and cell(e) else t for t, e in zip(cells, df[c + spread])]
        if c + SIG in df.columns:
            cells = [t + "*" if t and marked(sig) else t for t, sig in zip(cells, df[c + SIG])]
        out[c] = cells
    return pd.DataFrame(out, columns=list(out), dtype=object)


def displayed(df: pd.DataFrame) -> pd.DataFrame:
    """The table as Markdown, the terminal and HTML show it: without the protocol column of a
    scope whose rows have one protocol (the note under it names that one)."""
    tags = protocol_tags(df)
    return df.drop(columns=[c for c in df.columns if is_protocol_column(c) and column_scope(c) not in tags])


def protocol_note(df: pd.DataFrame) -> list[str]:
    """The lines naming the table's AlpacaEval protocol and each lm-eval task's, or saying which
    protocol each tag of the split columns is ([] for a table without protocol columns)."""
    tags = protocol_tags(df)
    lines = []
    if PROTOCOL in df.columns:
        labels = [v for v in df[PROTOCOL] if isinstance(v, str)]
        if AE_SCOPE in tags:
            lines.append("AlpacaEval protocols (win rates of different protocols are never ranked together; each has "
                         "its own columns): " + "; ".join(f"[{t}] {label}" for label, t in tags[AE_SCOPE].items())
                         + ".")
        elif labels:
            lines.append(f"AlpacaEval protocol: {labels[0]}." if labels[0] != UNKNOWN else
                         "AlpacaEval protocol: unknown (rows written before results rows recorded their protocol).")
    split, single = [], []
    for col in [c for c in df.columns if is_protocol_column(c) and c != PROTOCOL]:
        scope = column_scope(col)
        if scope == MT_SCOPE:
            found = [v for v in df[col] if isinstance(v, str)]
            if scope in tags:
                lines.append("MT-Bench protocols (scores of different protocols are never ranked together; each has "
                             "its own columns): " + "; ".join(f"[{t}] {label}" for label, t in tags[scope].items())
                             + ".")
            elif found:
                lines.append(f"MT-Bench protocol: {found[0]}.")
            continue
        task = scope[len(LM_PREFIX):]
        if scope in tags:
            split += [f"[{t}] {task}: {label}" for label, t in tags[scope].items()]
        elif any(isinstance(v, str) for v in df[col]):
            single.append(f"{task}: {next(v for v in df[col] if isinstance(v, str))}")
    if split:
        lines.append("lm-eval protocols (scores of different protocols are never ranked together; each has its own "
                     "columns): " + "; ".join(split) + ".")
    if single:
        lines.append(f"lm-eval protocol{'s' if len(single) > 1 else ''}: " + "; ".join(single) + ".")
    return lines


def legend(df: pd.DataFrame, bracketed: bool = False, intervals: bool | None = None, spread: bool = True) -> list[str]:
    """What the marks of a table with paired intervals or seeds mean (none for a plain one),
    then its protocol notes (``protocol_note``).
    ``bracketed``: the interval is shown as [lo, hi] after the Δ (the terminal's); ``intervals``:
    whether any is shown (default: whether any row has one); ``spread``: whether the sd between
    seeds is."""
    lines = []
    sig = [c for c in df.columns if c.endswith(SIG) and c[: -len(SIG)] + LO in df.columns]
    if sig and intervals is None:
        intervals = any(df[c[: -len(SIG)] + LO].notna().any() for c in sig)
    if sig and intervals:
        where = "[lo, hi]" if bracketed else "lo / hi"
        lines.append(f"Δ: gain over the same experiment's iteration 0; {where}: its paired 95% interval on the "
                     "items both evaluated; * the interval excludes 0.")
    elif sig and SEEDS not in df.columns:
        lines.append("Δ: gain over the same experiment's iteration 0; * its paired 95% interval on the items "
                     "both evaluated excludes 0.")
    if SEEDS in df.columns:
        lines.append("Rows over several seeds (seeds > 1): mean over seeds "
                     + ("± standard deviation between seeds" if spread else
                        "(standard deviation between seeds: --format markdown, csv or html)")
                     + ("; * after a mean gain: every seed's paired 95% interval excludes 0, on the same side" if sig
                        else "") + " (one row per seed: harness table --per-seed).")
    return lines + protocol_note(df)


def to_markdown(df: pd.DataFrame) -> str:
    """A pipe table of every column (pandas' to_markdown, i.e. tabulate), the legend under it.

    disable_numparse: cells are already formatted; tabulate must not re-parse
    "0.500" or a numeric-looking commit hash as numbers and reformat them.
    """
    if df.empty:
        return "(no results match)"
    text_cols = set(TEXT_COLS + PROV_COLS + [SWEEP])
    cells = formatted(displayed(df))
    align = ["left" if c in text_cols or is_protocol_column(c) else "right" for c in cells.columns]
    table = cells.to_markdown(index=False, disable_numparse=True, colalign=align)
    notes = legend(df)
    return table + "".join("\n\n" + n for n in notes)


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
    (NaN) or the literal "unavailable"; a "Δ ... sig" column is boolean.
    """
    text_cols = [c for c in [*TEXT_COLS, SWEEP, PROTOCOL, *PROV_COLS] if c != "seed"]
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    for c in df.columns:
        if c in text_cols or is_protocol_column(c):
            df[c] = df[c].where(df[c] != "")
        elif c.endswith(SIG):
            df[c] = pd.array([None if not v else v == "True" for v in df[c]], dtype="boolean")
        elif c in ("iteration", "seed") or (any(df[c]) and all(v.lstrip("-").isdigit() for v in df[c] if v)):
            # to_csv writes integer columns without a decimal point, floats always with one
            df[c] = pd.array([int(v) if v else None for v in df[c]], dtype="int64" if c == "iteration" else "Int64")
        else:
            df[c] = pd.Series([v if v == UNAVAILABLE else float(v) if v else math.nan for v in df[c]],
                              index=df.index).infer_objects()
    return df
