"""What the harness says on the terminal: stage lines, progress bars, status lines.

Terminal (stderr), by default: one line per stage ("iter 1  generate  0:03
256 samples · 1,129 tokens"), with a live progress bar (counts, rate) on an
interactive terminal while the stage runs, and ``warning:`` / ``error:`` lines
of the harness's own loggers. No line is wider than ``MAX_WIDTH`` columns.
Data (tables) goes to stdout through ``data``. A stage's summary comes from its
metrics as the metric catalogue says (harness.console.summary).

Everything else (other libraries' logging, Python warnings, progress bars,
prints, and our own logging at debug level) goes to the run's log file while
``capture`` is active; the log file and the descriptor redirection are
harness.console.logs' (``log_to`` and ``LOG_NAME`` are importable from here too).

Levels: ``QUIET`` (only data and errors), ``NORMAL``, ``VERBOSE`` (nothing is
redirected: other libraries' output and every log record are shown too).

Library use (tests, bench scripts) without ``configure``: ``stage`` draws
nothing and ``progress`` is a plain tqdm bar, as before.

Not here: formatting numbers (harness.fmt) or which metric a line shows
(harness.metrics). The loop, training and evaluation code import this module.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator, TextIO

from harness.console import logs
from harness.fmt import clock, cut, plural  # noqa: F401  (plural: for the CLI's lines)
from harness.console.logs import LOG_NAME, NORMAL, QUIET, VERBOSE, log_path, log_to  # noqa: F401  (used from here too)
from harness.console.progress import Progress
from harness.console.summary import summarize

MAX_WIDTH = 120
LABEL_W, NAME_W, TIME_W = 7, 10, 6  # columns of a stage line: label, stage name (self_instruct overflows), time

log = logging.getLogger("harness.console")


class _State:
    def __init__(self) -> None:
        self.enabled = False
        self.level = NORMAL
        self.term: TextIO = sys.stderr   # status lines
        self.out: TextIO = sys.stdout    # data
        self.tty = False
        self.lock = threading.RLock()
        self.line: Line | None = None    # the stage line being drawn
        self.drawn = False               # a transient (unfinished) line is on the terminal
        self.failed: str | None = None   # "iteration 1 train": the stage an exception left
        self.ticker: threading.Thread | None = None


_S = _State()


# ---------------------------------------------------------------- text helpers

def width() -> int:
    """Columns available for one line: the terminal's, at most MAX_WIDTH."""
    if _S.tty:
        try:
            cols = os.get_terminal_size(_S.term.fileno()).columns
            if cols > 0:  # 0: a terminal that does not say
                return max(40, min(MAX_WIDTH, cols))
        except (OSError, ValueError):
            pass
    return MAX_WIDTH


def fit(text: str, cols: int | None = None) -> str:
    """``text`` cut to ``cols`` columns (default: the terminal's) with an ellipsis."""
    return cut(text, cols or width())


def wrap(text: str, cols: int | None = None, indent: str = "  ") -> list[str]:
    """Lines of ``text`` wrapped to ``cols`` columns (continuations indented); long words are split."""
    cols = cols or width()
    out: list[str] = []
    for para in str(text).splitlines() or [""]:
        out += textwrap.wrap(para, cols, subsequent_indent=indent, break_on_hyphens=False) or [""]
    return out


def _utf8(stream: TextIO) -> bool:
    return "utf" in (getattr(stream, "encoding", None) or "").lower()


# ---------------------------------------------------------------- terminal writing

def _clear() -> None:
    if _S.drawn:
        _S.term.write("\r\x1b[2K")
        _S.drawn = False


def _emit(lines: list[str], stream: TextIO | None = None) -> None:
    """Write finished lines above the live stage line (which is redrawn after them)."""
    stream = stream or _S.term
    with _S.lock:
        if stream is _S.term:
            _clear()
        for line in lines:
            stream.write(line + "\n")
        stream.flush()
        if stream is _S.term and _S.line is not None:
            _S.line.draw(force=True)


def info(msg: str) -> None:
    """A status line (stderr); not shown with -q. Also written to the log file."""
    log.debug("%s", msg, extra={"terminal": False})
    if _S.level > QUIET:
        _emit(wrap(msg))


