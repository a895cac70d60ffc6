"""Result rows -> leaderboard tables (markdown, CSV, HTML).

Everything here is derived from the per-run ``results.jsonl`` files and never
edited by hand. A row there is::

    {"experiment": str, "method": str, "iteration": int (0 = starting model),
     "metrics": {flat metric name: number or null}, "provenance": {...}}

Table conventions (the data frame holds values; renderers format them):
- one row per (experiment, method, iteration); imported published systems have
  method "published", iteration 0 and no deltas;
- a metric whose key is present with a null value is the string "unavailable"
  (e.g. the length-controlled win rate offline); an absent key is NaN (blank);
- a standard error lives in its own column "<metric> ±" (numeric in CSV) and is
  merged into the metric's cell as "v ± se" by the markdown/HTML renderers.
  lm-eval stderr keys are recognised by "_stderr" in the last name component
  (``lm_eval/<task>/acc_stderr,none`` is the stderr of ``lm_eval/<task>/acc,none``);
- "Δ <metric>" = value - value at iteration 0 of the same experiment, for the
  lm-eval metrics and the AlpacaEval win rate.
"""

from __future__ import annotations

import base64
import difflib
import html
import json
import math
from fnmatch import fnmatchcase
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

RESULTS_FILE = "results.jsonl"
UNAVAILABLE = "unavailable"
PUBLISHED = "published"
SE = " ±"  # suffix of a standard-error column
DELTA = "Δ "  # prefix of a delta-vs-iteration-0 column
ID_COLS = ["experiment", "method", "iteration"]
KEY_VERSIONS = ("torch", "transformers", "trl")  # packages shown as provenance columns
PROV_COLS = ["config_hash", "seed", "commit", *KEY_VERSIONS]
WIN_RATE, WIN_SE = "alpaca_eval/win_rate", "alpaca_eval/standard_error"
LC_WIN_RATE = "alpaca_eval/length_controlled_winrate"
# shown after the metric families by default: what the iteration trained on and what it cost
DEFAULT_EXTRA = ["pairs/n_pairs", "judge/coverage", "judge/oracle_pair_agreement", "train/reward_margin",
                 "gen/tokens", "wall_time_s"]


class ResultsError(ValueError):
    """A results path or row that cannot be used; the message names the file (and line)."""


# ---------------------------------------------------------------- loading

def _result_files(path: Path) -> list[Path]:
    if not path.exists():
        raise ResultsError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    if (path / RESULTS_FILE).is_file():
        return [path / RESULTS_FILE]
    found = sorted(path.rglob(RESULTS_FILE))
    if not found:
        raise ResultsError(f"{path}: no {RESULTS_FILE} in this directory or below it")
    return found


