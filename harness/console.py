"""What the harness says on the terminal, and where everything else goes.

Terminal (stderr), by default: one line per stage ("iter 1  generate  0:03
256 samples · 1,129 tokens"), with a live progress bar (counts, rate) on an
interactive terminal while the stage runs, and ``warning:`` / ``error:`` lines
of the harness's own loggers. No line is wider than ``MAX_WIDTH`` columns.
Data (tables) goes to stdout through ``data``.

Everything else (other libraries' logging, Python warnings, progress bars,
prints, and our own logging at debug level) goes to the run's log file,
``RUN_DIR/harness.log``: while ``capture`` is active, file descriptors 1 and 2
themselves point at the log file, so even output of C extensions and child
processes (``git``'s "fatal: ...") lands there; our own lines are written to
duplicates of the original descriptors.

Levels: ``QUIET`` (only data and errors), ``NORMAL``, ``VERBOSE`` (nothing is
redirected: other libraries' output and every log record are shown too).

Library use (tests, bench scripts) without ``configure``: ``stage`` draws
nothing and ``progress`` is a plain tqdm bar, as before.

This module imports nothing of the harness; the loop, training and evaluation
code import it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, TextIO

from harness.metric_names import VALIDATION

QUIET, NORMAL, VERBOSE = -1, 0, 1
MAX_WIDTH = 120
LOG_NAME = "harness.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
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
        self.log_path: Path | None = None
        self.log_file: TextIO | None = None
        self.temp_log: Path | None = None
        self.file_handler: logging.Handler | None = None
        self.term_handler: logging.Handler | None = None
        self.redirected: tuple[int, int] | None = None  # saved fds 1 and 2
        self.ticker: threading.Thread | None = None
        self.keep_log = False


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
    """``text`` cut to ``cols`` columns with an ellipsis."""
    cols = cols or width()
    return text if len(text) <= cols else text[: cols - 1] + "…"


def wrap(text: str, cols: int | None = None, indent: str = "  ") -> list[str]:
    """Lines of ``text`` wrapped to ``cols`` columns (continuations indented); long words are split."""
    cols = cols or width()
    out: list[str] = []
    for para in str(text).splitlines() or [""]:
        out += textwrap.wrap(para, cols, subsequent_indent=indent, break_on_hyphens=False) or [""]
    return out


def duration(seconds: float) -> str:
    """0.4s, 12.3s, 4:05, 1:02:03."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def plural(n: int, word: str) -> str:
    """``plural(1, "iteration")`` -> "1 iteration"; ``plural(3, "iteration")`` -> "3 iterations"."""
    return f"{n} {word}{'s' * (n != 1)}"


def number(v: Any, digits: int = 3) -> str:
    """A compact number: integers with thousands separators, floats to ``digits`` significant-ish digits."""
    if v is None:
        return "n/a"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or (abs(v) >= 1000 and float(v).is_integer()):
        return f"{int(v):,}"
    a = abs(v)
    decimals = 0 if a >= 1000 else 1 if a >= 100 else 2 if a >= 1 else digits
    return f"{v:,.{decimals}f}"


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
    _S.keep_log = True  # a log that still lives in a temporary file is kept for the reader
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

class Progress:
    """A count with a rate, drawn inside the current stage line (tqdm's update/set_postfix/close)."""

    def __init__(self, line: Line | None, total: int | None, initial: int, desc: str | None, unit: str):
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

    def text(self, cols: int) -> str:
        """``desc ━━━━━━──── 128/256 samples · 1,900/s · 8,760 tok/s`` within ``cols`` columns."""
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
            full, empty = ("━", "─") if _utf8(_S.term) else ("#", "-")
            w = min(24, room)
            k = int(w * min(1.0, self.n / self.total))
            head += full * k + empty * (w - k) + " "
        return fit(head + tail, cols)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):  # tqdm(iterable) is not supported; progress is counted with update()
        raise TypeError("console.progress counts with update(); it does not wrap an iterable")


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

    def _prefix(self, clock: str) -> str:
        return f"{self.label:<{LABEL_W}} {self.name:<{NAME_W}} {clock:>{TIME_W}}  "

    def draw(self, force: bool = False) -> None:
        """Redraw the live line (interactive terminal only, at most 10 times a second)."""
        if not (_S.enabled and _S.tty and _S.level > QUIET and _S.line is self):
            return
        now = time.perf_counter()
        if not force and now - self._drawn_at < 0.1:
            return
        self._drawn_at = now
        cols = width() - 1  # never touch the last column: some terminals wrap there
        prefix = self._prefix(duration(now - self.t0))
        body = self.bar.text(cols - len(prefix)) if self.bar is not None else (self.phase + " …" if self.phase else "…")
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
        clock = (failed if isinstance(failed, str) else "failed") if failed else \
            "kept" if self.kept else duration(time.perf_counter() - self.t0)
        text = (self._prefix(clock) + (self.summary or "")).rstrip()
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


