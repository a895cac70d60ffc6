"""Result rows -> leaderboard tables (markdown, CSV, HTML).

Everything here is derived from the per-run ``results.jsonl`` files and never
edited by hand. A row there is::

    {"experiment": str, "method": str, "iteration": int (0 = starting model),
     "model": str (optional), "metrics": {flat metric name: number or null}, "provenance": {...}}

Table conventions (the data frame holds values; renderers format them):
- one row per (experiment, method, iteration); imported published systems have
  method "published", iteration 0 and no deltas; their model is their name;
- a metric whose key is present with a null value is the string "unavailable"
  (e.g. the length-controlled win rate offline); an absent key is NaN (blank);
- a standard error lives in its own column "<metric> ±" (numeric in CSV) and is
  merged into the metric's cell as "v ± se" by the markdown/HTML renderers.
  lm-eval stderr keys are recognised by "_stderr" in the last name component
  (``lm_eval/<task>/acc_stderr,none`` is the stderr of ``lm_eval/<task>/acc,none``);
- "Δ <metric>" = value - value at iteration 0 of the same experiment, for the
  lm-eval metrics and the AlpacaEval win rate;
- wherever a win rate is shown, so are its n_total and coverage.

Renderers: ``to_terminal`` (the main metric per evaluation and its delta, fitted
to a terminal's width), ``to_markdown`` / ``to_csv`` (every column), ``to_html``
(one self-contained page that sorts and filters in the browser).
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
from typing import Any, NamedTuple, Sequence

import pandas as pd

from harness.console import plural
from harness.metric_names import COVERAGE, LC_WIN_RATE, N_TOTAL, PUBLISHED, WIN_RATE, WIN_SE, stderr_of
from harness.plots import render_plots, save_plots, write_plots

RESULTS_FILE = "results.jsonl"
UNAVAILABLE = "unavailable"
SE = " ±"  # suffix of a standard-error column
DELTA = "Δ "  # prefix of a delta-vs-iteration-0 column
ID_COLS = ["experiment", "method", "model", "iteration"]
TEXT_COLS = ["experiment", "method", "model"]
KEY_VERSIONS = ("torch", "transformers", "trl")  # packages shown as provenance columns
PROV_COLS = ["config_hash", "seed", "commit", *KEY_VERSIONS]
# shown after the metric families by default: what the iteration trained on and what it cost
DEFAULT_EXTRA = ["pairs/n_pairs", "judge/coverage", "judge/oracle_pair_agreement", "train/reward_margin",
                 "gen/tokens", "wall_time_s", "cost/wall_s", "cost/gen_tokens", "cost/train_tokens", "cost/judge_calls",
                 "cost/peak_mem_mb", "cost/gpu_s"]


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
    if row.get("model") is not None and not isinstance(row["model"], str):
        raise ResultsError(f"{where}: field 'model' must be a string, got {row['model']!r}")
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
    default = (lm_keys + [k for k in (WIN_RATE, LC_WIN_RATE, N_TOTAL, COVERAGE) if k in metric_keys]
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
        text = col in TEXT_COLS or col in PROV_COLS
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


# ---------------------------------------------------------------- terminal table

TERMINAL_WIDTH = 120


def _main_columns(df: pd.DataFrame) -> list[str]:
    """The main metric of each evaluation (lm-eval tasks' primary metrics, the win rate
    with its n and coverage); every metric column when none of those is there."""
    cols = [c for c in df.columns if c.startswith("lm_eval/") and not c.endswith(SE)]
    if WIN_RATE in df.columns:
        cols += [WIN_RATE] + [c for c in (N_TOTAL, COVERAGE) if c in df.columns]
    if LC_WIN_RATE in df.columns and any(isinstance(v, Real) and not math.isnan(v) for v in df[LC_WIN_RATE]):
        cols.append(LC_WIN_RATE)
    if not cols:  # cost columns stay in the files: the terminal gets harness.results.cost_summary's line
        cols = [c for c in df.columns if c not in ID_COLS + PROV_COLS and not c.endswith(SE) and not c.startswith(DELTA)
                and not c.startswith("cost/")]
    return cols


def _header(col: str, short: bool) -> str:
    if col.startswith("lm_eval/"):
        parts = col.split("/")
        metric = parts[-1].split(",")[0]
        return parts[1] if short or len(parts) < 3 else f"{parts[1]} {metric}"
    named = {WIN_RATE: "win rate", LC_WIN_RATE: "LC win rate", N_TOTAL: "n", COVERAGE: "judged"}
    return named.get(col, col if not short else col.rsplit("/", 1)[-1])


def _cell(col: str, v: Any, se: Any = math.nan) -> str:
    if col == COVERAGE:
        return "" if not isinstance(v, Real) or math.isnan(v) else (
            f"{100 * v:.0f}%" if v in (0, 1) else f"{100 * v:.1f}%")
    text = _fmt(v)
    return f"{text} ± {_fmt(se)}" if text and _fmt(se) else text


def _pipe(header: list[str], rows: list[list[str]], right: list[bool]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else (":" + "-" * (w + 1)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in rows])


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
    main = _main_columns(df)
    runs = df[df["method"] != PUBLISHED] if "model" in df.columns else df.iloc[:0]
    show_model = runs["model"].nunique(dropna=True) > 1  # a published system's model is its name
    ids = ["experiment", "method"] + (["model"] if show_model else []) + ["iteration"]

    def render(cols: list[str], short: bool, with_se: bool, cut: int | None) -> str:
        header, right = [], []
        for c in ids:
            header.append("iter" if c == "iteration" else c)
            right.append(c == "iteration")
        for c in cols:
            header.append(_header(c, short))
            right.append(True)
            if DELTA + c in df.columns:
                header.append("Δ")
                right.append(True)
        rows = []
        for _, r in df.iterrows():
            cells = []
            for c in ids:
                t = _fmt(r[c])
                cells.append(t if cut is None or len(t) <= cut else t[: cut - 1] + "…")
            for c in cols:
                se = r[c + SE] if with_se and c + SE in df.columns else math.nan
                cells.append(_cell(c, r[c], se))
                if DELTA + c in df.columns:  # blank at iteration 0 itself
                    cells.append(_fmt(r[DELTA + c], signed=True) if r["iteration"] != 0 else "")
            rows.append(cells)
        return _pipe(header, rows, right)

    def wide(text: str) -> int:
        return max(len(line) for line in text.splitlines())

    styles = [(False, True, None), (True, True, None), (True, False, None), (True, False, 24), (True, False, 16)]

    # as many evaluations as fit in the most compact style, then the richest style that fits them;
    # dropped in this order: the LC win rate, lm-eval metrics from the right (the first stays), then
    # the win rate with its n and coverage (never one of them without the others)
    win = [c for c in main if c in (WIN_RATE, N_TOTAL, COVERAGE)]
    lm = [c for c in main if c not in win and c != LC_WIN_RATE]
    drops = [[c] for c in main if c == LC_WIN_RATE] + [[c] for c in reversed(lm[1:])] + ([win] if win and lm else [])
    cols = list(main)
    for group in [[]] + drops:
        cols = [c for c in cols if c not in group]
        if wide(render(cols, *styles[-1])) <= width or not cols:
            break
    for style in styles:
        text = render(cols, *style)
        if wide(text) <= width:
            break
    return text, [c for c in main if c not in cols]


# ---------------------------------------------------------------- HTML page

_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
.note{color:#555;max-width:60em;font-size:13px}
#controls{margin:.8em 0;display:flex;gap:1.2em;align-items:center;flex-wrap:wrap;font-size:13px}
#controls select{margin-left:.3em}#count{color:#555}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;white-space:nowrap}
th{background:#f0f0f0;position:sticky;top:0;cursor:pointer;user-select:none}th:hover{background:#e2e2e2}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td{text-align:right}td.text{text-align:left}
tbody tr:nth-child(even){background:#fafafa}
tr.published{background:#fff6df!important}
.badge{display:inline-block;margin-left:.4em;padding:0 .35em;border-radius:3px;font-size:11px;
background:#d9822b;color:#fff}
img{max-width:100%;margin:1em 0;display:block}"""

