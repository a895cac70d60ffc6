"""The layout of a run directory, spelled in one place.

::

    config.json                 resolved config (+ hash) of the run
    provenance.json             versions, commit, hardware (rewritten each start)
    run.lock                    held by the running process (fcntl lock)
    harness.log                 everything other libraries printed, and our debug log
    iter_000/init_sft/ evaluate/ validation/    iteration 0 = the starting model
    iter_001/self_instruct/ generate/ judge/ pairs/ train/ evaluate/ validation/
    <stage>.tmp/                a stage being computed (renamed into place when done)
    results.jsonl               derived: one row per evaluated iteration
    final.json                  the method's final iterate

This module only names paths; ``harness.store.files`` writes them and ``harness.run.reuse``
decides when a stage directory may be reused.
"""

from __future__ import annotations

import re
from pathlib import Path

MANIFEST = "manifest.json"   # written last inside a stage directory: its existence means "done"
TMP_SUFFIX = ".tmp"
_ITER = re.compile(r"iter_(\d{3,})")


class RunDir:
    """Paths of one run directory."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # files of the whole run
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def results(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def final(self) -> Path:
        return self.root / "final.json"

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    @property
    def log(self) -> Path:
        return self.root / LOG_FILE

    def is_run(self) -> bool:
        """Whether ``root`` holds a run (its config.json and provenance.json, written at its
        start) or results the leaderboard reads (results.jsonl: a run, or an imported
        published system): a directory whose files are its own."""
        return (self.config.is_file() and self.provenance.is_file()) or self.results.is_file()

    # stages
    def iteration(self, t: int) -> Path:
        return self.root / f"iter_{t:03d}"

    def stage(self, t: int, name: str) -> Path:
        return self.iteration(t) / name

    def manifest(self, t: int, name: str) -> Path:
        return self.stage(t, name) / MANIFEST

    def pairs(self, t: int) -> Path:
        """The pairs an iteration built (read again by later iterations' replay)."""
        return self.stage(t, "pairs") / "pairs.jsonl"

    def alpaca_generations(self, t: int, stage: str = "evaluate") -> Path:
        """The model's AlpacaEval answers of iteration ``t`` (iteration 0's are the reference of a
        head-to-head evaluation)."""
        return self.stage(t, stage) / "alpaca_eval" / "generations.jsonl"

    def stage_dirs(self) -> list[tuple[int, Path]]:
        """(iteration, directory) of every stage directory, finished (``<name>``) or partial
        (``<name>.tmp``), in iteration and name order."""
        out = []
        for it in sorted(self.root.glob("iter_*")):
            m = _ITER.fullmatch(it.name)
            if m and it.is_dir():
                out += [(int(m.group(1)), st) for st in sorted(it.iterdir()) if st.is_dir()]
        return out


RESULTS_FILE = "results.jsonl"
LOG_FILE = "harness.log"
