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
- gains with paired intervals: where a row carries ``paired`` (its gain over iteration 0
  on the items both evaluated, harness.evaluate.outcomes), "Δ <metric> lo" / "Δ <metric> hi" hold
  the 95% interval and "Δ <metric> sig" whether it excludes 0 (the renderers mark such a
  gain with a trailing "*"); an lm-eval paired key's ",<filter>" suffix is matched to the
  metric without it when that is unambiguous;
- seeds: rows of several seeds of one (experiment, method, iteration) (``harness run
  --seeds``) are one table row (``per_seed=False``, the default): each metric and Δ is the
  mean over the seeds (harness.evaluate.outcomes.across_seeds), "<metric> sd" / "Δ <metric> sd" the
  standard deviation between seeds (shown as "mean ± sd"; the row's "<metric> ±" is
  blank), "seeds" the number of seeds; each seed's Δ is against that seed's own iteration 0.
  Such a row's mean gain is marked significant ("Δ <metric> sig") only when every seed's
  paired interval excludes 0 in the same direction; its lo / hi are blank (the seeds'
  intervals are in the per-seed rows). ``per_seed=True`` keeps one row per seed (the
  "seed" column tells them apart): ``harness table --per-seed``, and the
  ``<stem>.per-seed.csv`` a saved board writes beside its CSV. Rows of one seed (or none)
  show exactly as without this: no "seeds" or "sd" columns.
- sweeps: a row of a sweep point (``harness run --sweep``, the row's ``sweep``) is told apart by
  its "sweep" column, e.g. "learning_rate=1e-05" (keys by their last part, harness.fmt.short_keys;
  values as harness.fmt.setting writes them; blank outside a sweep): one row per (experiment,
  sweep point, method, iteration), the seeds of a point averaged as above, each Δ against the
  same point's (and seed's) iteration 0. Rows sort by the point's values (numbers as numbers).
  Tables without sweep rows have no "sweep" column.
- protocols (harness.report.protocol), per scope: AlpacaEval ("alpaca_eval/*"), MT-Bench
  ("mt_bench/*") and each lm-eval task ("lm_eval/<task>/*"). A protocol column per scope (before
  the provenance columns) holds each row's protocol label there: "protocol" for AlpacaEval (in
  tables with AlpacaEval metrics; "unknown protocol" for a row written before rows recorded one),
  "protocol mt_bench" in tables with MT-Bench metrics, "protocol lm_eval/<task>" for a task that some row recorded a protocol for (a row of
  that task without one: "unknown protocol"). When the rows shown (after the filters) have
  more than one protocol in a scope, that scope's columns are split per protocol, not the
  rows grouped: each of its metric columns, its Δ and their companions become one column
  per protocol, tagged "[P1]", "[P2]", ... (numbered over the table: AlpacaEval's first,
  then MT-Bench's, then the tasks' in alphabetical order, each scope's labels in alphabetical order),
  holding only that protocol's rows ("alpaca_eval/win_rate [P1]", "alpaca_eval/win_rate
  [P1] ±", "Δ alpaca_eval/win_rate [P1]", "lm_eval/gsm8k/exact_match [P3]"), so no column
  ranks numbers of two protocols together while the other scopes' columns stay one column.
  Sorting by a split column ranks its protocol's rows (the others are blank there, so
  last); sorting by the unsplit name ("win_rate") puts the rows of one protocol after
  another, in tag order, each ranked only among themselves, and rows without that scope
  last; ``columns`` naming an unsplit metric shows all its protocols' columns. A scope with
  one protocol is not split.
