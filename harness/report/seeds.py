"""Several seeds of one (experiment, sweep point, method, iteration) as one leaderboard record:
each metric and Δ the mean over the seeds with the standard deviation between them, a mean
gain significant only when every seed's paired interval excludes 0 on the same side, shared
text values kept (distinct ones joined). The conventions are ``harness.report.table``'s.
"""

from __future__ import annotations

import math
import warnings
from numbers import Real
from typing import Any, Sequence

import pandas as pd

from harness.evaluate.outcomes import across_seeds
from harness.report.columns import DELTA, HI, LO, PROV_COLS, SD, SE, SEEDS, SIG, SWEEP, UNAVAILABLE


def seeds_spread(values: Sequence[float]):
    """harness.evaluate.outcomes.across_seeds, quiet about equal values (scipy warns of precision loss
    for them; their standard deviation is 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return across_seeds(values)


def marked(v: Any) -> bool:
    """A "sig" cell that is true (not missing)."""
    return v is not None and v is not pd.NA and not (isinstance(v, float) and math.isnan(v)) and bool(v)


def _mean(values: list[Any]) -> tuple[Any, float]:
    """The mean over seeds (an integer when every seed's is one and so is the mean; "unavailable"
    when no seed has a number but one says so) and the standard deviation between them."""
    spread = seeds_spread([v for v in values if isinstance(v, Real) and not isinstance(v, bool)])
    if spread is None:
        return (UNAVAILABLE if UNAVAILABLE in values else math.nan), math.nan
    mean = spread.mean
    nums = [v for v in values if isinstance(v, Real) and not (isinstance(v, float) and math.isnan(v))]
    if all(isinstance(v, int) for v in nums) and float(mean).is_integer():
        mean = int(mean)
    return mean, math.nan if spread.sd is None else spread.sd


def _same(values: list[Any]) -> Any:
    """The value every seed shares, else the distinct values joined by ","; None when none has one."""
    distinct = list(dict.fromkeys(v for v in values if v is not None and v is not pd.NA and not
                                  (isinstance(v, float) and math.isnan(v))))
    return distinct[0] if len(distinct) == 1 else ",".join(map(str, distinct)) if distinct else None


def over_seeds(group: list[dict], metric_keys: list[str], se_for: dict, delta_keys: list[str],
                ci_keys: set[str], about: list[str]) -> dict:
    """One record for the seeds of one (experiment, sweep point, method, iteration)."""
    first = group[0]
    rec: dict[str, Any] = {c: first[c] for c in ("experiment", "method", SWEEP, "iteration")}
    rec["model"] = _same([g["model"] for g in group])
    rec[SEEDS] = len(group)
    for k in metric_keys:
        rec[k], rec[k + SD] = _mean([g[k] for g in group])
        if k in se_for:
            rec[k + SE] = math.nan  # within-seed errors: in the per-seed rows
    for k in delta_keys:
        d = DELTA + k
        rec[d], rec[d + SD] = _mean([g[d] for g in group])
        if k in ci_keys:
            rec[d + LO] = rec[d + HI] = math.nan
            lows, highs = [g[d + LO] for g in group], [g[d + HI] for g in group]
            if group[0]["iteration"] == 0 or all(math.isnan(v) for v in lows):
                rec[d + SIG] = pd.NA
            else:  # every seed's interval excludes 0, all on the same side
                rec[d + SIG] = all(lo > 0 for lo in lows) or all(hi < 0 for hi in highs)
    for c in about:
        rec[c] = _same([g[c] for g in group])
    for c in PROV_COLS:
        rec[c] = None if c == "seed" else _same([g.get(c) for g in group])
    return rec
