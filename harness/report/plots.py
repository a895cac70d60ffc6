"""Result rows -> PNG plots (matplotlib, Agg backend).

- ``<experiment>.png``: small multiples, one panel per quantity (each lm-eval
  metric, the AlpacaEval win rate, each over-optimisation indicator, the
  training-side indicators), each with its own y axis, against the iteration;
  error bars where a standard error exists.
- ``comparison.png``: the experiments (methods) side by side, one panel per
  main metric: a group of bars per experiment, one bar per iteration, with
  error bars: at iteration 0 its standard error, at a later iteration that has a
  paired gain (``row["paired"]``) the gain's paired 95% interval, drawn around the
  bar's top (the bar is iteration 0's value plus the gain, so the bar covers
  iteration 0's value plus that interval), else its standard error; published
  AlpacaEval systems as hatched grey bars. Rows of several protocols of one evaluation
  (AlpacaEval, an lm-eval task; harness.report.protocol) get one panel per protocol for
  each of its metrics, tagged "[P1]", "[P2]", ... as the tables' split columns are (one
  numbering, harness.report.protocol.tag_protocols), the tags named under the figure's
  title: no panel puts two protocols' numbers side by side.

Several seeds of an experiment are one point / bar per iteration: the mean over the
seeds, its error bar the standard deviation between them (harness.evaluate.outcomes.across_seeds).

Which quantities get a panel, in which order, and their titles are the metric
catalogue's ``plot`` and ``compare`` views (harness.metrics). Wherever a win rate is
shown, its n (judged instructions) and coverage are too. Figures are built with the
object API and an explicit Agg canvas, never through pyplot: no global backend
switch, no display needed, nothing kept alive after a figure is saved. Not here:
the tables (harness.report) or which rows are shown (the caller's).
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from pathlib import Path
from typing import Sequence

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness import fmt
from harness.metrics import (ALPACA_EVAL, COVERAGE, INDICATORS, LC_WIN_RATE, LM_EVAL, N_TOTAL, WIN_RATE, find, ordered,
                             qualified, stderr_of, title)
from harness.report.protocol import AE_SCOPE, LM_PREFIX, MT_SCOPE, row_labels, scope_of, scopes, tag_protocols
from harness.report.rows import PUBLISHED
from harness.report.table import paired_of, point_label
from harness.report.seeds import seeds_spread

DPI = 100
PANEL = (3.3, 2.5)        # inches per small-multiple panel
COMPARE_PANEL = (4.6, 3.4)
COLORS = {LM_EVAL: "C0", ALPACA_EVAL: "C1", INDICATORS: "C2"}  # by producer; anything else "C4"


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["iteration"], _num(r["metrics"].get(key))) for r in rows]
    pts = [(i, v) for i, v in pts if not math.isnan(v)]
    return [i for i, _ in pts], [v for _, v in pts]


def _se_key(key: str, keys: set[str]) -> str | None:
    hits = [k for k in sorted(keys) if stderr_of(k) == key]
    return hits[0] if hits else None


def _judged(rows: Sequence[dict], tag: str = "") -> str:
    """"n=100, 100% judged" (a range when iterations differ); ``tag``: the protocol's qualifier."""
    n_key, cov_key = N_TOTAL + tag, COVERAGE + tag
    ns = sorted({int(_num(r["metrics"].get(n_key))) for r in rows if not math.isnan(_num(r["metrics"].get(n_key)))})
    covs = sorted({_num(r["metrics"].get(cov_key)) for r in rows if not math.isnan(_num(r["metrics"].get(cov_key)))})
    parts = []
    if ns:
        parts.append(f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}–{ns[-1]}")
    if covs:
        pct = [fmt.percent(c).removesuffix("%") for c in (covs[0], covs[-1])]
        parts.append(f"{pct[0]}% judged" if len(covs) == 1 else f"{pct[0]}–{pct[1]}% judged")
    return ", ".join(parts)


