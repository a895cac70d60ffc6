"""``harness run --launcher ray [--address ADDR]``: each run (experiment, sweep point, seed) a Ray task.

The task runs that run's own ``harness run`` (``launch.child_command``) as a subprocess of the
Ray worker, started by ``lifeline.spawn``: when the worker dies (killed, its node lost) the run
and everything it started end with it and its run lock is freed, so rerunning the same command
resumes it from its finished stages. Tasks are not retried by Ray (``max_retries=0``): a failed
run or a dead worker is one line, and the rerun resumes it.

Resources: a run on CUDA (model.device "cuda", or "auto" on a cluster that has GPUs) asks for
``num_gpus=1`` and one CPU; Ray then sets the task's ``CUDA_VISIBLE_DEVICES`` to its GPU (the
run records it in provenance.json, hardware.cuda_visible_devices), so no two runs share a card.
Any other run asks for model.cpu_threads CPUs (at least 1). ``--jobs N`` caps the runs in flight;
without it Ray's resources decide.

Without an address this starts a local Ray instance (one machine; its GPUs are Ray's) and stops
it at the end; with one (``auto``, ``HEAD:6379``, or RAY_ADDRESS) it joins that cluster and
leaves it running. On a cluster every node must see the experiment files and the output
directory at the driver's paths (a shared filesystem: the task runs in the driver's working
directory) and have this harness installed in the Python Ray runs. Ray is an extra
(``./install.sh --ray``), imported only here.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from typing import Sequence

from harness.console import terminal as console
from harness.fmt import duration, short_path
from harness.run.launch import child_command, failure, finish, run_name, uses_cuda
from harness.lifeline import spawn


def run_one(cmd: list[str], cwd: str) -> dict:
    """The Ray task: ``cmd`` (one run's ``harness run``) in ``cwd``, in the worker's environment
    (CUDA_VISIBLE_DEVICES as Ray set it). Returns its exit code, stderr, the GPUs it saw and
    the node it ran on."""
    import ray

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = spawn(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = child.communicate()
    return {"returncode": child.returncode, "stderr": err, "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
            "node": ray.util.get_node_ip_address()}


def resources(cfg, cluster_gpus: float) -> dict:
    """The Ray resources of one run: one GPU (and one CPU) on CUDA, else model.cpu_threads CPUs."""
    if uses_cuda(cfg, int(cluster_gpus)):
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": max(1, cfg.model.cpu_threads)}


def run_ray(cfgs: list, *, address: str | None, jobs: int | None, fresh: bool, overrides: Sequence[str] = ()) -> int:
    """The runs as Ray tasks (module docstring); one line per run as it ends, then the combined
    leaderboard. Exit 0 when every run finished, 1 when one failed or its worker died (or Ray is
    missing or cannot start), 130 on an interrupt (the running tasks are cancelled)."""
    try:
        import ray
        from ray.exceptions import RayError
    except ImportError:
        console.error("harness run --launcher ray: Ray is not installed in this environment (./install.sh --ray)")
        return 1
    started = not ray.is_initialized()  # a caller's own ray.init (a test's resources) is used as it is
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        except Exception as e:  # noqa: BLE001  (an unreachable address, a local start that fails: one line)
            first = next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)
            console.error(f"harness run --launcher ray: cannot {'join Ray at ' + address if address else 'start Ray'}: "
                          f"{first}")
            return 1
    task = ray.remote(run_one)
    pending: dict = {}  # object ref -> (cfg, start time)
    failed = 0
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        on_gpu = sum(uses_cuda(cfg, int(gpus)) for cfg in cfgs)
        console.info(f"{console.plural(len(cfgs), 'run')} as Ray tasks"
                     + (f", at most {jobs} at a time" if jobs else "")
                     + (f"; those on CUDA one GPU each, {gpus:g} GPUs in the cluster" if on_gpu else ""))
        waiting = list(cfgs)
        while waiting or pending:
            while waiting and (jobs is None or len(pending) < jobs):
                cfg = waiting.pop(0)
                ref = task.options(**resources(cfg, gpus), max_retries=0, name=run_name(cfg)).remote(
                    child_command(cfg, fresh=fresh, overrides=overrides), os.getcwd())
                pending[ref] = (cfg, time.perf_counter())
            # a timeout: a blocking wait would hold off an interrupt (Ctrl-C) until some run ends
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in done:
                cfg, t0 = pending.pop(ref)
                try:
                    out = ray.get(ref)
                except RayError as e:
                    failed += 1
                    first = next((x.strip() for x in str(e).splitlines() if x.strip()), "")
                    console.error(f"{run_name(cfg)}: its Ray task ended without a result ({type(e).__name__}"
                                  f"{': ' + first[:200] if first else ''}); rerun the same command to resume")
                    continue
                gpu = f", GPU {out['cuda_visible_devices']}" if resources(cfg, gpus)["num_gpus"] else ""
                if out["returncode"] == 0:
                    console.info(f"{run_name(cfg)}: done in {duration(time.perf_counter() - t0)} on {out['node']}{gpu} "
                                 f"({short_path(cfg.run_dir)})")
                else:
                    failed += 1
                    console.error(f"{run_name(cfg)}: {failure(out['returncode'], out['stderr'])}")
    except KeyboardInterrupt:
        for ref in pending:  # force: the worker ends, and its run with it (lifeline)
            ray.cancel(ref, force=True)
        console.error("interrupted; finished stages are kept: rerun the same command to resume")
        return 130
    finally:
        if started:
            ray.shutdown()
    return finish(cfgs, failed)