Not here: reading the rows (harness.report.rows) or rendering (files, terminal, html).
"""

from __future__ import annotations

import difflib
import math
import re
from fnmatch import fnmatchcase
from numbers import Real
from typing import Any, Sequence

import pandas as pd

from harness.fmt import setting, short_keys
from harness.metrics import WIN_RATE, WIN_SE, ordered, qualified, stderr_of
from harness.report.columns import (COMPANIONS, DELTA, HI, ID_COLS, KEY_VERSIONS, LO, PROV_COLS, SD, SE, SEEDS, SIG,
                                    SWEEP, TEXT_COLS, UNAVAILABLE, column_scope, is_protocol_column, protocol_column,
                                    protocol_tags, tagged)
from harness.report.protocol import row_labels, scopes
from harness.report.seeds import over_seeds
from harness.report.rows import PUBLISHED, ResultsError, point_key


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


def point_label(row: dict) -> str | None:
    """A row's sweep point as its "sweep" cell: "learning_rate=1e-05, beta=0.1"; None outside a sweep."""
    point = row.get("sweep") or {}
    return ", ".join(f"{name}={setting(v)}" for name, v in zip(short_keys(list(point)), point.values())) or None


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _point_order(labels: pd.Series) -> pd.Series:
    """Sort keys of "sweep" cells: their ranks by the labels' text, numbers in them compared as
    numbers (1e-05 before 5e-05 before 0.0001); no point first."""
    def natural(label: Any) -> tuple:
        if not isinstance(label, str):
            return ()
        parts, at = [], 0
        for m in _NUMBER.finditer(label):
            parts += [(1, label[at:m.start()]), (0, float(m.group()))]
            at = m.end()
        return tuple(parts + [(1, label[at:])])

    ranks = {v: i for i, v in enumerate(sorted(set(labels), key=natural))}
    return labels.map(ranks)


def _value(metrics: dict, key: str) -> Any:
    if key not in metrics:
        return math.nan
    return UNAVAILABLE if metrics[key] is None else metrics[key]


def _number(v: Any) -> float:
    return float(v) if isinstance(v, Real) else math.nan


def paired_of(row: dict, key: str) -> dict | None:
    """The row's paired gain over iteration 0 for metric ``key`` (None when it has none).

    lm-eval's per-item keys carry the filter ("lm_eval/t/acc,none") that the aggregate key
    may lack ("lm_eval/t/acc"): one such entry is taken, several (two filters) are not."""
    p = row.get("paired") or {}
    if key in p:
        return p[key]
    base, tag = qualified(key)  # a key split by protocol (" [P3]") matches a paired key of the same tag
    hits = [v for k, v in p.items() if "," in k and qualified(k)[1] == tag and qualified(k)[0].split(",", 1)[0] == base]
    return hits[0] if len(hits) == 1 else None


def _records(rows: Sequence[dict], metric_keys: list[str], se_for: dict, delta_keys: list[str],
             ci_keys: set[str], protocols: Sequence[dict]) -> list[dict]:
    """One record per row (per seed): values, ± values, deltas against the same seed's iteration 0,
    paired intervals, provenance."""
    # (experiment, method, seed, point) -> metrics at iteration 0; an experiment without one gets NaN deltas
    base = {(r["experiment"], r["method"], r.get("seed"), point_key(r)): r["metrics"] for r in rows
            if r["iteration"] == 0 and r["method"] != PUBLISHED}
    records = []
    for r, protocol in zip(rows, protocols):
        m = r["metrics"]
        rec: dict[str, Any] = {"experiment": r["experiment"], "method": r["method"], "model": _model(r),
                               SWEEP: point_label(r), "iteration": r["iteration"], **protocol}
        for k in metric_keys:
            rec[k] = _value(m, k)
            if k in se_for:
                rec[k + SE] = _number(m.get(se_for[k]))
        ref = base.get((r["experiment"], r["method"], r.get("seed"), point_key(r)))
        for k in delta_keys:
            rec[DELTA + k] = _number(m.get(k)) - _number(ref.get(k)) if ref is not None else math.nan
            if k in ci_keys:
                p = paired_of(r, k) if r["iteration"] != 0 else None
                rec[DELTA + k + LO] = _number(p.get("ci_low")) if p else math.nan
                rec[DELTA + k + HI] = _number(p.get("ci_high")) if p else math.nan
                rec[DELTA + k + SIG] = bool(p.get("significant")) if p else pd.NA
        rec.update(_provenance(r["provenance"]))
        if r.get("seed") is not None:
            rec["seed"] = r["seed"]
        records.append(rec)
    return records


