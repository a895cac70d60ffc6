"""Several runs at once on this machine: ``harness run --jobs N`` as N ``harness run`` processes
at a time; and what every launcher shares (``child_command``, ``run_name``, ``failure``,
``finish``; the Ray launcher is ``harness.run.launch_ray``).

Each process runs one run (experiment, sweep point, seed), so each stays resumable on its own.
A run on CUDA holds one GPU while it runs (``CUDA_VISIBLE_DEVICES`` set to it), so no two runs
ever share a card: on a one-GPU machine CUDA runs go one at a time whatever N is, and CPU runs
fill the N slots. The standard library's executor over subprocesses is all the scheduling one
machine needs; past one machine, ``--launcher ray``.

Each child runs in its own process group tied to this process (``harness.lifeline.spawn``):
however this process ends (kill -9 included) its children and everything they started end
too, and their run locks with them; an interrupt (Ctrl-C) stops the running children first.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from harness.console import terminal as console
from harness.fmt import duration, short_path
from harness.lifeline import spawn, stop_group
from harness.report import combined_board


def child_command(cfg, *, fresh: bool, overrides: Sequence[str] = ()) -> list[str]:
    """The ``harness run`` of one run (experiment, sweep point, seed) with the command line's
    ``--set`` ``overrides`` and the run's ``--sweep`` point: the child validates and runs the
    same config, into the same run directory, and resumes it when run again."""
    return [sys.executable, "-m", "harness.cli", "run", "-q", cfg.source, *(["--fresh"] if fresh else []),
            *(["--seeds", str(cfg.experiment.seed)] if cfg.experiment.seeds else []),
            *(arg for text in overrides for arg in ("--set", text)),
            *(arg for pair in cfg.point for arg in ("--sweep", pair))]


def run_name(cfg) -> str:
    """One run as the launchers' lines name it: "<experiment> <key>=<value>... seed <k>"."""
    return " ".join([cfg.experiment.name, *cfg.point, *([f"seed {cfg.experiment.seed}"] if cfg.experiment.seeds else [])])


def failure(returncode: int, stderr: str) -> str:
    """A failed child's ``error:`` lines (else its last line that is not a warning), as one line;
    a child killed by a signal says so."""
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}; rerun the same command to resume"
    lines = [x for x in stderr.splitlines() if x.strip() and ": warning: " not in x]
    return f"failed (exit {returncode}): " + " / ".join([x for x in lines if x.startswith("error:")] or lines[-1:])


def finish(cfgs: list, failed: int) -> int:
    """After the runs: the combined leaderboard of those that finished; 1 when any failed."""
    done = [cfg.run_dir for cfg in cfgs if (cfg.run_dir / "results.jsonl").exists()]
    if done:
        table, written, _ = combined_board(done, width=console.width())
        console.data(table)
        if written:
            console.info(f"leaderboard: {', '.join(short_path(p) for p in written)}")
    return 1 if failed else 0


def uses_cuda(cfg, gpus: int) -> bool:
    """Whether a run takes a GPU: model.device "cuda", or "auto" where ``gpus`` > 0 are there."""
    return cfg.model.device == "cuda" or (cfg.model.device == "auto" and gpus > 0)


def run_parallel(cfgs: list, *, jobs: int, fresh: bool, overrides: list[str] = ()) -> int:
    """``--jobs N``: the runs (experiments x sweep points x seeds) as N processes at a time, each
    ``child_command``; a run on CUDA holds one of this machine's GPUs while it runs (its
    CUDA_VISIBLE_DEVICES), so at most one run per GPU, whatever N. Each run's output goes to its
    harness.log, and this process prints one line per run, then the leaderboard."""
    devices = _visible_gpus()
    gpus: queue.Queue = queue.Queue()  # the free GPUs: a CUDA run takes one and puts it back
    for d in devices:
        gpus.put(d)

    live: set[subprocess.Popen] = set()  # the children running now
    lock = threading.Lock()              # guards live and stopping
    stopping = False                     # set on an interrupt: no child starts after it

    def one(cfg):
        gpu = gpus.get() if uses_cuda(cfg, len(devices)) else None  # waits for a free GPU
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        cmd = child_command(cfg, fresh=fresh, overrides=overrides)
        t0 = time.perf_counter()
        try:
            with lock:
                if stopping:
                    raise KeyboardInterrupt
                child = spawn(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                live.add(child)
            try:
                out, err = child.communicate()
            finally:
                with lock:
                    live.discard(child)
        finally:
            if gpu is not None:
                gpus.put(gpu)
        return cfg, subprocess.CompletedProcess(cmd, child.returncode, out, err), time.perf_counter() - t0

    on_gpu = sum(uses_cuda(cfg, len(devices)) for cfg in cfgs)
    console.info(f"{console.plural(len(cfgs), 'run')}, {jobs} at a time"
                 + (f"; those on CUDA one per GPU, {len(devices)} GPU{'s' if len(devices) > 1 else ''}" if on_gpu else ""))
    failed = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            for cfg, proc, seconds in pool.map(one, cfgs):
                if proc.returncode == 0:
                    console.info(f"{run_name(cfg)}: done in {duration(seconds)} ({short_path(cfg.run_dir)})")
                else:
                    failed += 1
                    console.error(f"{run_name(cfg)}: {failure(proc.returncode, proc.stderr)}")
        except BaseException as e:  # an interrupt: stop the children (SIGTERM, then SIGKILL) before the pool's wait
            with lock:
                stopping = True
                running = list(live)
            for child in running:
                stop_group(child, grace_s=10)
            if not isinstance(e, KeyboardInterrupt):
                raise
            console.error("interrupted; finished stages are kept: rerun the same command to resume")
            return 130
    return finish(cfgs, failed)


def _visible_gpus() -> list[str]:
    """This process's GPUs as the CUDA_VISIBLE_DEVICES entries a child gets (the parent's own
    entries where it has that variable, else 0, 1, ...); [] without usable CUDA."""
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # noqa: BLE001  (no usable CUDA: CPU runs)
        n = 0
    mine = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return mine[:n] if mine else [str(i) for i in range(n)]
