"""A progress bar's count, rate and text, drawn inside a stage's terminal line.

``Progress`` keeps tqdm's update / set_postfix / close; its ``line`` (a
``harness.console.terminal.Line``, or None: nothing drawn) redraws when the count moves and
keeps the finished bar's counts (``done_bars``), which the stage's summary reads. Not
the drawing itself, nor when there is a line to draw in: harness.console.terminal's
``progress`` decides that.
"""

from __future__ import annotations

import time
from typing import Any

from harness.fmt import cut, number


class Progress:
    """A count with a rate, drawn inside the current stage line (tqdm's update/set_postfix/close)."""

    def __init__(self, line: Any, total: int | None, initial: int, desc: str | None, unit: str):
        self.line, self.total, self.initial, self.n = line, total, initial, initial
        # a description repeating the stage's name ("iter 1 generate") says nothing new in its line
        self.desc = "" if desc and line is not None and desc.split()[-1] == line.name else (desc or "")
        self.unit = unit
        self.postfix: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        if line is not None:
            line.bar = self
            line.draw(force=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.line is not None:
            self.line.draw()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kw) -> None:
        self.postfix = {**(ordered_dict or {}), **kw}
        if self.line is not None:
            self.line.draw()

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        if self.line is not None:
            self.line.draw(force=True)

    def close(self) -> None:
        if self.line is not None:
            self.line.done_bars.append(self.counts())
            if self.line.bar is self:
                self.line.bar = None
            self.line.draw(force=True)
            self.line = None

    def rate(self) -> float:
        return (self.n - self.initial) / max(time.perf_counter() - self.t0, 1e-9)

    def counts(self) -> dict:
        return {"desc": self.desc, "n": self.n, "total": self.total, "unit": self.unit, "rate": self.rate(),
                "postfix": dict(self.postfix)}

    def text(self, cols: int, utf8: bool = True) -> str:
        """``desc ━━━━━━──── 128/256 samples · 1,900/s · 8,760 tok/s`` within ``cols`` columns
        (``utf8``: a bar of box-drawing characters, else of # and -)."""
        count = f"{self.n:,}/{self.total:,}" if self.total else f"{self.n:,}"
        parts = [f"{count} {self.unit}"]
        if self.n > self.initial:
            parts.append(f"{number(self.rate(), 1)}/s")
        for k, v in self.postfix.items():
            try:
                v = number(float(v), 1) if k.endswith("_s") else v
            except (TypeError, ValueError):
                pass
            parts.append(f"{v} {k[:-2]}/s" if k.endswith("_s") else f"{k} {v}")
        tail = " · ".join(parts)
        head = f"{self.desc} " if self.desc else ""
        room = cols - len(head) - len(tail) - 1
        if self.total and room >= 10:
            full, empty = ("━", "─") if utf8 else ("#", "-")
            w = min(24, room)
            k = int(w * min(1.0, self.n / self.total))
            head += full * k + empty * (w - k) + " "
        return cut(head + tail, cols)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):  # tqdm(iterable) is not supported; progress is counted with update()
        raise TypeError("console.progress counts with update(); it does not wrap an iterable")
