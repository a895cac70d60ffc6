"""Several runs at once: ``harness run --jobs N`` as N ``harness run`` processes at a time.

Each process runs one experiment and seed, so each stays resumable on its own; on a machine with
several GPUs each sees one (``CUDA_VISIBLE_DEVICES``). The standard library's executor over
subprocesses is all the scheduling this needs (no scheduler of our own; for a SLURM cluster,
submit one ``harness run FILE --seeds k`` per job).

Each child runs in its own process group tied to this process (``harness.lifeline.spawn``):
however this process ends (kill -9 included) its children and everything they started end
too, and their run locks with them; an interrupt (Ctrl-C) stops the running children first.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from harness import console
from harness.fmt import duration, short_path
from harness.lifeline import spawn, stop_group
from harness.report import combined_board


def run_parallel(cfgs: list, *, jobs: int, fresh: bool, overrides: list[str] = ()) -> int:
    """``--jobs N``: the runs (experiments x seeds) as N processes at a time, each a plain
    ``harness run`` of one experiment and seed (so each stays resumable on its own), with the
    command line's ``--set`` ``overrides`` (the child validates and runs the same config). On a
    machine with several GPUs each process sees one (CUDA_VISIBLE_DEVICES); its output goes to
    its run's harness.log, and this process prints one line per run, then the leaderboard."""
    gpus = _gpu_count()
    slots: queue.Queue = queue.Queue()
    for i in range(jobs):
        slots.put(i % gpus if gpus > 1 else None)

    live: set[subprocess.Popen] = set()  # the children running now
    lock = threading.Lock()              # guards live and stopping
    stopping = False                     # set on an interrupt: no child starts after it

    def one(cfg):
        slot = slots.get()
        env = dict(os.environ)
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        cmd = [sys.executable, "-m", "harness.cli", "run", "-q", cfg.source, *(["--fresh"] if fresh else []),
               *(["--seeds", str(cfg.experiment.seed)] if cfg.experiment.seeds else []),
               *(arg for text in overrides for arg in ("--set", text))]
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
            slots.put(slot)
        return cfg, subprocess.CompletedProcess(cmd, child.returncode, out, err), time.perf_counter() - t0

    console.info(f"{console.plural(len(cfgs), 'run')}, {jobs} at a time"
                 + (f", one GPU each of {gpus}" if gpus > 1 else ""))
    failed = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            for cfg, proc, seconds in pool.map(one, cfgs):
                name = f"{cfg.experiment.name}" + (f" seed {cfg.experiment.seed}" if cfg.experiment.seeds else "")
                if proc.returncode == 0:
                    console.info(f"{name}: done in {duration(seconds)} ({short_path(cfg.run_dir)})")
                else:
                    failed += 1
                    errors = ([x for x in proc.stderr.splitlines() if x.startswith("error:")]
                              or proc.stderr.splitlines()[-1:])
                    console.error(f"{name}: failed (exit {proc.returncode}): " + " / ".join(errors))
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
    done = [cfg.run_dir for cfg in cfgs if (cfg.run_dir / "results.jsonl").exists()]
    if done:
        table, written, _ = combined_board(done, width=console.width())
        console.data(table)
        if written:
            console.info(f"leaderboard: {', '.join(short_path(p) for p in written)}")
    return 1 if failed else 0


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001  (no usable CUDA: CPU runs)
        return 0
