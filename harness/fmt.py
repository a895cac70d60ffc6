"""Numbers, percentages, counts and durations as short text: the one set of formatters
the terminal lines, the leaderboard tables and the cost summary share.

Pure functions of plain Python values (no pandas: a table's ``pd.NA`` is the caller's
to turn into None). Not the choice of which format a metric gets: that is the metric
catalogue's (harness.metrics).
"""

from __future__ import annotations

import json
import math
from numbers import Integral, Real
from pathlib import Path
from typing import Any


def missing(v: Any) -> bool:
    """None or a float NaN: a value there is nothing to show for."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def number(v: Any, digits: int = 3, *, grouped: bool = True, signed: bool = False, blank: str = "n/a") -> str:
    """A compact number: integers as they are (``grouped``: with thousands separators),
    floats to about 3-4 significant digits (``digits`` decimals below 1), ``signed``: with
    a + before a positive value; ``blank`` for a missing value, anything not a number as
    its text."""
    if missing(v):
        return blank
    if isinstance(v, bool) or not isinstance(v, Real):
        return str(v)
    sign, sep = "+" if signed else "", "," if grouped else ""
    if isinstance(v, Integral) or (abs(v) >= 1000 and float(v).is_integer()):
        return f"{int(v):{sign}{sep}d}"
    a = abs(v)
    decimals = 0 if a >= 1000 else 1 if a >= 100 else 2 if a >= 1 else digits
    return f"{v:{sign}{sep}.{decimals}f}"


def fixed(v: float, digits: int, signed: bool = False) -> str:
    """``v`` with exactly ``digits`` decimals (``signed``: +0.123)."""
    return f"{v:{'+' if signed else ''}.{digits}f}"


def percent(v: Any, blank: str = "n/a") -> str:
    """A fraction as a percentage: 1.0 -> 100%, 0.987 -> 98.7%; ``blank`` for no number."""
    if not isinstance(v, Real) or missing(v):
        return blank
    return f"{100 * v:.0f}%" if v in (0, 1) else f"{100 * v:.1f}%"


def count(n: float) -> str:
    """A large count in thousands or millions: 950, 3.6k, 90k, 1.2M."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else f"{n / 1e3:.1f}k" if n >= 1e3 \
        else f"{n:.0f}"


def clock(seconds: float) -> str:
    """Elapsed time as a clock shows it: 0.4s, 12.3s, 4:05, 1:02:03."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def duration(seconds: float) -> str:
    """A total time in words' units: 12 s, 3.0 min, 1.0 h."""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 \
        else f"{seconds:.0f} s"


def cut(text: str, cols: int) -> str:
    """``text`` cut to ``cols`` columns with an ellipsis."""
    return text if len(text) <= cols else text[: cols - 1] + "…"


def plural(n: int, word: str) -> str:
    """``plural(1, "iteration")`` -> "1 iteration"; ``plural(3, "iteration")`` -> "3 iterations"."""
    return f"{n} {word}{'s' * (n != 1)}"


def short_path(p) -> str:
    """A path relative to the working directory when it is below it, else as given."""
    try:
        return str(Path(p).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def setting(v: Any) -> str:
    """A config value as short text, the same wherever a sweep point is named (its run
    directory, its table row): a string as itself, a bool as TOML's true/false, a number as
    Python writes it (1e-05, 0.0005, 3), anything else (a list, a table) as compact JSON."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Real):
        return repr(v)
    return json.dumps(v, separators=(",", ":"), sort_keys=True, default=str)


def short_keys(keys: list[str]) -> list[str]:
    """Dotted keys by their last part (training.learning_rate -> learning_rate), a key whose last
    part another key shares by itself whole: how a sweep point's run directories and table
    rows name its keys."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return [s if last.count(s) == 1 else k for k, s in zip(keys, last)]