def error(msg: str) -> None:
    """``error: msg`` on stderr as one line, never wrapped or cut (a message is searched
    for and copied whole: paths, field names); always shown."""
    log.error("%s", msg, extra={"terminal": False})
    logs.keep()  # a log that still lives in a temporary file is kept for the reader
    _emit([f"error: {' '.join(str(msg).split())}"])


def data(text: str) -> None:
    """Data for stdout (a table): the only thing ``harness`` writes there."""
    with _S.lock:
        _S.out.write(text if text.endswith("\n") else text + "\n")
        _S.out.flush()


def terminal() -> TextIO:
    """The stream status lines go to (the real stderr, also while ``capture`` is active)."""
    return _S.term


def level() -> int:
    return _S.level


def heading(msg: str) -> None:
    """The line that opens an experiment's stage lines."""
    info(fit(msg))


# ---------------------------------------------------------------- progress bars

def progress(total: int | None = None, initial: int = 0, desc: str | None = None, unit: str = "it",
             **tqdm_kwargs):
    """A progress bar for long work inside a stage (tqdm-compatible subset).

    With the console configured it is drawn inside the current stage line (nothing
    is drawn on a non-interactive terminal); without it, a tqdm bar on stderr."""
    if not _S.enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, **tqdm_kwargs)
    return Progress(_S.line, total, initial, desc, unit)


def phase(text: str) -> None:
    """What the current stage is doing now (e.g. "lm-eval"), shown in its line."""
    line = _S.line
    if line is not None:
        line.phase = text
        line.draw(force=True)
    log.debug("phase: %s", text)


# ---------------------------------------------------------------- stage lines

class Line:
    """One stage's line: drawn live on a terminal, written once when the stage ends."""

    def __init__(self, label: str, name: str):
        self.label, self.name = label, name
        self.t0 = time.perf_counter()
        self.wall0 = time.time()
        self.bar: Progress | None = None
        self.done_bars: list[dict] = []
        self.phase = ""
        self.summary: str | None = None
        self.kept = False
        self.silent = False
        self._drawn_at = 0.0

    def _prefix(self, time_text: str) -> str:
        return f"{self.label:<{LABEL_W}} {self.name:<{NAME_W}} {time_text:>{TIME_W}}  "

    def draw(self, force: bool = False) -> None:
        """Redraw the live line (interactive terminal only, at most 10 times a second)."""
        if not (_S.enabled and _S.tty and _S.level > QUIET and _S.line is self):
            return
        now = time.perf_counter()
        if not force and now - self._drawn_at < 0.1:
            return
        self._drawn_at = now
        cols = width() - 1  # never touch the last column: some terminals wrap there
        prefix = self._prefix(clock(now - self.t0))
        if self.bar is not None:
            body = self.bar.text(cols - len(prefix), _utf8(_S.term))
        else:
            body = self.phase + " …" if self.phase else "…"
        if self.bar is not None and self.phase and not self.bar.desc:
            body = fit(f"{self.phase} {body}", cols - len(prefix))
        with _S.lock:
            _S.term.write("\r\x1b[2K" + fit(prefix + body, cols))
            _S.term.flush()
            _S.drawn = True

    def done(self, summary: str, kept: bool = False) -> None:
        """The stage's result in a few numbers; ``kept``: finished by an earlier run."""
        self.summary, self.kept = summary, kept

    def skip(self) -> None:
        """The stage does not apply (e.g. no SFT data): no line at all."""
        self.silent = True

    def report(self, stage_dir: Path | str, baseline: Path | str | None = None) -> None:
        """Summarise a finished stage from its ``manifest.json``; a manifest older than this
        line means an earlier run finished the stage. No manifest: no line."""
        manifest = Path(stage_dir) / "manifest.json"
        if not manifest.exists():
            self.skip()
            return
        outputs = json.loads(manifest.read_text()).get("outputs", {})
        base = None
        if baseline is not None and (Path(baseline) / "manifest.json").exists():
            base = json.loads((Path(baseline) / "manifest.json").read_text()).get("outputs", {}).get("metrics")
        kept = manifest.stat().st_mtime < self.wall0 - 1e-3
        self.done(summarize(self.name, outputs.get("metrics", {}), baseline=base, bars=self.done_bars,
                            seconds=outputs.get("seconds")), kept=kept)

    def final_text(self, failed: bool | str = False, cols: int | None = None) -> str:
        """The finished line, cut to ``cols`` (default: the terminal's width; 0: uncut);
        ``failed``: True or the word to show instead of the time."""
        time_text = (failed if isinstance(failed, str) else "failed") if failed else \
            "kept" if self.kept else clock(time.perf_counter() - self.t0)
        text = (self._prefix(time_text) + (self.summary or "")).rstrip()
        return text if cols == 0 else fit(text, cols or width())