# Sorting and filtering in the page; the state lives in the URL hash, e.g.
# #sort=alpaca_eval/win_rate&order=desc&method=spin&model=tiny&experiment=tiny-spin,
# so a link (or a headless browser) opens the page sorted and filtered.
_JS = r"""(function () {
  var table = document.getElementById("board"), tbody = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var rows = Array.prototype.slice.call(tbody.rows);
  var keys = ["experiment", "method", "model"];
  var state = {sort: null, desc: true, f: {experiment: "", method: "", model: ""}};
  function colOf(name) {
    for (var i = 0; i < heads.length; i++) if (heads[i].dataset.name === name) return i;
    var delta = function (s) { return s.indexOf("\u0394 ") === 0; };  // a "Δ ..." column only when asked for
    var hits = heads.filter(function (h) {
      return h.dataset.name.split("/").pop() === name && delta(h.dataset.name) === delta(name);
    });
    return hits.length === 1 ? heads.indexOf(hits[0]) : null;
  }
  function sortKey(row, c, numeric) {
    var td = row.cells[c];
    if (numeric) { var v = td.getAttribute("data-v"); return v === null || v === "" ? null : Number(v); }
    var s = td.getAttribute("data-s");
    s = s === null ? td.textContent : s;
    return s === "" ? null : s;
  }
  function apply(writeHash) {
    var list = rows.slice();
    if (state.sort !== null) {
      var c = state.sort, numeric = heads[c].dataset.type === "num";
      list.sort(function (a, b) {
        var x = sortKey(a, c, numeric), y = sortKey(b, c, numeric);
        if (x === null || y === null) {
          if (x === null && y === null) return a.dataset.i - b.dataset.i;
          return x === null ? 1 : -1;  // missing values last, in either order
        }
        var d = numeric ? x - y : x.localeCompare(y);
        if (state.desc) d = -d;
        return d || a.dataset.i - b.dataset.i;
      });
    }
    list.forEach(function (r) { tbody.appendChild(r); });
    var shown = 0;
    rows.forEach(function (r) {
      var ok = keys.every(function (k) { return !state.f[k] || r.dataset[k] === state.f[k]; });
      r.hidden = !ok;
      if (ok) shown++;
    });
    heads.forEach(function (h, i) {
      if (i === state.sort) h.setAttribute("aria-sort", state.desc ? "descending" : "ascending");
      else h.removeAttribute("aria-sort");
    });
    keys.forEach(function (k) { var s = document.getElementById("f-" + k); if (s) s.value = state.f[k]; });
    document.getElementById("count").textContent = shown + " of " + rows.length + " rows";
    if (writeHash) {
      var parts = [];
      if (state.sort !== null) parts.push("sort=" + encodeURIComponent(heads[state.sort].dataset.name),
                                          "order=" + (state.desc ? "desc" : "asc"));
      keys.forEach(function (k) { if (state.f[k]) parts.push(k + "=" + encodeURIComponent(state.f[k])); });
      history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname + location.search);
    }
  }
  function fromHash() {
    var p = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      if (!kv) return;
      var i = kv.indexOf("="), k = i < 0 ? kv : kv.slice(0, i);
      p[decodeURIComponent(k)] = i < 0 ? "" : decodeURIComponent(kv.slice(i + 1).replace(/\+/g, " "));
    });
    state.sort = p.sort ? colOf(p.sort) : null;
    state.desc = state.sort === null ? true :
      (p.order ? p.order !== "asc" : heads[state.sort].dataset.type === "num");
    keys.forEach(function (k) { state.f[k] = p[k] || ""; });
    apply(false);
  }
  rows.forEach(function (r, i) { r.dataset.i = i; });
  heads.forEach(function (h, i) {
    h.addEventListener("click", function () {
      if (state.sort === i) state.desc = !state.desc;
      else { state.sort = i; state.desc = h.dataset.type === "num"; }  // numbers: highest first
      apply(true);
    });
  });
  keys.forEach(function (k) {
    var s = document.getElementById("f-" + k);
    if (s) s.addEventListener("change", function () { state.f[k] = s.value; apply(true); });
  });
  window.addEventListener("hashchange", fromHash);
  fromHash();
})();"""