# ---------------------------------------------------------------- summaries

def _pct(v: Any) -> str:
    """1.0 -> 100%, 0.987 -> 98.7%."""
    if not isinstance(v, (int, float)):
        return "n/a"
    return f"{100 * v:.0f}%" if v in (0, 1) else f"{100 * v:.1f}%"


def _delta(v: Any, base: dict | None, key: str, digits: int = 3, parens: bool = True) -> str:
    """" (+0.047)": the change against iteration 0's value, when there is one."""
    b = (base or {}).get(key)
    if not isinstance(v, (int, float)) or not isinstance(b, (int, float)):
        return ""
    d = f"{v - b:+.{digits}f}"
    return f" ({d})" if parens else f" {d}"


def win_rate_text(m: dict, base: dict | None = None) -> str | None:
    """``win rate 28.0±3.6 (+1.5), n=100, 100% judged`` from flat alpaca_eval/* metrics."""
    wr = m.get("alpaca_eval/win_rate")
    if not isinstance(wr, (int, float)):
        return None
    se = m.get("alpaca_eval/standard_error")
    text = f"win rate {wr:.1f}" + (f"±{se:.1f}" if isinstance(se, (int, float)) else "")
    text += _delta(wr, base, "alpaca_eval/win_rate", 1)
    n, cov = m.get("alpaca_eval/n_total"), m.get("alpaca_eval/coverage")
    if n is not None:
        text += f", n={number(n)}"
    if cov is not None:
        text += f", {_pct(cov)} judged"
    lc = m.get("alpaca_eval/length_controlled_winrate")
    if isinstance(lc, (int, float)):
        text += f" · LC {lc:.1f}"
    return text


def _evaluation_parts(m: dict, baseline: dict | None) -> list[str]:
    """lm-eval's main metric per task and the win rate, each with its change from ``baseline``."""
    parts = []
    for k in sorted(m):
        if k.startswith("lm_eval/") and "_stderr" not in k.rsplit("/", 1)[-1] and isinstance(m[k], (int, float)):
            parts.append(f"{k.split('/')[1]} {m[k]:.3f}{_delta(m[k], baseline, k, parens=False)}")
    wr = win_rate_text(m, baseline)
    if wr:
        parts.append(wr)
    return parts