@contextlib.contextmanager
def stage(label: str, name: str) -> Iterator[Line]:
    """``with stage("iter 1", "generate") as line: ...; line.report(stage_dir)``.

    Draws the line while the block runs and writes it, with the summary, when
    it ends. An exception marks the line failed and records the stage for the
    error message (``failed_stage``)."""
    line = Line(label, name)
    outer = _S.line
    with _S.lock:
        if _S.enabled and outer is not None:
            _clear()
        _S.line = line
    line.draw(force=True)
    log.debug("start %s %s", label, name)
    try:
        yield line
    except BaseException as e:
        if _S.failed is None:
            _S.failed = f"{_long_label(label)} {name}".strip()
        word = "stopped" if isinstance(e, KeyboardInterrupt) else "failed"
        text = line.final_text(failed=word)
        log.info("%s (%s)", line.final_text(failed=word, cols=0), type(e).__name__, extra={"terminal": False})
        with _S.lock:
            _S.line = outer
            if _S.enabled and _S.level > QUIET:
                _emit([text])
        raise
    else:
        with _S.lock:
            _S.line = outer
            if line.silent:
                _clear()
                if outer is not None:
                    outer.draw(force=True)
                return
            text = line.final_text()
            log.info("%s", line.final_text(cols=0), extra={"terminal": False})
            if _S.enabled and _S.level > QUIET:
                _emit([text])


def _long_label(label: str) -> str:
    return label.replace("iter ", "iteration ", 1) if label.startswith("iter ") else label


def failed_stage() -> str | None:
    """The stage an exception came out of (since the last ``reset_failure``)."""
    return _S.failed


def reset_failure() -> None:
    _S.failed = None


def _tick() -> None:
    while True:
        time.sleep(0.5)
        line = _S.line
        if line is not None:
            try:
                line.draw()
            except (OSError, ValueError):
                return


# ---------------------------------------------------------------- set-up, capture

def configure(level: int = NORMAL, *, term: TextIO | None = None, out: TextIO | None = None) -> None:
    """Set up terminal output and logging for a command (called once by the CLI)."""
    _S.enabled = True
    _S.level = level
    _S.term = term or sys.stderr
    _S.out = out or sys.stdout
    _S.tty = _isatty(_S.term)
    _S.failed = None
    logs.route(level, lambda text: _emit(wrap(text)), own=log.name)
    if _S.tty and _S.ticker is None:
        _S.ticker = threading.Thread(target=_tick, name="console-ticker", daemon=True)
        _S.ticker.start()


def reset() -> None:
    """Back to library behaviour (no lines, tqdm bars); undoes ``configure``."""
    logs.reset()
    _S.enabled, _S.level, _S.line, _S.failed, _S.drawn = False, NORMAL, None, None, False
    _S.term, _S.out, _S.tty = sys.stderr, sys.stdout, False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False


@contextlib.contextmanager
def capture(env: dict | None = None) -> Iterator[None]:
    """Everything but our own lines goes to a log file while the block runs (harness.console.logs).

    The log starts in a temporary file until ``log_to`` names the run's; at the
    end the descriptors are restored. With VERBOSE nothing is redirected, but
    the log file still receives every log record. ``env`` sets environment
    variables for the block (e.g. to switch other libraries' progress bars off)."""
    out, term = _S.out, _S.term
    with logs.capture(out, term, redirect=_S.level < VERBOSE, env=env) as ours:
        if ours is not None:  # our own streams: duplicates of the original descriptors
            _S.out, _S.term = ours
        try:
            yield
        finally:
            with _S.lock:
                _clear()
                _S.out, _S.term = out, term
