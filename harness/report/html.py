"""The leaderboard as one self-contained HTML page that sorts and filters in the browser.

The page's style and script are package data beside this module (``leaderboard.css``,
``leaderboard.js``), inlined into the page: no external URL, PNG plots inlined as
base64. The script keeps its state in the URL hash, e.g.
``#sort=alpaca_eval/win_rate&order=desc&method=spin&model=tiny&experiment=tiny-spin``,
so a link (or a headless browser) opens the page sorted and filtered. Not here: the
cells' text (harness.report.files) or the plots themselves.
"""

from __future__ import annotations

import base64
import html
import math
from functools import lru_cache
from importlib.resources import files
from numbers import Real
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from harness.report.files import displayed, formatted, legend
from harness.report.rows import PUBLISHED
from harness.report.columns import PROV_COLS, SWEEP, TEXT_COLS, is_protocol_column, protocol_tags

GENERATOR = '<meta name="generator" content="harness table">'  # marks the page as ours: `--out` may replace it


@lru_cache(maxsize=None)
def asset(name: str) -> str:
    """``leaderboard.css`` or ``leaderboard.js``, as inlined into the page."""
    return files("harness.report").joinpath(name).read_text(encoding="utf-8").rstrip("\n")


def _text(v: Any) -> str:
    return "" if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else str(v)


def _num_attr(v: Any) -> str:
    if isinstance(v, Real) and not isinstance(v, bool) and v is not pd.NA and not math.isnan(float(v)):
        return f' data-v="{float(v)!r}"'
    return ""


def to_html(df: pd.DataFrame, path: Path | None = None, *, images: Sequence[Path | tuple[str, bytes]] = (),
            title: str = "Leaderboard") -> str:
    """One self-contained HTML page: click a column header to sort (again to reverse),
    select an experiment / method / model to filter; imported published AlpacaEval
    systems are marked. The protocols are named in the note above the table; where a scope
(AlpacaEval, an lm-eval task) has several, the page has its protocol column and each
protocol its own columns (harness.report.table), their headers' tooltips naming it. The sort and filters are also read from, and written to, the
    URL hash (``#sort=COLUMN&order=desc&method=spin``). Written to ``path`` when given."""
    cells = formatted(displayed(df))
    cols = list(cells.columns)
    numeric = {c: c not in TEXT_COLS + PROV_COLS + [SWEEP] and not is_protocol_column(c) for c in cols}
    esc = html.escape
    tags = {f"[{t}]": label for scope_tags in protocol_tags(df).values() for label, t in scope_tags.items()}

    def tip(c: str) -> str:  # a split column's protocol, in full
        return c + next((f": {label}" for t, label in tags.items() if t in c.split()), "")

    head = "".join(f'<th data-name="{esc(c)}" data-type="{"num" if numeric[c] else "text"}" title="{esc(tip(c))}">'
                   f"{esc(c)}</th>" for c in cols)
    body = []
    for i in range(len(df)):
        raw = df.iloc[i]
        published = raw["method"] == PUBLISHED
        attrs = "".join(f' data-{k}="{esc(_text(raw[k]))}"' for k in TEXT_COLS)
        if published:
            attrs += ' class="published"'
        tds = []
        for c in cols:
            text = esc(cells.iloc[i][c])
            if numeric[c]:
                tds.append(f"<td{_num_attr(raw[c])}>{text}</td>")
            else:
                badge = '<span class="badge" title="imported AlpacaEval system">AlpacaEval</span>' \
                    if published and c == "experiment" else ""
                tds.append(f'<td class="text" data-s="{text}">{text}{badge}</td>')
        body.append(f"<tr{attrs}>{''.join(tds)}</tr>")

    def options(k: str) -> str:
        values = sorted({str(v) for v in df[k] if isinstance(v, str) and v}) if k in df.columns else []
        return "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in values)

    controls = "".join(f'<label>{k} <select id="f-{k}"><option value="">all</option>{options(k)}</select></label>'
                       for k in TEXT_COLS)
    n_pub = int((df["method"] == PUBLISHED).sum()) if len(df) else 0
    note = (f"{len(df)} rows. Click a column header to sort (again to reverse); numbers sort highest first, "
            "missing values last. Δ columns: change against the same experiment's iteration 0.")
    for line in legend(df):
        note += " " + line
    if n_pub:
        note += (" Rows marked AlpacaEval are imported published AlpacaEval systems: judged by their own"
                 " annotator against AlpacaEval's references, not runs of this harness.")
    imgs = []
    for item in images:
        name, data = (item if isinstance(item, tuple) else (Path(item).stem, Path(item).read_bytes()))
        imgs.append(f'<img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">')
    text = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8">{GENERATOR}<title>{esc(title)}</title>'
            f"<style>{asset('leaderboard.css')}</style></head>\n<body><h1>{esc(title)}</h1>\n"
            f'<p class="note">{esc(note)}</p>\n'
            f'<div id="controls">{controls}<span id="count">{len(df)} of {len(df)} rows</span></div>\n'
            f'<div class="scroll"><table id="board"><thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(body) + "\n</tbody></table></div>\n" + "\n".join(imgs)
            + f"\n<script>{asset('leaderboard.js')}</script>\n</body></html>\n")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    return text
