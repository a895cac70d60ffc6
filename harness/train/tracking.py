"""Experiment tracking: training curves and every iteration's results row sent to the trackers
people use ([tracking] report_to, trl's names: tensorboard, wandb, mlflow, trackio).

``results.jsonl`` stays the source of truth. A tracker is written to, never read back: nothing
the harness decides (reuse, resume, tables) depends on it, and [tracking] is not part of the
config hash nor read by any stage (changing it reruns nothing).

- **Per-step training curves**: every trainer the loop runs reports to the named trackers
  (``trainer_settings``: trl's ``report_to``, run name ``<experiment>/seed-<k>``, or the
  experiment's name without seeds: the run directory below output_dir, ``run_name``;
  project = the experiment). TensorBoard's events of a training
  stage go to ``RUN_DIR/tracking/<iteration>-<stage>`` (``iter_001-train``, ``iter_000-init_sft``):
  one TensorBoard run per stage, since each stage's steps count from 0. That directory is
  emptied when the stage starts training, so an interrupted attempt's points are not kept beside
  the finishing attempt's.
- **One entry per iteration**: the results row's numeric metrics at step = iteration, logged
  when the loop writes the row of an iteration one of whose stages ran in this process
  (``Tracker.log_row``): a resumed run that reuses a finished iteration does not log it twice.
  TensorBoard: ``RUN_DIR/tracking/iterations``, tags ``iteration/<metric>``; W&B: the same keys
  in the run's history with "iteration" as their step metric.
- **W&B**: one run per seed run (name as above, group = the experiment, files under
  ``RUN_DIR/tracking/wandb``), opened when the loop starts and finished when it ends; trl's
  callback writes the training curves into it. While the hub is off (HARNESS_ONLINE is not 1)
  and WANDB_MODE is unset it runs offline (``wandb sync`` uploads it later).
- **mlflow, trackio**: trl's per-step curves only (their callbacks open and close their own
  runs); the per-iteration entries go to TensorBoard and W&B.

Failure: a tracker's package missing is a validate error (``problems``); a tracker that fails
while the loop runs fails the run, as any other error does.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from harness.store.rundir import TMP_SUFFIX
from harness.config.schema import FieldError

# trl's name -> (the module it imports, how to install it)
EXTRA = 'install the "tracking" extra (pip install -e ".[tracking]"; ./install.sh installs it)'
TRACKERS = {"tensorboard": ("tensorboard", EXTRA), "wandb": ("wandb", EXTRA),
            "mlflow": ("mlflow", "pip install mlflow"), "trackio": ("trackio", "pip install trackio")}
SUBDIR = "tracking"          # RUN_DIR/tracking holds every tracker's local files
ITERATIONS = "iterations"    # the TensorBoard run of the per-iteration entries
ITERATION_PREFIX = "iteration/"


def problems(report_to, where: str = "tracking.report_to") -> list[FieldError]:
    """One error per named tracker whose package is not installed, naming what to install."""
    out = []
    for i, name in enumerate(report_to):
        module, install = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            out.append(FieldError(f"{where}[{i}]", f"{name!r} needs the package {module!r}, which is not "
                                                   f"installed: {install}"))
    return out


def run_name(cfg, root: Path) -> str:
    """The run directory ``root`` below experiment.output_dir: ``<experiment>/seed-<k>`` for a run
    of a seed list, the experiment's name without seeds (a sweep point's levels and a --fresh
    directory's suffix included, so no two run directories share a name); for a directory
    elsewhere, that formula from the config alone."""
    try:
        return Path(root).resolve().relative_to(Path(cfg.experiment.output_dir).resolve()).as_posix()
    except ValueError:
        e = cfg.experiment
        return f"{e.name}/seed-{e.seed}" if e.seeds else e.name


def stage_label(work_dir: Path) -> str:
    """``iter_001-train`` for a stage computed in ``RUN_DIR/iter_001/train.tmp``."""
    return f"{work_dir.parent.name}-{work_dir.name.removesuffix(TMP_SUFFIX)}"


def row_metrics(row: dict) -> dict[str, float]:
    """The finite numbers of a results row's metrics, keyed ``iteration/<metric>``."""
    return {ITERATION_PREFIX + k: float(v) for k, v in row["metrics"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Tracker:
    """The trackers of one run: ``report_to`` of ``cfg`` (a plain config), files under
    ``root``/tracking. With nothing to report to, every method does nothing."""

    def __init__(self, cfg, root: Path):
        self.report_to = tuple(cfg.tracking.report_to)
        self.dir = Path(root) / SUBDIR
        self.name = run_name(cfg, root)
        self.project = cfg.experiment.name
        self._cfg = cfg
        self._writer = None   # TensorBoard's writer of the per-iteration entries, opened at the first
        self._wandb = None    # the W&B run

    def open(self) -> None:
        if "wandb" in self.report_to:
            import wandb

            self.dir.mkdir(parents=True, exist_ok=True)
            mode = "offline" if os.environ.get("HARNESS_ONLINE") != "1" and not os.environ.get("WANDB_MODE") else None
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", self.project), name=self.name,
                                     group=self.project, dir=str(self.dir), config=self._cfg.to_dict(), mode=mode)
            self._wandb.define_metric("iteration")
            self._wandb.define_metric(ITERATION_PREFIX + "*", step_metric="iteration")

    def close(self, failed: bool = False) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
            self._wandb = None

    def trainer_settings(self) -> dict:
        """trl's arguments that report a trainer's steps: ``report_to`` (TensorBoard apart: it is
        the callback of ``callbacks``, which names its directory), ``run_name``, ``project``."""
        others = [n for n in dict.fromkeys(self.report_to) if n != "tensorboard"]
        return {"report_to": others or "none", "run_name": self.name, "project": self.project}

    def callbacks(self, work_dir: Path) -> list:
        """The trainer callbacks of a stage computed in ``work_dir``: TensorBoard's, writing to
        tracking/<iteration>-<stage>, emptied first (a stage's curves are its finishing attempt's)."""
        if "tensorboard" not in self.report_to:
            return []
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        logdir = self.dir / stage_label(work_dir)
        shutil.rmtree(logdir, ignore_errors=True)
        return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(logdir)))]

    def log_row(self, row: dict) -> None:
        """One entry per iteration: the row's numeric metrics at step = its iteration."""
        metrics = row_metrics(row)
        t = row["iteration"]
        if "tensorboard" in self.report_to:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.dir / ITERATIONS))
            for k, v in metrics.items():
                self._writer.add_scalar(k, v, global_step=t)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log({"iteration": t, **metrics})


_active: Tracker | None = None


@contextmanager
def session(cfg, root: Path) -> Iterator[Tracker]:
    """The run's trackers, open while the loop runs; ``active()`` returns them meanwhile."""
    global _active
    tracker = Tracker(cfg, root)
    tracker.open()
    _active, before = tracker, _active
    failed = True
    try:
        yield tracker
        failed = False
    finally:
        _active = before
        tracker.close(failed)


def active() -> Tracker | None:
    """The trackers of the running loop, or None outside one (a trainer run on its own reports nowhere)."""
    return _active