def _canvas_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _safe(name: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
    out, i = stem, 1
    while out in used:  # two names that sanitise alike must not overwrite each other
        i += 1
        out = f"{stem}-{i}"
    used.add(out)
    return out


def _quantities(rows: Sequence[dict]) -> list[str]:
    """Plotted quantities in panel order (the catalogue's: lm-eval metrics, win rates,
    indicators, training indicators); all-null metrics get no panel."""
    keys = {k for r in rows for k in r["metrics"]}
    return ordered(sorted(k for k in keys if _series(rows, k)[0]), "plot")


def _experiment_figure(name: str, rows: list[dict]) -> Figure | None:
    quantities = _quantities(rows)
    if not quantities:
        return None
    keys = {k for r in rows for k in r["metrics"]}
    ncols = min(4, len(quantities))
    nrows = math.ceil(len(quantities) / ncols)
    fig = Figure(figsize=(PANEL[0] * ncols, PANEL[1] * nrows + 0.4), layout="constrained")
    fig.suptitle(f"{name} ({rows[0]['method']}): metrics and indicators by iteration", fontsize=11)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    last = max(r["iteration"] for r in rows)
    for ax, key in zip(axes, quantities):
        xs, ys = _series(rows, key)
        se_key = _se_key(key, keys)
        err = None
        seeded = any(r.get("spread") for r in rows)
        if se_key is not None or seeded:
            se = {r["iteration"]: _num(r["spread"].get(key)) if r.get("spread") else
                  _num(r["metrics"].get(se_key)) if se_key else math.nan for r in rows}
            err = [0.0 if math.isnan(se.get(x, math.nan)) else se[x] for x in xs]
            err = err if any(err) else None
        color = COLORS.get(find(key).producer, "C4")
        ax.errorbar(xs, ys, yerr=err, marker="o", markersize=4, capsize=3, color=color, linewidth=1.5)
        text = title(key)
        if key == WIN_RATE and _judged(rows):
            text += f"\n{_judged(rows)}"
        if err is not None:
            text += (" (± sd, seeds)" if seeded else " (± s.e.)") if "\n" not in text else ""
        ax.set_title(text, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.set_xlim(-0.3, last + 0.3)
        ax.set_xticks(range(0, last + 1))
        ax.grid(alpha=0.3)
        ax.margins(y=0.15)
    for ax in axes[len(quantities):]:
        ax.set_visible(False)
    for i, ax in enumerate(axes[:len(quantities)]):
        if i + ncols >= len(quantities):  # the lowest panel of its column
            ax.set_xlabel("iteration", fontsize=8)
    return fig


def _by_protocol(rows: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """The rows with the metrics of each evaluation that has several protocols renamed per
    protocol ("alpaca_eval/win_rate [P1]", "lm_eval/gsm8k/exact_match [P3]"), and {tag: the
    protocol's legend text}; as they are and {} when no evaluation has several."""
    names = {s: row_labels(rows, s) for s in scopes(rows)}
    tagged = tag_protocols(names)
    if not tagged:
        return rows, {}

    def renamed(values: dict | None, i: int) -> dict:
        out = {}
        for k, v in (values or {}).items():
            scope = scope_of(k)
            name = names[scope][i] if scope in tagged else None
            out[f"{k} [{tagged[scope][name]}]" if name is not None else k] = v
        return out

    legend = {t: (label if scope in (AE_SCOPE, MT_SCOPE) else f"{scope[len(LM_PREFIX):]}: {label}")
              for scope, labels in tagged.items() for label, t in labels.items()}
    return [{**r, **{f: renamed(r.get(f), i) for f in ("metrics", "spread", "paired") if f in r}}
            for i, r in enumerate(rows)], legend


def _comparison_figure(by_exp: dict[str, list[dict]], published: list[dict]) -> Figure | None:
    split, tags = _by_protocol([r for rs in by_exp.values() for r in rs] + published)
    split_iter = iter(split)
    by_exp = {name: [next(split_iter) for _ in rs] for name, rs in by_exp.items()}
    published = list(split_iter)
    rows = [r for rs in by_exp.values() for r in rs]
    keys = {k for r in rows + published for k in r["metrics"]}
    has = lambda k: any(_series(rs, k)[0] for rs in by_exp.values())  # noqa: E731
    quantities = ordered(sorted(k for k in keys if has(k)), "compare")
    if not quantities:
        return None
    ncols = min(3, len(quantities))
    nrows = math.ceil(len(quantities) / ncols)
    groups = list(by_exp) + [r["experiment"] for r in published]
    width_in = max(COMPARE_PANEL[0], 0.9 + 1.1 * len(groups))
    fig = Figure(figsize=(width_in * ncols, COMPARE_PANEL[1] * nrows + 0.6), layout="constrained")
    fig.suptitle("methods side by side: one bar per iteration"
                 + "".join(f"\n[{t}] {label}" for t, label in tags.items()
                           if any(qualified(q)[1] == f" [{t}]" for q in quantities)), fontsize=11)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    max_it = max(r["iteration"] for r in rows)
    cmap = colormaps["viridis"]
    colors = [cmap(0.15 + 0.7 * i / max(1, max_it)) for i in range(max_it + 1)]
    bar_w = 0.8 / (max_it + 1)
    legend: dict[str, object] = {}
    for ax, key in zip(axes, quantities):
        se_key = _se_key(key, keys)
        labels = []
        gains = False
        shown = [name for name in groups if (name in by_exp and _series(by_exp[name], key)[0])
                 or any(p["experiment"] == name and not math.isnan(_num(p["metrics"].get(key))) for p in published)]
        for g, name in enumerate(shown):
            if name in by_exp:
                rs = by_exp[name]
                n = len(rs)
                for j, r in enumerate(rs):
                    v = _num(r["metrics"].get(key))
                    if math.isnan(v):
                        continue
                    x = g - 0.4 + bar_w * (j + 0.5) + (0.8 - n * bar_w) / 2
                    yerr = _bar_error(r, key, se_key)
                    gains |= _gain_interval(r, key) is not None
                    ax.bar(x, v, bar_w * 0.92, color=colors[r["iteration"]],
                           yerr=yerr, capsize=2, error_kw={"linewidth": 0.8},
                           label=f"iteration {r['iteration']}")
                label = f"{textwrap.shorten(name, 22, placeholder='…')}\n{rs[0]['method']}"
                if qualified(key)[0] in (WIN_RATE, LC_WIN_RATE) and _judged(rs, qualified(key)[1]):
                    label += f"\n{_judged(rs, qualified(key)[1])}"
            else:
                r = next(p for p in published if p["experiment"] == name)
                v = _num(r["metrics"].get(key))
                se = _num(r["metrics"].get(se_key)) if se_key else math.nan
                if not math.isnan(v):
                    ax.bar(g, v, bar_w * 0.92, color="0.75", hatch="//", edgecolor="0.4",
                           yerr=None if math.isnan(se) else se, capsize=2, label="published (AlpacaEval)")
                label = f"{textwrap.shorten(name, 22, placeholder='…')}\npublished"
                if qualified(key)[0] in (WIN_RATE, LC_WIN_RATE) and _judged([r], qualified(key)[1]):
                    label += f"\n{_judged([r], qualified(key)[1])}"
            labels.append(label)
        ax.set_xticks(range(len(shown)), labels, fontsize=7)
        ax.set_xlim(-0.6, len(shown) - 0.4)
        seeded = any(r.get("spread") for name in shown if name in by_exp for r in by_exp[name])
        bars = (["iteration 0 ± s.e."] if se_key and gains else []) + (["later: 95% interval of the gain"] if gains else []) \
            + (["seeds: ± sd"] if seeded else [])
        ax.set_title(title(key) + (f"\n({'; '.join(bars)})" if bars else " (± s.e.)" if se_key else ""), fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        for h, lbl in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lbl, h)
    for ax in axes[len(quantities):]:
        ax.set_visible(False)
    order = sorted(legend, key=lambda s: (s.startswith("published"), s))
    fig.legend([legend[k] for k in order], order, loc="outside lower center", ncols=min(6, len(order)), fontsize=8,
               frameon=False)
    return fig


def _gain_interval(r: dict, key: str) -> tuple[float, float] | None:
    """(below, above) the bar's top: the paired 95% interval of the gain over iteration 0."""
    p = paired_of(r, key) if r["iteration"] != 0 and not r.get("spread") else None
    if not p:
        return None
    mean, lo, hi = _num(p.get("mean")), _num(p.get("ci_low")), _num(p.get("ci_high"))
    if any(math.isnan(x) for x in (mean, lo, hi)):
        return None
    return max(0.0, mean - lo), max(0.0, hi - mean)


def _bar_error(r: dict, key: str, se_key: str | None):
    """A bar's error: the gain's paired interval, the seeds' sd, or the standard error (None: none)."""
    gain = _gain_interval(r, key)
    if gain is not None:
        return [[gain[0]], [gain[1]]]
    e = _num(r["spread"].get(key)) if r.get("spread") else _num(r["metrics"].get(se_key)) if se_key else math.nan
    return None if math.isnan(e) else e


def _over_seeds(rows: list[dict]) -> list[dict]:
    """One row per iteration: several seeds' rows become their mean, with ``spread`` (the sd
    between them per metric) and ``seeds`` (how many)."""
    by_it: dict[int, list[dict]] = {}
    for r in rows:
        by_it.setdefault(r["iteration"], []).append(r)
    out = []
    for it, group in sorted(by_it.items()):
        if len(group) == 1:
            out.append(group[0])
            continue
        metrics, spread = {}, {}
        for k in sorted({k for r in group for k in r["metrics"]}):
            s = seeds_spread([_num(r["metrics"].get(k)) for r in group])
            metrics[k] = None if s is None else s.mean
            if s is not None and s.sd is not None:
                spread[k] = s.sd
        out.append({**group[0], "metrics": metrics, "spread": spread, "seeds": len(group), "paired": {}})
    return out


def render_plots(rows: Sequence[dict]) -> dict[str, bytes]:
    """{file stem: PNG bytes}: one figure per experiment, and ``comparison`` when there is
    something to compare (two experiments, or one and published systems).

    An experiment without plottable metrics gets no figure; published systems
    appear only in the comparison."""
    by_exp: dict[str, list[dict]] = {}  # a sweep point is an experiment of its own: "<name> (<point>)"
    for r in sorted(rows, key=lambda r: (r["experiment"], r["iteration"])):
        if r["method"] != PUBLISHED:
            point = point_label(r)
            by_exp.setdefault(r["experiment"] + (f" ({point})" if point else ""), []).append(r)
    by_exp = {name: _over_seeds(rs) for name, rs in by_exp.items()}
    out: dict[str, bytes] = {}
    used = {"comparison"}
    for name, rs in by_exp.items():
        fig = _experiment_figure(name, rs)
        if fig is not None:
            out[_safe(name, used)] = _canvas_png(fig)
    published = [r for r in rows if r["method"] == PUBLISHED]
    fig = _comparison_figure(by_exp, published) if by_exp and len(by_exp) + bool(published) > 1 else None
    if fig is not None:
        out["comparison"] = _canvas_png(fig)
    return out


def save_plots(pngs: dict[str, bytes], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, data in pngs.items():
        path = out_dir / f"{stem}.png"
        path.write_bytes(data)
        paths.append(path)
    return paths


def write_plots(rows: Sequence[dict], out_dir: Path) -> list[Path]:
    """Write ``<experiment>.png`` per experiment and ``comparison.png`` (see ``render_plots``)."""
    return save_plots(render_plots(rows), out_dir)