def _text(v: Any) -> str:
    return "" if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else str(v)


def _num_attr(v: Any) -> str:
    if isinstance(v, Real) and not isinstance(v, bool) and v is not pd.NA and not math.isnan(float(v)):
        return f' data-v="{float(v)!r}"'
    return ""


def to_html(df: pd.DataFrame, path: Path | None = None, *, images: Sequence[Path | tuple[str, bytes]] = (),
            title: str = "Leaderboard") -> str:
    """One self-contained HTML page (inline CSS and JS, PNG plots inlined as base64,
    no external URL): click a column header to sort (again to reverse), select an
    experiment / method / model to filter; imported published AlpacaEval systems
    are marked. The sort and filters are also read from, and written to, the URL
    hash (``#sort=COLUMN&order=desc&method=spin``)."""
    cells = formatted(df)
    cols = list(cells.columns)
    numeric = {c: c not in TEXT_COLS + PROV_COLS for c in cols}
    esc = html.escape
    head = "".join(f'<th data-name="{esc(c)}" data-type="{"num" if numeric[c] else "text"}" title="{esc(c)}">'
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
    if n_pub:
        note += (" Rows marked AlpacaEval are imported published AlpacaEval systems: judged by their own"
                 " annotator against AlpacaEval's references, not runs of this harness.")
    imgs = []
    for item in images:
        name, data = (item if isinstance(item, tuple) else (Path(item).stem, Path(item).read_bytes()))
        imgs.append(f'<img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">')
    text = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body><h1>{esc(title)}</h1>\n<p class=\"note\">{esc(note)}</p>\n"
            f'<div id="controls">{controls}<span id="count">{len(df)} of {len(df)} rows</span></div>\n'
            f'<div class="scroll"><table id="board"><thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(body) + "\n</tbody></table></div>\n" + "\n".join(imgs)
            + f"\n<script>{_JS}</script>\n</body></html>\n")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    return text


