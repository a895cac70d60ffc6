"""A published AlpacaEval system put on the leaderboard (``harness import-alpaca-eval``):
its outputs and annotations scored by harness.evaluate.alpaca, written as a run-like
directory ``DEST/NAME`` with one results row; likewise a model's MT-Bench judgments from a
FastChat judgment file (``harness import-mt-bench``, harness.evaluate.mt_bench).

``NAME`` follows ``experiment.name``'s rule (one safe path component: no "/", no "..", not
absolute), so the row lands in ``DEST/NAME`` and nowhere else; a ``DEST/NAME`` that holds
anything but an earlier import of a published system (a run's directory, other files) is
left alone. A missing or unreadable file, one that is not JSON, or one without an
AlpacaEval field (``output``, ``preference``) is a PublishedError naming the file, before
anything is written. Kept apart from the other report modules, which never need the
evaluation code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from harness.report.rows import PUBLISHED, RESULTS_FILE

# experiment.name's rule (harness.validate.experiment): a run directory's name is one safe path component
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class PublishedError(ValueError):
    """An import that cannot be done; the message names the file or directory and the problem."""


def _check_name(name: str) -> None:
    if not SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise PublishedError(f"--name {name!r} must be one safe path component (letters, digits, '.', '_', '-', '+'; "
                             "no '/' or '..'): it names the directory DEST/NAME")


def _imported_before(target: Path) -> bool:
    """``target`` holds only a results.jsonl of imported published rows (an earlier import)."""
    if {p.name for p in target.iterdir()} != {RESULTS_FILE} or not (target / RESULTS_FILE).is_file():
        return False
    try:
        rows = [json.loads(line) for line in (target / RESULTS_FILE).read_text(encoding="utf-8").splitlines()
                if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return bool(rows) and all(isinstance(r, dict) and r.get("method") == PUBLISHED
                              and isinstance(r.get("provenance"), dict) and "imported_from" in r["provenance"]
                              for r in rows)


def _check_file(path: Path, field: str, what: str) -> None:
    """``path`` is a JSON AlpacaEval ``what`` file whose records have ``field``."""
    if not path.is_file():
        raise PublishedError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'} "
                             f"(expected the AlpacaEval {what} file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise PublishedError(f"{path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise PublishedError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise PublishedError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    records = data if isinstance(data, list) else None
    if not records or not all(isinstance(r, dict) for r in records):
        raise PublishedError(f"{path}: expected a JSON list of records (the AlpacaEval {what} file)")
    lacking = next((i for i, r in enumerate(records) if field not in r), None)
    if lacking is not None:
        raise PublishedError(f"{path}: record {lacking} has no {field!r} field; is it an AlpacaEval {what} file?")


def _target(dest: Path | str, name: str) -> Path:
    """``dest/name``, checked to be a new directory or one an earlier import wrote."""
    _check_name(name)
    target = Path(dest) / name
    if target.exists() and not target.is_dir():
        raise PublishedError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not _imported_before(target):
        raise PublishedError(f"{target}: holds something other than an imported published system (a run?); "
                             "choose another --name or --dest")
    return target


def import_published(dest: Path | str, name: str, outputs: Path | str, annotations: Path | str) -> Path:
    """The results.jsonl written for the system ``name`` in ``dest/name``."""
    target = _target(dest, name)
    _check_file(Path(outputs), "output", "model outputs")
    _check_file(Path(annotations), "preference", "annotations")
    from harness.evaluate.published import write_published_run

    try:
        return write_published_run(target, name, Path(outputs), Path(annotations))
    except (ValueError, KeyError) as e:  # a file alpaca_eval's loader or our scoring cannot use
        raise PublishedError(str(e).splitlines()[0] if str(e) else f"{type(e).__name__} scoring {name}") from None


def import_mt_bench(dest: Path | str, name: str, judgments: Path | str, model: str | None = None) -> Path:
    """The results.jsonl written for ``model``'s judgments (default: ``name``) of a FastChat
    single-grading file (``model_judgment/gpt-4_single.jsonl``) in ``dest/name``."""
    target = _target(dest, name)
    path = Path(judgments)
    if not path.is_file():
        raise PublishedError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'} "
                             "(expected a FastChat judgment file, model_judgment/<judge>_single.jsonl)")
    from harness.evaluate.published import write_published_mt_bench

    try:
        return write_published_mt_bench(target, name, path, model or name)
    except (OSError, UnicodeDecodeError) as e:
        raise PublishedError(f"{path}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise PublishedError(f"{path}: not JSON lines ({e.msg} at line {e.lineno})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise PublishedError(str(e).splitlines()[0] if str(e) else f"{type(e).__name__} reading {path}") from None
