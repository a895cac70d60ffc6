"""Two runs compared on the items both evaluated (``harness table --compare A B``).

One line per metric both runs' evaluate stages scored per item (harness.evaluate.outcomes'
``items.jsonl``): the mean difference B - A over the shared items, its standard error,
its paired 95% interval, the number of shared items and a "*" when the interval
excludes 0. At one iteration: the one asked for, else the last both evaluated.

Only numbers of one protocol are paired: for each compared metric's scope (AlpacaEval,
an lm-eval task; harness.report.protocol) the two runs' protocol records at that iteration
(their results.jsonl row, else the evaluate stage's ``<evaluation>/metrics.json``) must be
the same, else a CompareError names the first difference in one line
("alpaca_eval: judge model differs: gpt-4-1106-preview vs oracle"). With
``allow_protocol_mismatch`` they are compared anyway and the output says which differ. Two
runs that recorded no protocol for a scope are taken to share it. Not here: the statistics
(harness.evaluate.outcomes.compare) or the leaderboard tables.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from harness.metrics import header
from harness.evaluate.outcomes import ITEMS, compare
from harness.report.files import cell
from harness.report.protocol import difference, record, scope_of
from harness.store.rundir import RunDir


class CompareError(ValueError):
    """Two runs that cannot be compared; the message says why, naming them."""


def _evaluated(run: Path) -> list[int]:
    return sorted(t for t, d in RunDir(run).stage_dirs() if d.name == "evaluate" and (d / ITEMS).exists())


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def protocols_at(run: Path, iteration: int) -> dict:
    """The run's protocol records at ``iteration`` as a results row carries them
    ({"alpaca_eval": {...}, "lm_eval": {task: {...}}}): its results.jsonl row of that
    iteration when it has one, else what the evaluate stage's metrics files record."""
    rd = RunDir(run)
    if rd.results.is_file():
        for line in rd.results.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("iteration") == iteration and isinstance(row.get("protocol"), dict):
                return row["protocol"]
    out = {}
    for name in ("alpaca_eval", "mt_bench", "lm_eval"):
        saved = _json(rd.stage(iteration, "evaluate") / name / "metrics.json")
        if isinstance(saved, dict) and isinstance(saved.get("protocol"), dict):
            out[name] = saved["protocol"]
    return out


def protocol_differences(run_a: Path, run_b: Path, iteration: int, metrics: list[str]) -> list[str]:
    """One line per scope of ``metrics`` whose protocols differ between the runs at ``iteration``
    ("lm_eval/gsm8k: num_fewshot differs: 5 vs 0"); [] when every one is the same."""
    rows = [{"protocol": protocols_at(run, iteration)} for run in (run_a, run_b)]
    found = []
    for scope in dict.fromkeys(s for m in metrics if (s := scope_of(m)) is not None):
        why = difference(record(rows[0], scope), record(rows[1], scope), scope)
        if why is not None:
            found.append(f"{scope}: {why}")
    return found


def compare_rows(run_a: Path, run_b: Path, iteration: int | None = None,
                 allow_protocol_mismatch: bool = False) -> list[dict]:
    """harness.evaluate.outcomes.compare's rows, or CompareError when there is nothing to compare or
    (unless ``allow_protocol_mismatch``) the runs' protocols differ for a compared metric."""
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
    differ = protocol_differences(run_a, run_b, rows[0]["iteration"], [r["metric"] for r in rows])
    if differ and not allow_protocol_mismatch:
        raise CompareError(f"{run_a} and {run_b} were evaluated under different protocols ({'; '.join(differ)}); "
                           "their items are not paired (--allow-protocol-mismatch pairs them anyway)")
    return rows


def compare_text(run_a: Path, run_b: Path, iteration: int | None = None,
                 allow_protocol_mismatch: bool = False) -> str:
    """The comparison as a pipe table with a legend under it (and, when the protocols differ and
    ``allow_protocol_mismatch`` let them be paired, a line saying which)."""
    rows = compare_rows(run_a, run_b, iteration, allow_protocol_mismatch)
    differ = protocol_differences(run_a, run_b, rows[0]["iteration"], [r["metric"] for r in rows])
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
    warn = [textwrap.fill("Protocols differ (paired anyway, --allow-protocol-mismatch): " + "; ".join(differ) + ".",
                          120)] if differ else []
    return "\n".join([title, line(head), rule, *map(line, body), textwrap.fill(notes, 120), *warn])
