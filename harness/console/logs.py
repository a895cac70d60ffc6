"""The run's log file and the capture of everything that is not the harness's own lines.

While ``capture`` is active, file descriptors 1 and 2 themselves point at the log file
(``RUN_DIR/harness.log`` once ``log_to`` names it, a temporary file before), so even
output of C extensions and child processes (``git``'s "fatal: ...") lands there, and a
logging handler writes every log record to it. The caller gets duplicates of the
original descriptors to write its own lines to.

Also which log records reach the terminal (``route``: the harness's warnings and
errors; every record with VERBOSE), handed to a function that writes them. Not the
terminal itself: its lines and how they are drawn are harness.console.terminal's (which wraps
``capture`` and calls ``route``). This module imports nothing of the harness.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, TextIO

QUIET, NORMAL, VERBOSE = -1, 0, 1  # what the terminal shows: only data and errors, our lines, everything
LOG_NAME = "harness.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.path: Path | None = None
        self.file: TextIO | None = None
        self.temp: Path | None = None
        self.handler: logging.Handler | None = None
        self.redirected: tuple[int, int] | None = None  # saved fds 1 and 2
        self.keep = False
        self.level = NORMAL
        self.term_handler: logging.Handler | None = None


_S = _State()


# ---------------------------------------------------------------- log records on the terminal

class _TerminalFilter(logging.Filter):
    def __init__(self, own: str):
        super().__init__()
        self.own = own

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "terminal", True):
            return False
        if _S.level >= VERBOSE:
            return not (record.name == self.own and record.levelno < logging.INFO)  # (our lines say it)
        ours = record.name == "harness" or record.name.startswith("harness.")
        return ours and record.levelno >= logging.WARNING and _S.level > QUIET


class _TerminalHandler(logging.Handler):
    def __init__(self, emit: Callable[[str], None]):
        super().__init__(logging.DEBUG)
        self.emit_text = emit

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if _S.level >= VERBOSE:
                text = f"{record.levelname.lower()} {record.name}: {msg}"
            else:
                text = f"{record.levelname.lower()}: {msg}"
            self.emit_text(text)
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)


def route(level: int, emit: Callable[[str], None], own: str) -> None:
    """Log records to the terminal through ``emit``: the harness's warnings and errors
    (with VERBOSE every record but ``own``'s debug lines, whose text is on the terminal
    already); none with a record's ``extra={"terminal": False}``. Python warnings
    become log records; other libraries' chatter is turned down."""
    _S.level = level
    root = logging.getLogger()
    if _S.term_handler is not None:
        root.removeHandler(_S.term_handler)
    _S.term_handler = _TerminalHandler(emit)
    _S.term_handler.addFilter(_TerminalFilter(own))
    root.addHandler(_S.term_handler)
    root.setLevel(logging.DEBUG if level >= VERBOSE else logging.INFO)
    logging.getLogger("harness").setLevel(logging.DEBUG)
    for noisy in ("matplotlib", "PIL", "urllib3", "filelock", "fsspec", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.INFO if level >= VERBOSE else logging.WARNING)
    logging.captureWarnings(True)


# ---------------------------------------------------------------- the log file


def log_path() -> Path | None:
    """The log file everything silenced goes to (None outside ``capture``)."""
    return _S.path


def keep() -> None:
    """Keep the log even while it still lives in a temporary file (an error happened: it is for the reader)."""
    _S.keep = True


def _open(path: Path) -> TextIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8", errors="replace", buffering=1)


