"""Result rows: the per-run ``results.jsonl`` files, found, read and checked.

A row there is::

    {"experiment": str, "method": str, "iteration": int (0 = starting model),
     "model": str (optional), "metrics": {flat metric name: number or null}, "provenance": {...}}

An imported published AlpacaEval system has method ``PUBLISHED`` and iteration 0.
Not here: what the metrics mean (harness.metrics) or how rows become a table
(harness.report.table). The loop writes the rows.
"""

from __future__ import annotations

import json
from numbers import Real
from pathlib import Path
from typing import Any, Sequence

RESULTS_FILE = "results.jsonl"
PUBLISHED = "published"  # the method of an imported AlpacaEval system's row


class ResultsError(ValueError):
    """A results path or row that cannot be used; the message names the file (and line)."""


def _result_files(path: Path) -> list[Path]:
    if not path.exists():
        raise ResultsError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    if (path / RESULTS_FILE).is_file():
        return [path / RESULTS_FILE]
    found = sorted(path.rglob(RESULTS_FILE))
    if not found:
        raise ResultsError(f"{path}: no {RESULTS_FILE} in this directory or below it")
    return found


def _check_row(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise ResultsError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key, typ in (("experiment", str), ("method", str), ("iteration", int), ("metrics", dict)):
        value = row.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ResultsError(f"{where}: field {key!r} must be {typ.__name__}, got {value!r}")
    for key, value in row["metrics"].items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
            raise ResultsError(f"{where}: metrics[{key!r}] must be a number or null, got {value!r}")
    if row.get("model") is not None and not isinstance(row["model"], str):
        raise ResultsError(f"{where}: field 'model' must be a string, got {row['model']!r}")
    prov = row.get("provenance") or {}
    if not isinstance(prov, dict):
        raise ResultsError(f"{where}: field 'provenance' must be an object")
    return {**row, "provenance": prov, "source": where.rsplit(":", 1)[0]}


def load_rows(paths: Sequence[Path]) -> list[dict]:
    """Rows of every results.jsonl under ``paths`` (run dirs, parent dirs or the files).

    A missing path, a directory without results, a malformed line or a bad field
    raises ResultsError naming the file and line. Within one file a later row for
    the same (experiment, method, iteration) replaces an earlier one (a
    re-evaluation); the same key in two different files is an error, since
    picking one would silently hide the other.
    """
    files: dict[Path, None] = {}
    for p in paths:
        for f in _result_files(Path(p)):
            files.setdefault(f.resolve(), None)
    rows: dict[tuple, dict] = {}
    for f in files:
        with open(f) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{f}:{lineno}"
                try:
                    row = _check_row(json.loads(line), where)
                except json.JSONDecodeError as e:
                    raise ResultsError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                key = (row["experiment"], row["method"], row["iteration"])
                if key in rows and rows[key]["source"] != row["source"]:
                    raise ResultsError(f"{where}: {key} is also in {rows[key]['source']}; "
                                       "pass only one of the two run directories")
                rows[key] = row
    return list(rows.values())