def summarize(name: str, m: dict, *, baseline: dict | None = None, bars: list[dict] | None = None,
              seconds: float | None = None) -> str:
    """A stage's result in a few numbers, from its flat metrics (the stage manifest's)."""
    bars = bars or []
    g = m.get
    parts: list[str] = []
    if name in ("train", "init_sft"):
        if g("train/steps") is not None:
            parts.append(f"{number(g('train/steps'))} steps")
        if g("train/n_pairs") is not None:
            parts.append(f"{number(g('train/n_pairs'))} pairs")
        if isinstance(g("train/loss"), (int, float)):
            first = g("train/loss_first")
            parts.append("loss " + (f"{first:.3f}→" if isinstance(first, (int, float)) else "") + f"{g('train/loss'):.3f}")
        if isinstance(g("train/reward_margin"), (int, float)):
            parts.append(f"margin {g('train/reward_margin'):+.3f}")
        if isinstance(g("train/reward_accuracy"), (int, float)):
            parts.append(f"reward acc {g('train/reward_accuracy'):.2f}")
    elif name == "generate":
        samples = sum(b["n"] for b in bars if b["unit"] in ("sample", "samples"))
        if samples:
            parts.append(f"{number(samples)} samples")
        tokens = g("gen/tokens")
        if tokens is not None:
            parts.append(f"{number(tokens)} tokens")
            if seconds:
                parts.append(f"{number(tokens / seconds, 1)} tok/s")
    elif name == "judge":
        if g("judge/n_items") is not None:
            parts.append(f"{number(g('judge/n_items'))} judged")
        if g("judge/coverage") is not None:
            parts.append(f"coverage {_pct(g('judge/coverage'))}")
        if isinstance(g("judge/score_mean"), (int, float)):
            parts.append(f"mean score {g('judge/score_mean'):.2f}")
        if isinstance(g("judge/oracle_pair_agreement"), (int, float)):
            parts.append(f"oracle agreement {g('judge/oracle_pair_agreement'):.2f}")
    elif name == "pairs":
        if g("pairs/n_pairs") is not None:
            parts.append(f"{number(g('pairs/n_pairs'))} pairs")
        if g("pairs/n_prompts") is not None:
            parts.append(f"from {number(g('pairs/n_prompts'))} prompts")
    elif name == "evaluate":
        if not m:
            return "no evaluation configured"
        parts = _evaluation_parts(m, baseline)
    elif name == "validation":  # the same evaluations on validation data, plus the judge's mean score
        inner = {k.removeprefix(VALIDATION): v for k, v in m.items()}
        inner_base = {k.removeprefix(VALIDATION): v for k, v in (baseline or {}).items()} or None
        parts = _evaluation_parts(inner, inner_base)
        if isinstance(inner.get("judge/score_mean"), (int, float)):
            scored = inner.get("judge/n_scored")
            parts.append(f"judge score {inner['judge/score_mean']:.2f}"
                         + _delta(inner["judge/score_mean"], inner_base, "judge/score_mean", parens=False)
                         + (f" on {number(scored)} prompts" if scored is not None else ""))
    if not parts:  # an unknown stage: its first few numbers
        parts = [f"{k.rsplit('/', 1)[-1]} {number(v)}" for k, v in list(m.items())[:4] if isinstance(v, (int, float))]
    return " · ".join(parts)


# ---------------------------------------------------------------- logging and capture

class _TerminalFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "terminal", True):
            return False
        if _S.level >= VERBOSE:
            return not (record.name == log.name and record.levelno < logging.INFO)  # (our lines say it)
        ours = record.name == "harness" or record.name.startswith("harness.")
        return ours and record.levelno >= logging.WARNING and _S.level > QUIET


class _TerminalHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if _S.level >= VERBOSE:
                text = f"{record.levelname.lower()} {record.name}: {msg}"
            else:
                text = f"{record.levelname.lower()}: {msg}"
            _emit(wrap(text))
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)


def configure(level: int = NORMAL, *, term: TextIO | None = None, out: TextIO | None = None) -> None:
    """Set up terminal output and logging for a command (called once by the CLI)."""
    _S.enabled = True
    _S.level = level
    _S.term = term or sys.stderr
    _S.out = out or sys.stdout
    _S.tty = _isatty(_S.term)
    _S.failed = None
    root = logging.getLogger()
    for h in (_S.term_handler, _S.file_handler):
        if h is not None:
            root.removeHandler(h)
    _S.term_handler = _TerminalHandler(logging.DEBUG)
    _S.term_handler.addFilter(_TerminalFilter())
    root.addHandler(_S.term_handler)
    root.setLevel(logging.DEBUG if level >= VERBOSE else logging.INFO)
    logging.getLogger("harness").setLevel(logging.DEBUG)
    for noisy in ("matplotlib", "PIL", "urllib3", "filelock", "fsspec", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.INFO if level >= VERBOSE else logging.WARNING)
    logging.captureWarnings(True)
    if _S.tty and _S.ticker is None:
        _S.ticker = threading.Thread(target=_tick, name="console-ticker", daemon=True)
        _S.ticker.start()


def reset() -> None:
    """Back to library behaviour (no lines, tqdm bars); undoes ``configure``."""
    root = logging.getLogger()
    for h in (_S.term_handler, _S.file_handler):
        if h is not None:
            root.removeHandler(h)
    _S.term_handler = _S.file_handler = None
    logging.captureWarnings(False)
    _S.enabled, _S.level, _S.line, _S.failed, _S.drawn = False, NORMAL, None, None, False
    _S.term, _S.out, _S.tty = sys.stderr, sys.stdout, False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False


def log_path() -> Path | None:
    """The log file everything silenced goes to (None outside ``capture``)."""
    return _S.log_path