def log_to(path: Path | str) -> None:
    """Send the log (and, when captured, fds 1 and 2) to ``path`` from now on, appending;
    what was logged before the path was known is moved there too."""
    path = Path(path)
    if _S.file is None or _S.path == path:
        return
    with _S.lock:
        sys.stdout.flush()
        sys.stderr.flush()
        new = _open(path)
        new.write(f"---- {time.strftime('%Y-%m-%d %H:%M:%S')} harness {' '.join(sys.argv[1:])}\n")
        if _S.temp is not None and _S.path == _S.temp:
            _S.file.flush()
            new.write(_S.temp.read_text(encoding="utf-8", errors="replace"))
        new.flush()
        if _S.redirected is not None:
            os.dup2(new.fileno(), 1)
            os.dup2(new.fileno(), 2)
        if _S.handler is not None:
            _S.handler.setStream(new)
        old, _S.file, _S.path = _S.file, new, path
        old.close()


class _LogWriter(io.TextIOBase):
    """sys.stdout / sys.stderr while captured: whatever the log file is now (it moves with ``log_to``)."""

    def write(self, text: str) -> int:
        f = _S.file
        return f.write(text) if f is not None else len(text)

    def flush(self) -> None:
        if _S.file is not None:
            _S.file.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        if _S.file is None:
            raise io.UnsupportedOperation("fileno")
        return _S.file.fileno()

    @property
    def encoding(self) -> str:
        return "utf-8"


def _dup(fd: int, like: TextIO) -> TextIO:
    return open(os.dup(fd), "w", encoding=getattr(like, "encoding", None) or "utf-8", errors="replace",
                buffering=1, closefd=True)


@contextlib.contextmanager
def capture(out: TextIO, term: TextIO, *, redirect: bool = True,
            env: dict | None = None) -> Iterator[tuple[TextIO, TextIO] | None]:
    """Everything goes to a log file while the block runs (see the module doc).

    With ``redirect``, fds 1 and 2 (and sys.stdout / sys.stderr) point at the log and
    the block gets (stdout, stderr) streams on duplicates of the original descriptors,
    encoded like ``out`` and ``term``; without it nothing is redirected (None), but the
    log still receives every log record. ``env`` sets environment variables for the
    block. At the end the descriptors are restored and a temporary log is removed
    (unless ``keep`` was called)."""
    fd, tmp = tempfile.mkstemp(prefix="harness-", suffix=".log")
    os.close(fd)
    _S.keep = False
    _S.temp = _S.path = Path(tmp)
    _S.file = _open(_S.temp)
    _S.handler = logging.StreamHandler(_S.file)
    _S.handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(_S.handler)
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    ours = None
    if redirect:
        sys.stdout.flush()
        sys.stderr.flush()
        _S.redirected = (os.dup(1), os.dup(2))
        ours = (_dup(_S.redirected[0], out), _dup(_S.redirected[1], term))
        os.dup2(_S.file.fileno(), 1)
        os.dup2(_S.file.fileno(), 2)
    streams = (sys.stdout, sys.stderr)
    if _S.redirected is not None:  # also the Python objects, should they not be writing to fds 1 and 2
        sys.stdout = sys.stderr = _LogWriter()
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # each warning once per place, into the log
        try:
            yield ours
        finally:
            with _S.lock:
                sys.stdout.flush()
                sys.stderr.flush()
                sys.stdout, sys.stderr = streams
                if _S.redirected is not None:
                    os.dup2(_S.redirected[0], 1)
                    os.dup2(_S.redirected[1], 2)
                    for saved in _S.redirected:
                        os.close(saved)
                    _S.redirected = None
                    for stream in ours or ():
                        stream.flush()
                        stream.close()
                root.removeHandler(_S.handler)
                _S.handler = None
                _S.file.close()
                _S.file = None
                if _S.path != _S.temp or not _S.keep:
                    _S.temp.unlink(missing_ok=True)
                _S.path = _S.temp = None
                _S.keep = False
                for k, v in saved_env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


def reset() -> None:
    """Undo ``route`` (and take off a log handler a capture left)."""
    root = logging.getLogger()
    for h in (_S.term_handler, _S.handler):
        if h is not None:
            root.removeHandler(h)
    _S.term_handler = _S.handler = None
    _S.level = NORMAL
    logging.captureWarnings(False)