# ---------------------------------------------------------------- entry points

FORMATS = ("text", "markdown", "csv", "html")


def _selected(rows: Sequence[dict], df: pd.DataFrame) -> list[dict]:
    kept = set(zip(df["experiment"], df["method"], df["iteration"]))
    return [r for r in rows if (r["experiment"], r["method"], r["iteration"]) in kept]


def render(df: pd.DataFrame, fmt: str, rows: Sequence[dict] = (), *, width: int = TERMINAL_WIDTH,
           title: str = "Leaderboard") -> str:
    """The table in one format as text (HTML with the plots of ``rows`` inlined)."""
    if fmt == "text":
        return to_terminal(df, width)[0]
    if fmt == "markdown":
        return to_markdown(df)
    if fmt == "csv":
        return to_csv(df)
    if fmt == "html":

        return to_html(df, images=list(render_plots(_selected(rows, df)).items()), title=title)
    raise ResultsError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


class Rendered(NamedTuple):
    text: str                # for stdout: the table, or "" when it went to a file
    written: list[Path]      # files written (the table's, then plots)
    left_out: list[str]      # columns the text table left out to fit its width


def render_leaderboard(paths: Sequence[Path], *, fmt: str = "text", out: Path | None = None,
                       sort_by: str | None = None, filters: dict | None = None,
                       columns: list[str] | None = None, plot_dir: Path | None = None,
                       width: int = TERMINAL_WIDTH) -> Rendered:
    """Load, tabulate and render in one call (for ``harness table``).

    Without ``out`` the text is the table itself and nothing else; with ``out``
    the table goes to that file and the text is empty. Plots are written only
    into ``plot_dir`` when given.
    """
    if fmt not in FORMATS:
        raise ResultsError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rows = load_rows(paths)
    df = build_table(rows, sort_by=sort_by, filters=filters, columns=columns)
    written: list[Path] = []
    if plot_dir is not None:

        written += write_plots(_selected(rows, df), Path(plot_dir))
    left_out: list[str] = []
    if fmt == "text":
        text, left_out = to_terminal(df, width)
    else:
        text = render(df, fmt, rows, width=width)
    if out is None:
        return Rendered(text, written, left_out)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return Rendered("", [Path(out)] + written, left_out)