def _open_log(path: Path) -> TextIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8", errors="replace", buffering=1)


def log_to(path: Path | str) -> None:
    """Send the log (and, when captured, fds 1 and 2) to ``path`` from now on, appending;
    what was logged before the path was known is moved there too."""
    path = Path(path)
    if _S.log_file is None or _S.log_path == path:
        return
    with _S.lock:
        sys.stdout.flush()
        sys.stderr.flush()
        new = _open_log(path)
        new.write(f"---- {time.strftime('%Y-%m-%d %H:%M:%S')} harness {' '.join(sys.argv[1:])}\n")
        if _S.temp_log is not None and _S.log_path == _S.temp_log:
            _S.log_file.flush()
            new.write(_S.temp_log.read_text(encoding="utf-8", errors="replace"))
        new.flush()
        if _S.redirected is not None:
            os.dup2(new.fileno(), 1)
            os.dup2(new.fileno(), 2)
        if _S.file_handler is not None:
            _S.file_handler.setStream(new)
        old, _S.log_file, _S.log_path = _S.log_file, new, path
        old.close()


class _LogWriter(io.TextIOBase):
    """sys.stdout / sys.stderr while captured: whatever the log file is now (it moves with ``log_to``)."""

    def write(self, text: str) -> int:
        f = _S.log_file
        return f.write(text) if f is not None else len(text)

    def flush(self) -> None:
        if _S.log_file is not None:
            _S.log_file.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        if _S.log_file is None:
            raise io.UnsupportedOperation("fileno")
        return _S.log_file.fileno()

    @property
    def encoding(self) -> str:
        return "utf-8"


@contextlib.contextmanager
def capture(env: dict | None = None) -> Iterator[None]:
    """Everything but our own lines goes to a log file while the block runs (see the module doc).

    The log starts in a temporary file until ``log_to`` names the run's; at the
    end the descriptors are restored. With VERBOSE nothing is redirected, but
    the log file still receives every log record. ``env`` sets environment
    variables for the block (e.g. to switch other libraries' progress bars off)."""
    fd, tmp = tempfile.mkstemp(prefix="harness-", suffix=".log")
    os.close(fd)
    _S.keep_log = False
    _S.temp_log = Path(tmp)
    _S.log_path = _S.temp_log
    _S.log_file = _open_log(_S.temp_log)
    _S.file_handler = logging.StreamHandler(_S.log_file)
    _S.file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(_S.file_handler)
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    term, out = _S.term, _S.out
    if _S.level < VERBOSE:
        sys.stdout.flush()
        sys.stderr.flush()
        _S.redirected = (os.dup(1), os.dup(2))
        # our own streams: duplicates of the original descriptors
        _S.out = open(os.dup(_S.redirected[0]), "w", encoding=getattr(out, "encoding", None) or "utf-8",
                      errors="replace", buffering=1, closefd=True)
        _S.term = open(os.dup(_S.redirected[1]), "w", encoding=getattr(term, "encoding", None) or "utf-8",
                       errors="replace", buffering=1, closefd=True)
        os.dup2(_S.log_file.fileno(), 1)
        os.dup2(_S.log_file.fileno(), 2)
    streams = (sys.stdout, sys.stderr)
    if _S.redirected is not None:  # also the Python objects, should they not be writing to fds 1 and 2
        sys.stdout = sys.stderr = _LogWriter()
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # each warning once per place, into the log
        try:
            yield
        finally:
            with _S.lock:
                _clear()
                sys.stdout.flush()
                sys.stderr.flush()
                sys.stdout, sys.stderr = streams
                if _S.redirected is not None:
                    os.dup2(_S.redirected[0], 1)
                    os.dup2(_S.redirected[1], 2)
                    for saved in _S.redirected:
                        os.close(saved)
                    _S.redirected = None
                    for stream in (_S.out, _S.term):
                        stream.flush()
                        stream.close()
                    _S.out, _S.term = out, term
                root.removeHandler(_S.file_handler)
                _S.file_handler = None
                _S.log_file.close()
                _S.log_file = None
                if _S.log_path != _S.temp_log or not _S.keep_log:
                    _S.temp_log.unlink(missing_ok=True)
                _S.log_path = _S.temp_log = None
                _S.keep_log = False
                for k, v in saved_env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
