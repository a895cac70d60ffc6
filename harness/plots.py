"""Result rows -> PNG plots of metrics vs iteration (matplotlib, Agg backend).

Figures are built with the object API and an explicit Agg canvas, never through
pyplot: no global backend switch, no display needed, nothing kept alive after
a figure is saved.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.results import LC_WIN_RATE, PUBLISHED, WIN_RATE, WIN_SE, _stderr_of

LARGE = 10.0  # indicators beyond this magnitude (e.g. mean length) go on a second y axis


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["iteration"], _num(r["metrics"].get(key))) for r in rows]
    pts = [(i, v) for i, v in pts if not math.isnan(v)]
    return [i for i, _ in pts], [v for _, v in pts]


def _line(ax, rows, key, label, se_key=None, **kw) -> bool:
    """One metric vs iteration (with error bars when ``se_key`` has values); False if no data."""
    xs, ys = _series(rows, key)
    if not xs:
        return False
    err = None
    if se_key is not None:
        se = {r["iteration"]: _num(r["metrics"].get(se_key)) for r in rows}
        err = [0.0 if math.isnan(se.get(x, math.nan)) else se[x] for x in xs]
        err = err if any(err) else None
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label, **kw)
    return True


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def _safe(name: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
    out, i = stem, 1
    while out in used:  # two names that sanitise alike must not overwrite each other
        i += 1
        out = f"{stem}-{i}"
    used.add(out)
    return out


def _experiment_figure(name: str, rows: list[dict]) -> Figure | None:
    keys = sorted({k for r in rows for k in r["metrics"]})
    has_data = lambda k: bool(_series(rows, k)[0])  # noqa: E731  (all-null metrics get no line)
    lm = [k for k in keys if k.startswith("lm_eval/") and _stderr_of(k) is None and has_data(k)]
    lm_se = {_stderr_of(k): k for k in keys if _stderr_of(k)}
    ind = [k for k in keys if k.startswith("indicators/") and has_data(k)]
    panels = [p for p in ("lm_eval", "alpaca_eval", "indicators")
              if (p == "lm_eval" and lm) or (p == "indicators" and ind)
              or (p == "alpaca_eval" and has_data(WIN_RATE))]
    if not panels:
        return None
    fig = Figure(figsize=(5.0 * len(panels), 3.8), layout="constrained")
    fig.suptitle(f"{name} ({rows[0]['method']})")
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.set_xlabel("iteration")
        right = None  # second y axis, for large-valued indicators only
        if panel == "lm_eval":
            ax.set_title("lm-eval")
            for k in lm:
                _line(ax, rows, k, k.removeprefix("lm_eval/"), lm_se.get(k))
        elif panel == "alpaca_eval":
            ax.set_title("AlpacaEval win rate (%)")
            _line(ax, rows, WIN_RATE, "win rate ± s.e.", WIN_SE)
            _line(ax, rows, LC_WIN_RATE, "length-controlled")
        else:
            ax.set_title("indicators")
            big = [k for k in ind if any(abs(v) > LARGE for v in _series(rows, k)[1])]
            right = ax.twinx() if big else None
            for k in ind:
                target = right if k in big else ax
                _line(target, rows, k, k.removeprefix("indicators/") + (" (right)" if k in big else ""),
                      color=f"C{ind.index(k)}")
            if right is not None:
                h1, l1 = ax.get_legend_handles_labels()
                h2, l2 = right.get_legend_handles_labels()
                ax.legend(h1 + h2, l1 + l2, fontsize=7)
        if right is None:
            ax.legend(fontsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def _comparison_figure(by_exp: dict[str, list[dict]], published: list[dict]) -> Figure | None:
    keys = sorted({k for rs in by_exp.values() for r in rs for k in r["metrics"]})
    lm = [k for k in keys if k.startswith("lm_eval/") and _stderr_of(k) is None]
    lm_se = {_stderr_of(k): k for k in keys if _stderr_of(k)}
    panels = [(WIN_RATE, "AlpacaEval win rate (%)")] + ([(lm[0], lm[0].removeprefix("lm_eval/"))] if lm else [])
    panels = [(k, t) for k, t in panels if any(_series(rs, k)[0] for rs in by_exp.values())]
    if not panels:
        return None
    fig = Figure(figsize=(5.5 * len(panels), 4.0), layout="constrained")
    fig.suptitle("all experiments")
    for ax, (key, title) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        se_key = WIN_SE if key == WIN_RATE else lm_se.get(key)
        for name, rs in by_exp.items():
            _line(ax, rs, key, name, se_key)
        for r in published:  # a published system is one number: a dashed reference line
            v = _num(r["metrics"].get(key))
            if not math.isnan(v):
                ax.axhline(v, linestyle="--", linewidth=1, color="gray")
                ax.annotate(r["experiment"], (0, v), fontsize=7, color="gray", va="bottom")
        ax.legend(fontsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def write_plots(rows: Sequence[dict], out_dir: Path) -> list[Path]:
    """Write ``<experiment>.png`` per experiment, and ``comparison.png`` when there is
    something to compare (two experiments, or one and published systems); return the paths.

    An experiment without plottable metrics gets no file; published systems
    appear only as reference lines in the comparison plot.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_exp: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["experiment"], r["iteration"])):
        if r["method"] != PUBLISHED:
            by_exp.setdefault(r["experiment"], []).append(r)
    written, used = [], {"comparison"}
    for name, rs in by_exp.items():
        fig = _experiment_figure(name, rs)
        if fig is not None:
            written.append(_save(fig, out_dir / f"{_safe(name, used)}.png"))
    published = [r for r in rows if r["method"] == PUBLISHED]
    fig = _comparison_figure(by_exp, published) if len(by_exp) + bool(published) > 1 else None
    if fig is not None:
        written.append(_save(fig, out_dir / "comparison.png"))
    return written
