"""Result rows -> the leaderboard as a data frame (values; the renderers format them).

Conventions:
- one row per (experiment, method, iteration); imported published systems have
  method "published", iteration 0 and no deltas; their model is their name;
- a metric whose key is present with a null value is the string "unavailable"
  (e.g. the length-controlled win rate offline); an absent key is NaN (blank);
- a standard error lives in its own column "<metric> ±" (numeric in CSV) and is
  merged into the metric's cell as "v ± se" by the markdown/HTML renderers; which
  key is whose standard error, which metrics get a "Δ <metric>" column (value -
  value at iteration 0 of the same experiment) and which are shown by default is
  the metric catalogue's (harness.metrics).

Not here: reading the rows (harness.report.rows) or rendering (files, terminal, html).
"""

from __future__ import annotations

import difflib
import math
from fnmatch import fnmatchcase
from numbers import Real
from typing import Any, Sequence

import pandas as pd

from harness.metrics import WIN_RATE, WIN_SE, ordered, stderr_of
from harness.report.rows import PUBLISHED, ResultsError

UNAVAILABLE = "unavailable"
SE = " ±"  # suffix of a standard-error column
DELTA = "Δ "  # prefix of a delta-vs-iteration-0 column
ID_COLS = ["experiment", "method", "model", "iteration"]
TEXT_COLS = ["experiment", "method", "model"]
KEY_VERSIONS = ("torch", "transformers", "trl")  # packages shown as provenance columns
PROV_COLS = ["config_hash", "seed", "commit", *KEY_VERSIONS]


def _provenance(prov: dict) -> dict:
    commit = prov.get("git_commit")
    if commit and commit != "unknown":  # "unknown": the harness was not a git checkout
        commit = str(commit)[:7] + ("-dirty" if prov.get("git_dirty") else "")
    versions = prov.get("versions") or {}
    out = {"config_hash": prov.get("config_hash"), "seed": prov.get("seed"), "commit": commit or None}
    for pkg in KEY_VERSIONS:
        out[pkg] = versions.get(pkg, versions.get(pkg.replace("_", "-")))
    return out


def _model(row: dict) -> str | None:
    """The model a row evaluated: the row's ``model``, else its provenance's model name;
    a published system is its own model."""
    if row.get("model"):
        return row["model"]
    model = row["provenance"].get("model")
    if isinstance(model, dict) and model.get("name"):
        return str(model["name"])
    return row["experiment"] if row["method"] == PUBLISHED else None


def _value(metrics: dict, key: str) -> Any:
    if key not in metrics:
        return math.nan
    return UNAVAILABLE if metrics[key] is None else metrics[key]


def _number(v: Any) -> float:
    return float(v) if isinstance(v, Real) else math.nan


def _full_table(rows: Sequence[dict]) -> tuple[pd.DataFrame, list[str]]:
    """Every metric of every row (+ ± and Δ columns); also the default column choice."""
    keys = sorted({k for r in rows for k in r["metrics"]})
    se_of = {k: stderr_of(k) for k in keys}
    metric_keys = [k for k in keys if se_of[k] is None]
    if WIN_SE in keys and WIN_RATE not in metric_keys:
        metric_keys.append(WIN_RATE)  # an error bar without its value still gets a column
    se_for = {m: s for s, m in se_of.items() if m is not None and s in keys}
    delta_keys = ordered(metric_keys, "delta")

    # (experiment, method) -> metrics at iteration 0; an experiment without one gets NaN deltas
    base = {(r["experiment"], r["method"]): r["metrics"] for r in rows
            if r["iteration"] == 0 and r["method"] != PUBLISHED}
    records = []
    for r in rows:
        m = r["metrics"]
        rec: dict[str, Any] = {"experiment": r["experiment"], "method": r["method"], "model": _model(r),
                               "iteration": r["iteration"]}
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
    return df, ordered(metric_keys, "table") + [DELTA + k for k in delta_keys]


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
    df = df.sort_values(["method", "experiment", "iteration"], kind="stable",
                        key=lambda s: s.eq(PUBLISHED) if s.name == "method" else s).reset_index(drop=True)
    for col, pattern in (filters or {}).items():
        col = _resolve(col, list(df.columns), "filter")
        df = df[[_matches(v, pattern) for v in df[col]]]
    if sort_by is not None:
        col = _resolve(sort_by, list(df.columns), "sort_by")
        text = col in TEXT_COLS or col in PROV_COLS
        df = df.sort_values(col, ascending=not descending, na_position="last", kind="stable",
                            key=None if text else (lambda s: pd.to_numeric(s, errors="coerce")))
    choosable = [c for c in df.columns if not c.endswith(SE)]
    picked = [_resolve(c, choosable, "columns") for c in columns] if columns else default
    shown = []
    for c in picked:
        shown += [c, c + SE] if c + SE in df.columns else [c]
    shown = [c for c in shown if c not in ID_COLS + PROV_COLS]
    return df[ID_COLS + shown + PROV_COLS].reset_index(drop=True)


def selected(rows: Sequence[dict], df: pd.DataFrame) -> list[dict]:
    """The rows a table (after its filters) still shows, in their order."""
    kept = set(zip(df["experiment"], df["method"], df["iteration"]))
    return [r for r in rows if (r["experiment"], r["method"], r["iteration"]) in kept]
