"""Two runs compared on the items both evaluated (``harness table --compare A B``).

One line per metric both runs' evaluate stages scored per item (harness.outcomes'
``items.jsonl``): the mean difference B - A over the shared items, its standard error,
its paired 95% interval, the number of shared items and a "*" when the interval
excludes 0. At one iteration: the one asked for, else the last both evaluated. Not
here: the statistics (harness.outcomes.compare) or the leaderboard tables.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from harness.metrics import header
from harness.outcomes import ITEMS, compare
from harness.report.files import cell
from harness.rundir import RunDir


class CompareError(ValueError):
    """Two runs that cannot be compared; the message says why, naming them."""


def _evaluated(run: Path) -> list[int]:
    return sorted(t for t, d in RunDir(run).stage_dirs() if d.name == "evaluate" and (d / ITEMS).exists())


def compare_rows(run_a: Path, run_b: Path, iteration: int | None = None) -> list[dict]:
    """harness.outcomes.compare's rows, or CompareError when there is nothing to compare."""
    for run in (run_a, run_b):
        if not Path(run).is_dir():
            raise CompareError(f"{run}: not a directory")
        if not _evaluated(run):
            raise CompareError(f"{run}: no evaluation with per-item outcomes (iter_*/evaluate/{ITEMS}); "
                               "is it a run directory?")
    if iteration is not None:
        for run in (run_a, run_b):
            if iteration not in _evaluated(run):
                raise CompareError(f"{run}: no evaluation at iteration {iteration} (evaluated: "
                                   f"{', '.join(map(str, _evaluated(run)))})")
    elif not set(_evaluated(run_a)) & set(_evaluated(run_b)):
        raise CompareError(f"{run_a} and {run_b} have no evaluated iteration in common")
    try:
        rows = compare(Path(run_a), Path(run_b), iteration)
    except (OSError, ValueError, KeyError, TypeError) as e:  # an unreadable or malformed items.jsonl
        raise CompareError(f"{run_a} / {run_b}: cannot read the per-item outcomes ({type(e).__name__}: {e})") \
            from None
    if not rows:
        at = f" at iteration {iteration}" if iteration is not None else ""
        raise CompareError(f"{run_a} and {run_b} share no evaluated items{at} (need two or more per metric)")
    return rows


def compare_text(run_a: Path, run_b: Path, iteration: int | None = None) -> str:
    """The comparison as a pipe table with a legend under it."""
    rows = compare_rows(run_a, run_b, iteration)
    head = ["metric", "B - A", "se", "95% interval", "n", ""]
    body = [[header(r["metric"].split(",", 1)[0]) + ("," + r["metric"].split(",", 1)[1] if "," in r["metric"]
                                                      and r["metric"].split(",", 1)[1] != "none" else ""),
             cell(r["mean"], signed=True), cell(r["se"]),
             f"[{cell(r['ci_low'], signed=True)}, {cell(r['ci_high'], signed=True)}]",
             str(r["n"]), "*" if r["significant"] else ""] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    right = [False, True, True, True, True, False]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else (":" + "-" * (w + 1)) for w, r in zip(widths, right)) + "|"
    title = f"B - A at iteration {rows[0]['iteration']} on the items both evaluated\n  A: {run_a}\n  B: {run_b}"
    notes = ("se: standard error of the mean paired difference; 95% interval: Student t with n - 1 degrees of "
             "freedom; n: shared items; * the interval excludes 0.")
    return "\n".join([title, line(head), rule, *map(line, body), textwrap.fill(notes, 120)])