def _full_table(rows: Sequence[dict], per_seed: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Every metric of every row (+ ±, Δ, interval and seed columns); also the default column choice."""
    keys = sorted({k for r in rows for k in r["metrics"]})
    se_of = {k: stderr_of(k) for k in keys}
    metric_keys = [k for k in keys if se_of[k] is None]
    if WIN_SE in keys and WIN_RATE not in metric_keys:
        metric_keys.append(WIN_RATE)  # an error bar without its value still gets a column
    se_for = {m: s for s, m in se_of.items() if m is not None and s in keys}
    delta_keys = ordered(metric_keys, "delta")
    ci_keys = {k for k in delta_keys if any(r["iteration"] != 0 and paired_of(r, k) for r in rows)}

    by_column = {protocol_column(s): row_labels(rows, s) for s in scopes(rows)}
    about = list(by_column)
    protocols = [{c: labels[i] for c, labels in by_column.items()} for i in range(len(rows))]
    records = _records(rows, metric_keys, se_for, delta_keys, ci_keys, protocols)
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault((rec["experiment"], rec["method"], rec[SWEEP], rec["iteration"]), []).append(rec)
    seeded = not per_seed and any(len(g) > 1 for g in groups.values())
    if seeded:
        records = [over_seeds(g, metric_keys, se_for, delta_keys, ci_keys, about) if len(g) > 1
                   else {**g[0], SEEDS: 1}
                   for g in groups.values()]

    metric_cols = []
    for k in metric_keys:
        metric_cols += [k] + ([k + SE] if k in se_for else []) + ([k + SD] if seeded else [])
    delta_cols = []
    for k in delta_keys:
        delta_cols += [DELTA + k] + ([DELTA + k + SD] if seeded else []) \
            + ([DELTA + k + LO, DELTA + k + HI, DELTA + k + SIG] if k in ci_keys else [])
    swept = any(rec[SWEEP] is not None for rec in records)
    ids = ID_COLS[:3] + ([SWEEP] if swept else []) + ID_COLS[3:] + ([SEEDS] if seeded else [])
    df = pd.DataFrame.from_records(records, columns=ids + metric_cols + delta_cols + about + PROV_COLS)
    df["seed"] = df["seed"].astype("Int64")
    if seeded:
        df[SEEDS] = df[SEEDS].astype("Int64")
    for k in ci_keys:
        df[DELTA + k + SIG] = df[DELTA + k + SIG].astype("boolean")
    for k in metric_keys:  # counts stay integers (nullable), so they render and round-trip as such
        present = [v for v in (rec[k] for rec in records) if isinstance(v, Real) and not
                   (isinstance(v, float) and math.isnan(v))]
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
                filters: dict | None = None, columns: list[str] | None = None, per_seed: bool = False) -> pd.DataFrame:
    """The leaderboard as a data frame: identity columns, metrics, deltas, provenance.

    ``filters`` maps a column (experiment, method, iteration, seed, ...) to a glob
    or a list of globs matched against the value's text. Deltas are computed
    before filtering, so filtering out iteration 0 keeps them; a "seed" filter picks
    the seeds before they are averaged. ``sort_by`` is a
    column (or its last '/' component, e.g. "win_rate"); missing and
    "unavailable" values sort last. ``columns`` replaces the default metric
    columns (any metric key, "Δ ..." column); ±, sd and interval columns follow their
    metric and the identity and provenance columns are always kept. ``per_seed``: one
    row per seed instead of one per (experiment, method, iteration).
    """
    filters = dict(filters or {})
    if "seed" in filters:
        pattern = filters.pop("seed")
        rows = [r for r in rows if _matches("" if r.get("seed") is None else r["seed"], pattern)
                or (r.get("seed") is None and _matches(_text(r["provenance"].get("seed")), pattern))]
    df, default = _full_table(rows, per_seed=per_seed)
    # Default order: experiments alphabetically (each one's sweep points by their values), published systems
    # after runs.
    order = ["method", "experiment"] + ([SWEEP] if SWEEP in df.columns else []) + ["iteration"] \
        + (["seed"] if per_seed else [])
    df = df.sort_values(order, kind="stable", na_position="first",
                        key=lambda s: s.eq(PUBLISHED) if s.name == "method" else _point_order(s) if s.name == SWEEP
                        else s).reset_index(drop=True)
    for col, pattern in filters.items():
        col = _resolve(col, list(df.columns), "filter")
        df = df[[_matches(v, pattern) for v in df[col]]]
    whole = list(df.columns)  # before the columns are split by protocol
    tags = protocol_tags(df)
    if tags:
        df = _split(df, tags)
    unsplit = [c for c in whole if c not in df.columns]  # names that still resolve, to all their protocols
    if sort_by is not None:
        col = _resolve(sort_by, list(df.columns) + unsplit, "sort_by")
        text = col in TEXT_COLS or col in PROV_COLS or col == SWEEP or is_protocol_column(col)
        if col in df.columns:  # a split column: the other protocols' rows are blank there, so last
            df = df.sort_values(col, ascending=not descending, na_position="last", kind="stable",
                                key=None if text else (lambda s: pd.to_numeric(s, errors="coerce")))
        else:
            df = _sort_within_protocols(df, col, tags, descending)
    ids = [c for c in ID_COLS[:3] + [SWEEP] + ID_COLS[3:] + [SEEDS] if c in df.columns]
    choosable = [c for c in df.columns if not any(c.endswith(x) and c[: -len(x)] in df.columns for x in COMPANIONS)]
    picked = [_resolve(c, choosable + unsplit, "columns") for c in columns] if columns else default
    if tags:
        picked = _grouped(picked, tags)
    shown = []
    for c in picked:
        shown += [c] + [c + x for x in COMPANIONS if c + x in df.columns]
    about = [c for c in df.columns if is_protocol_column(c)]
    shown = [c for c in shown if c not in ids + about + PROV_COLS]
    return df[ids + shown + about + PROV_COLS].reset_index(drop=True)


def _grouped(cols: list[str], tags: dict[str, dict[str, str]]) -> list[str]:
    """``cols`` with each run of consecutive columns of one split scope repeated per
    protocol, the first protocol's columns first."""
    out: list[str] = []
    run: list[str] = []
    for c in cols + [None]:
        scope = None if c is None or is_protocol_column(c) else column_scope(c)
        if run and scope != column_scope(run[0]):
            out += [tagged(r, t) for t in tags[column_scope(run[0])].values() for r in run]
            run = []
        if scope in tags:
            run.append(c)
        elif c is not None:
            out.append(c)
    return out


def _split(df: pd.DataFrame, tags: dict[str, dict[str, str]]) -> pd.DataFrame:
    """Each column of a split scope as one column per protocol, holding only that protocol's rows."""
    parts = {}
    for c in df.columns:
        scope = None if is_protocol_column(c) else column_scope(c)
        if scope not in tags:
            parts[c] = df[c]
            continue
        for label, tag in tags[scope].items():
            parts[tagged(c, tag)] = df[c].where(df[protocol_column(scope)] == label)
    return pd.DataFrame(parts, index=df.index)[_grouped(list(df.columns), tags)]


def _sort_within_protocols(df: pd.DataFrame, col: str, tags: dict[str, dict[str, str]],
                           descending: bool) -> pd.DataFrame:
    """Sorted by the split metric ``col``: the rows of one protocol after another (in tag
    order), ranked only among themselves; rows without a protocol of its scope last."""
    scope = column_scope(col)
    mine = tags[scope]
    group = pd.Series([list(mine).index(v) if v in mine else math.nan for v in df[protocol_column(scope)]],
                      index=df.index)
    value = pd.Series(math.nan, index=df.index)
    for tag in mine.values():
        value = value.fillna(pd.to_numeric(df[tagged(col, tag)], errors="coerce").astype(float))
    order = pd.DataFrame({"g": group, "v": value}).sort_values(["g", "v"], ascending=[True, not descending],
                                                               na_position="last", kind="stable").index
    return df.loc[order]


def _text(v: Any) -> str:
    return "" if v is None else str(v)


def selected(rows: Sequence[dict], df: pd.DataFrame) -> list[dict]:
    """The rows a table (after its filters) still shows, in their order."""
    points = [v if isinstance(v, str) else None for v in df[SWEEP]] if SWEEP in df.columns else [None] * len(df)
    kept = set(zip(df["experiment"], df["method"], points, df["iteration"]))
    return [r for r in rows if (r["experiment"], r["method"], point_label(r), r["iteration"]) in kept]