def write_tables(paths: Sequence[Path], out_dir: Path, stem: str, *, title: str = "Leaderboard",
                 plots: bool | Sequence[str] = True, width: int = TERMINAL_WIDTH) -> tuple[str, list[str], list[Path]]:
    """The leaderboard of ``paths`` as ``<stem>.csv``, ``<stem>.md`` and ``<stem>.html`` (every
    column) in ``out_dir``, with the PNG plots there too (``plots``: all, none, or the named
    ones, e.g. ("comparison",); the page inlines them all). Returns (the terminal table, the
    columns it leaves out, the files written)."""
    rows = load_rows(paths)
    df = build_table(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    pngs: dict[str, bytes] = {}
    if plots:

        pngs = render_plots(rows)
        keep = pngs if plots is True else {k: v for k, v in pngs.items() if k in plots}
        written += save_plots(keep, out_dir)
    to_csv(df, out_dir / f"{stem}.csv")
    (out_dir / f"{stem}.md").write_text(to_markdown(df) + "\n", encoding="utf-8")
    to_html(df, out_dir / f"{stem}.html", images=list(pngs.items()), title=title)
    written = [out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "html")] + written
    table, left_out = to_terminal(df, width)
    return table, left_out, written


# ---------------------------------------------------------------- cost

def _count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else f"{n / 1e3:.1f}k" if n >= 1e3 \
        else f"{n:.0f}"


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def cost_summary(rows: Sequence[dict]) -> str:
    """One line per experiment of what its rows cost (the ``cost/*`` metrics, summed over
    iterations; peak memory the largest): iterations, wall time, tokens generated and
    trained, judge calls (and an HTTP judge's tokens), peak memory, GPU-hours where a GPU
    was used, the device: "cost: ..." for one experiment, "cost of <experiment>: ..." for
    several. Rows without cost metrics (older runs, published systems) are left out; ""
    when none has them."""
    lines = []
    experiments = list(dict.fromkeys(r["experiment"] for r in rows))
    for exp in experiments:
        mine = [r for r in rows if r["experiment"] == exp and "cost/wall_s" in r["metrics"]]
        if not mine:
            continue

        def total(key: str) -> float:
            return sum(r["metrics"].get(key) or 0 for r in mine)

        devices = sorted({d for r in mine for d in str(r.get("device") or "").split(", ") if d})
        gpu = any(d.startswith("cuda") for d in devices)
        peak = max((r["metrics"].get("cost/peak_mem_mb") or 0) for r in mine)
        n_iter = max(r["iteration"] for r in mine)
        parts = [plural(n_iter, "iteration"), f"{_duration(total('cost/wall_s'))} wall",
                 f"{_count(total('cost/gen_tokens'))} tokens generated", f"{_count(total('cost/train_tokens'))} trained",
                 f"{_count(total('cost/judge_calls'))} judge calls"]
        if total("cost/judge_prompt_tokens") or total("cost/judge_completion_tokens"):
            parts[-1] += (f" ({_count(total('cost/judge_prompt_tokens'))} + "
                          f"{_count(total('cost/judge_completion_tokens'))} tokens)")
        parts.append(f"peak {peak / 1024:.1f} GB {'GPU' if gpu else 'RSS'}")
        if gpu:
            parts.append(f"{total('cost/gpu_s') / 3600:.2f} GPU-hours")
        parts.append(", ".join(d[6:-1] if d.startswith("cuda (") else d for d in devices) or "device unknown")
        lines.append(f"cost{f' of {exp}' if len(experiments) > 1 else ''}: " + ", ".join(parts))
    return "\n".join(lines)
