"""A finished stage's result in a few numbers, for its terminal line, as the metric
catalogue's ``lines`` say (``1,000 steps · loss 0.693→0.512 · margin +0.123``).

Not the drawing of the line (harness.console.terminal) nor the choice of metrics (the catalogue,
harness.metrics). A line text is a template: ``{}`` is the metric's value in its
catalogue format, ``{Δ}`` its change against iteration 0 (signed, the metric's digits;
``{Δ:+.3f}`` names the format), ``{per_s}`` the value per second of the stage's wall
time, ``{other/metric}`` another metric of the stage in that metric's format, and
``{task}`` / ``{name}`` the fields of the key (harness.metrics.fields). A segment in
``[...]`` is left out when a value in it is missing; without the metric's own value
there is no text at all.
"""

from __future__ import annotations

import re
from typing import Any

from harness import fmt
from harness.metrics import SAMPLES, VALIDATION, fields, find, rank

_OPTIONAL = re.compile(r"(\[[^\[\]]*\])")
_FIELD = re.compile(r"\{([^{}:]*)(?::([^{}]*))?\}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float))


def value_text(key: str, v: Any) -> str:
    """``v`` in the catalogue format of ``key`` (a compact number for an unknown key)."""
    m = find(key)
    if m is None or m.format == "count":
        return fmt.number(v)
    if m.format == "percent":
        return fmt.percent(v)
    return fmt.fixed(v, m.digits, signed=m.format == "signed")


def _fill(text: str, key: str, m: dict, base: dict, seconds: float | None) -> str | None:
    """``text`` with its fields filled in; None when one of them has no value."""
    v, row = m.get(key), find(key)
    out, pos = [], 0
    for match in _FIELD.finditer(text):
        name, spec = match.groups()
        if name == "":
            got = value_text(key, v) if _is_number(v) else None
        elif name == "Δ":
            b = base.get(key)
            ok = _is_number(v) and _is_number(b)
            got = format(v - b, spec or f"+.{row.digits if row else 3}f") if ok else None
        elif name == "per_s":
            got = fmt.number(v / seconds, 1) if _is_number(v) and seconds else None
        elif "/" in name:
            got = value_text(name, m[name]) if _is_number(m.get(name)) else None
        else:
            got = fields(key)[name]
        if got is None:
            return None
        out += [text[pos:match.start()], got]
        pos = match.end()
    return "".join(out) + text[pos:]


def line_text(template: str, key: str, m: dict, base: dict | None = None, seconds: float | None = None) -> str | None:
    """One metric's text from its catalogue ``template`` (None: it has no value)."""
    pieces = []
    for piece in _OPTIONAL.split(template):
        optional = piece.startswith("[") and piece.endswith("]")
        got = _fill(piece[1:-1] if optional else piece, key, m, base or {}, seconds)
        if got is None and not optional:
            return None
        pieces.append(got or "")
    return "".join(pieces)


def stage_parts(stage: str, m: dict, base: dict | None = None, seconds: float | None = None) -> list[str]:
    """The texts of ``stage``'s metrics that the catalogue gives a line text for, in catalogue order."""
    keys = sorted((rank(k), k) for k in m if (row := find(k)) is not None and stage in row.lines)
    parts = [line_text(find(k).lines[stage], k, m, base, seconds) for _, k in keys]
    return [p for p in parts if p]


def summarize(name: str, m: dict, *, baseline: dict | None = None, bars: list[dict] | None = None,
              seconds: float | None = None) -> str:
    """A stage's result in a few numbers, from its flat metrics (the stage manifest's), the
    counts of its finished progress bars and its wall time."""
    if name == "evaluate" and not m:
        return "no evaluation configured"
    samples = sum(b["n"] for b in bars or () if b["unit"] in ("sample", "samples"))
    facts = {**m, SAMPLES: samples or None}
    parts = stage_parts(name, facts, baseline, seconds)
    if name == "validation":  # the same evaluations on validation data, then validation's own metrics
        inner = {k.removeprefix(VALIDATION): v for k, v in facts.items()}
        inner_base = {k.removeprefix(VALIDATION): v for k, v in (baseline or {}).items()}
        parts = stage_parts("evaluate", inner, inner_base, seconds) + parts
    if not parts:  # a stage the catalogue has no texts for: its first few numbers
        parts = [f"{k.rsplit('/', 1)[-1]} {fmt.number(v)}" for k, v in list(m.items())[:4] if _is_number(v)]
    return " · ".join(parts)
