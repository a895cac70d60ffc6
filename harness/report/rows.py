"""Result rows: the per-run ``results.jsonl`` files, found, read and checked.

A row there is::

    {"experiment": str, "method": str, "iteration": int (0 = starting model),
     "model": str (optional), "seed": int (optional; the run's seed), "metrics": {flat metric name: number or null},
     "sweep": {dotted config key: value} (optional; the run's sweep point, ``harness run --sweep``),
     "paired": {metric: {"n", "mean", "se", "ci_low", "ci_high", "significant"}} (optional; the gain over
     iteration 0 of the same run on their shared items), "protocol": {"alpaca_eval": {...}} (optional;
     how its AlpacaEval numbers were made, harness.report.protocol), "provenance": {...}}

An imported published AlpacaEval system has method ``PUBLISHED`` and iteration 0. Rows of
several seeds of one experiment (``harness run --seeds``) differ only in ``seed``; the table
shows them as one row (harness.report.table); rows of two sweep points differ in ``sweep``.
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
    seed = row.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ResultsError(f"{where}: field 'seed' must be an integer, got {seed!r}")
    if row.get("sweep") is not None and not isinstance(row["sweep"], dict):
        raise ResultsError(f"{where}: field 'sweep' must map config keys to values, got {row['sweep']!r}")
    paired = row.get("paired")
    if paired is not None and not (isinstance(paired, dict) and all(isinstance(v, dict) for v in paired.values())):
        raise ResultsError(f"{where}: field 'paired' must map metrics to objects")
    if row.get("model") is not None and not isinstance(row["model"], str):
        raise ResultsError(f"{where}: field 'model' must be a string, got {row['model']!r}")
    protocol = row.get("protocol")
    if protocol is not None and not (isinstance(protocol, dict) and all(isinstance(v, dict)
                                                                        for v in protocol.values())):
        raise ResultsError(f"{where}: field 'protocol' must map evaluations to objects")
    prov = row.get("provenance") or {}
    if not isinstance(prov, dict):
        raise ResultsError(f"{where}: field 'provenance' must be an object")
    return {**row, "provenance": prov, "source": where.rsplit(":", 1)[0]}


def point_key(row: dict) -> str:
    """A row's sweep point as text that tells points apart ("" outside a sweep)."""
    return json.dumps(row["sweep"], sort_keys=True, default=str) if row.get("sweep") else ""


def load_rows(paths: Sequence[Path]) -> list[dict]:
    """Rows of every results.jsonl under ``paths`` (run dirs, parent dirs or the files).

    A missing path, a directory without results, a malformed line or a bad field
    raises ResultsError naming the file and line (also a file that is not UTF-8 text).
    Within one file a later row for the same (experiment, sweep point, method, iteration, seed)
    replaces an earlier one (a re-evaluation); the same key in two different files is
    an error, since picking one would silently hide the other. Rows that differ only
    in their seed are all kept.
    """
    files: dict[Path, None] = {}
    for p in paths:
        for f in _result_files(Path(p)):
            files.setdefault(f.resolve(), None)
    rows: dict[tuple, dict] = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                lines = fh.read().splitlines()
        except OSError as e:
            raise ResultsError(f"{f}: cannot be read ({e.strerror or e})") from None
        for lineno, raw in enumerate(lines, 1):
            where = f"{f}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ResultsError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") \
                    from None
            if not line.strip():
                continue
            try:
                row = _check_row(json.loads(line), where)
            except json.JSONDecodeError as e:
                raise ResultsError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            key = (row["experiment"], row["method"], row["iteration"], row.get("seed"), point_key(row))
            if key in rows and rows[key]["source"] != row["source"]:
                shown = key[:3] + ((f"seed {key[3]}",) if key[3] is not None else ()) + ((key[4],) if key[4] else ())
                raise ResultsError(f"{where}: {shown} is also in {rows[key]['source']}; "
                                   "pass only one of the two run directories")
            rows[key] = row
    return list(rows.values())
