"""A published AlpacaEval system put on the leaderboard (``harness import-alpaca-eval``):
its outputs and annotations scored by harness.evaluate.alpaca, written as a run-like
directory ``DEST/NAME`` with one results row.

Kept apart from the other report modules, which never need the evaluation code.
"""

from __future__ import annotations

from pathlib import Path

from harness.evaluate.alpaca import write_published_run


def import_published(dest: Path | str, name: str, outputs: Path | str, annotations: Path | str) -> Path:
    """The results.jsonl written for the system ``name`` below ``dest``."""
    return write_published_run(Path(dest) / name, name, Path(outputs), Path(annotations))