def _check_row(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise ResultsError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key, typ in (("experiment", str), ("method", str), ("iteration", int), ("metrics", dict)):
        value = row.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ResultsError(f"{where}: field {key!r} must be {typ.__name__}, got {value!r}")
    for key, value in row["metrics"].items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
            raise ResultsError(f"{where}: metrics[{key!r}] must be a number or null, got {value!r}")
    prov = row.get("provenance") or {}
    if not isinstance(prov, dict):
        raise ResultsError(f"{where}: field 'provenance' must be an object")
    return {**row, "provenance": prov, "source": where.rsplit(":", 1)[0]}


def load_rows(paths: Sequence[Path]) -> list[dict]:
    """Rows of every results.jsonl under ``paths`` (run dirs, parent dirs or the files).

    A missing path, a directory without results, a malformed line or a bad field
    raises ResultsError naming the file and line. Within one file a later row for
    the same (experiment, method, iteration) replaces an earlier one (a
    re-evaluation); the same key in two different files is an error, since
    picking one would silently hide the other.
    """
    files: dict[Path, None] = {}
    for p in paths:
        for f in _result_files(Path(p)):
            files.setdefault(f.resolve(), None)
    rows: dict[tuple, dict] = {}
    for f in files:
        with open(f) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{f}:{lineno}"
                try:
                    row = _check_row(json.loads(line), where)
                except json.JSONDecodeError as e:
                    raise ResultsError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                key = (row["experiment"], row["method"], row["iteration"])
                if key in rows and rows[key]["source"] != row["source"]:
                    raise ResultsError(f"{where}: {key} is also in {rows[key]['source']}; "
                                       "pass only one of the two run directories")
                rows[key] = row
    return list(rows.values())


# ---------------------------------------------------------------- table

def _stderr_of(name: str) -> str | None:
    """The metric an lm-eval stderr key belongs to, or None for a non-stderr key."""
    head, _, last = name.rpartition("/")
    return f"{head}/{last.replace('_stderr', '', 1)}" if name.startswith("lm_eval/") and "_stderr" in last else None


def _provenance(prov: dict) -> dict:
    commit = prov.get("git_commit")
    if commit:
        commit = str(commit)[:7] + ("-dirty" if prov.get("git_dirty") else "")
    versions = prov.get("versions") or {}
    out = {"config_hash": prov.get("config_hash"), "seed": prov.get("seed"), "commit": commit or None}
    for pkg in KEY_VERSIONS:
        out[pkg] = versions.get(pkg, versions.get(pkg.replace("_", "-")))
    return out


def _value(metrics: dict, key: str) -> Any:
    if key not in metrics:
        return math.nan
    return UNAVAILABLE if metrics[key] is None else metrics[key]


def _number(v: Any) -> float:
    return float(v) if isinstance(v, Real) else math.nan


def _full_table(rows: Sequence[dict]) -> tuple[pd.DataFrame, list[str]]:
    """Every metric of every row (+ ± and Δ columns); also the default column choice."""
    keys = sorted({k for r in rows for k in r["metrics"]})
    se_of = {k: _stderr_of(k) for k in keys}
    se_of[WIN_SE] = WIN_RATE
    metric_keys = [k for k in keys if k not in se_of or se_of[k] is None]
    if WIN_SE in keys and WIN_RATE not in metric_keys:
        metric_keys.append(WIN_RATE)  # an error bar without its value still gets a column
    se_for = {m: s for s, m in se_of.items() if m is not None and s in keys}
    lm_keys = [k for k in metric_keys if k.startswith("lm_eval/")]
    delta_keys = lm_keys + [WIN_RATE] * (WIN_RATE in metric_keys)

    # (experiment, method) -> metrics at iteration 0; an experiment without one gets NaN deltas
    base = {(r["experiment"], r["method"]): r["metrics"] for r in rows if r["iteration"] == 0 and r["method"] != PUBLISHED}
    records = []
    for r in rows:
        m = r["metrics"]
        rec: dict[str, Any] = {c: r[c] for c in ID_COLS}
        for k in metric_keys:
            rec[k] = _value(m, k)
            if k in se_for:
                rec[k + SE] = _number(m.get(se_for[k]))
        ref = base.get((r["experiment"], r["method"]))
        for k in delta_keys:
            rec[DELTA + k] = _number(m.get(k)) - _number(ref.get(k)) if ref is not None else math.nan
        rec.update(_provenance(r["provenance"]))
        records.append(rec)

    metric_cols = []
    for k in metric_keys:
        metric_cols += [k, k + SE] if k in se_for else [k]
    df = pd.DataFrame.from_records(records, columns=ID_COLS + metric_cols + [DELTA + k for k in delta_keys] + PROV_COLS)
    df["seed"] = df["seed"].astype("Int64")
    for k in metric_keys:  # counts stay integers (nullable), so they render and round-trip as such
        present = [r["metrics"][k] for r in rows if r["metrics"].get(k) is not None]
        if present and all(isinstance(v, int) for v in present) and UNAVAILABLE not in set(df[k]):
            df[k] = df[k].astype("Int64")
    default = (lm_keys + [k for k in (WIN_RATE, LC_WIN_RATE) if k in metric_keys]
               + [k for k in metric_keys if k.startswith("indicators/")] + [k for k in DEFAULT_EXTRA if k in metric_keys]
               + [DELTA + k for k in delta_keys])
    return df, default


def _resolve(name: str, available: Sequence[str], what: str) -> str:
    """A column by exact name or by its unique last '/' component (not a Δ column unless asked)."""
    if name in available:
        return name
    hits = [c for c in available if c.rsplit("/", 1)[-1] == name and c.startswith(DELTA) == name.startswith(DELTA)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ResultsError(f"{what} {name!r} is ambiguous: {', '.join(hits)}")
    close = difflib.get_close_matches(name, available, n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ResultsError(f"{what}: no column {name!r}{hint} Known columns: {', '.join(available)}")


def _matches(value: Any, pattern: Any) -> bool:
    if isinstance(pattern, (list, tuple, set)):
        return any(_matches(value, p) for p in pattern)
    return fnmatchcase(str(value), str(pattern))


def build_table(rows: Sequence[dict], *, sort_by: str | None = None, descending: bool = True,
                filters: dict | None = None, columns: list[str] | None = None) -> pd.DataFrame:
    """The leaderboard as a data frame: identity columns, metrics, deltas, provenance.

    ``filters`` maps a column (experiment, method, iteration, seed, ...) to a glob
    or a list of globs matched against the value's text. Deltas are computed
    before filtering, so filtering out iteration 0 keeps them. ``sort_by`` is a
    column (or its last '/' component, e.g. "win_rate"); missing and
    "unavailable" values sort last. ``columns`` replaces the default metric
    columns (any metric key, "Δ ..." column); ± columns follow their metric and
    the identity and provenance columns are always kept.
    """
    df, default = _full_table(rows)
    # Default order: experiments alphabetically, published systems after runs.
    df = df.sort_values(["method", "experiment", "iteration"], key=lambda s: s.eq(PUBLISHED) if s.name == "method" else s,
                        kind="stable").reset_index(drop=True)
    for col, pattern in (filters or {}).items():
        col = _resolve(col, list(df.columns), "filter")
        df = df[[_matches(v, pattern) for v in df[col]]]
    if sort_by is not None:
        col = _resolve(sort_by, list(df.columns), "sort_by")
        text = col in ID_COLS[:2] or col in PROV_COLS
        df = df.sort_values(col, ascending=not descending, na_position="last", kind="stable",
                            key=None if text else (lambda s: pd.to_numeric(s, errors="coerce")))
    picked = [_resolve(c, [c for c in df.columns if not c.endswith(SE)], "columns") for c in columns] if columns else default
    shown = []
    for c in picked:
        shown += [c, c + SE] if c + SE in df.columns else [c]
    shown = [c for c in shown if c not in ID_COLS + PROV_COLS]
    return df[ID_COLS + shown + PROV_COLS].reset_index(drop=True)


# ---------------------------------------------------------------- rendering

def _fmt(v: Any, signed: bool = False) -> str:
    """A cell's text: integers as is, floats to ~3-4 significant digits, blanks for missing."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, str) or isinstance(v, bool) or not isinstance(v, Real):
        return str(v)
    if isinstance(v, Integral):
        return f"{int(v):+d}" if signed else str(int(v))
    a = abs(v)
    decimals = 0 if a >= 1000 else 1 if a >= 100 else 2 if a >= 1 else 3
    return f"{v:+.{decimals}f}" if signed else f"{v:.{decimals}f}"


def formatted(df: pd.DataFrame) -> pd.DataFrame:
    """The table as display strings: "v ± se" cells, signed deltas, blanks for missing."""
    out = {}
    for c in df.columns:
        if c.endswith(SE) and c[: -len(SE)] in df.columns:
            continue
        cells = [_fmt(v, signed=c.startswith(DELTA)) for v in df[c]]
        if c + SE in df.columns:
            cells = [f"{t} ± {_fmt(se)}" if t and _fmt(se) else t for t, se in zip(cells, df[c + SE])]
        out[c] = cells
    return pd.DataFrame(out, columns=list(out), dtype=object)


def to_markdown(df: pd.DataFrame) -> str:
    """A pipe table for the terminal (pandas' to_markdown, i.e. tabulate).

    disable_numparse: cells are already formatted; tabulate must not re-parse
    "0.500" or a numeric-looking commit hash as numbers and reformat them.
    """
    if df.empty:
        return "(no results match)"
    text_cols = set(ID_COLS[:2] + PROV_COLS)
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
    text_cols = [c for c in ["experiment", "method", *PROV_COLS] if c != "seed"]
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


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;white-space:nowrap}
th{background:#f0f0f0;position:sticky;top:0}td{text-align:right}td:nth-child(-n+2){text-align:left}
tr:nth-child(even){background:#fafafa}img{max-width:100%;margin:1em 0;display:block}"""


def to_html(df: pd.DataFrame, path: Path | None = None, *, images: Sequence[Path] = (),
            title: str = "Leaderboard") -> str:
    """One self-contained HTML file: inline CSS, PNG plots inlined as base64, no external URL."""
    table = formatted(df).to_html(index=False, escape=True, border=0, na_rep="")
    imgs = "".join(f'<img alt="{html.escape(Path(p).stem)}" src="data:image/png;base64,'
                   f'{base64.b64encode(Path(p).read_bytes()).decode()}">\n' for p in images)
    text = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{table}\n{imgs}</body></html>\n")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    return text


def render_leaderboard(paths: Sequence[Path], *, fmt: str = "markdown", out: Path | None = None,
                       sort_by: str | None = None, filters: dict | None = None,
                       columns: list[str] | None = None, plot_dir: Path | None = None) -> str:
    """Load, tabulate and render in one call (for ``harness table``).

    Returns the text to print: the table itself for markdown (also written to
    ``out`` when given) and for csv/html without ``out``; a one-line note of what
    was written otherwise. With ``plot_dir`` the plots of the selected rows are
    written there, and an HTML table embeds them.
    """
    if fmt not in ("markdown", "csv", "html"):
        raise ResultsError(f"fmt must be markdown, csv or html, got {fmt!r}")
    rows = load_rows(paths)
    df = build_table(rows, sort_by=sort_by, filters=filters, columns=columns)
    pngs: list[Path] = []
    if plot_dir is not None:
        from harness.plots import write_plots  # late: matplotlib is slow to import

        kept = set(zip(df["experiment"], df["method"], df["iteration"]))
        pngs = write_plots([r for r in rows if (r["experiment"], r["method"], r["iteration"]) in kept], Path(plot_dir))
    if fmt == "markdown":
        text = to_markdown(df)
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(text + "\n", encoding="utf-8")
    else:
        text = to_csv(df, out) if fmt == "csv" else to_html(df, out, images=pngs)
    if out is not None and fmt != "markdown":
        text = f"wrote {out} ({len(df)} rows)"
    if pngs:
        text += "\n" + "\n".join(f"wrote {p}" for p in pngs)
    return text
