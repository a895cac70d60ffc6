"""Two seeds of a tiny experiment one after the other vs as Ray tasks (``harness run
--launcher ray``, a local Ray instance that the command starts and stops).

Prints the wall time of each way and their ratio, measured in one run (this machine is noisy:
compare the ratio, not the seconds). Ray's time includes starting and stopping the local
instance. Every run starts from an empty output directory; the tiny world must be built already
(``harness tiny``), and Ray installed (``./install.sh --ray``).

    .venv/bin/python bench/bench_ray.py [experiments/tiny/spin.toml] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench_jobs import timed_run  # the same timed `harness run`, with other launch flags


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("experiment", nargs="?", default="experiments/tiny/spin.toml")
    p.add_argument("--seeds", default="0,1")
    a = p.parse_args()
    exp = Path(a.experiment)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        seq = timed_run(exp, a.seeds, ["--launcher", "local"], Path(tmp) / "sequential")
        par = timed_run(exp, a.seeds, ["--launcher", "ray"], Path(tmp) / "ray")
    n = len(a.seeds.split(","))
    print(f"{exp.name}, seeds {a.seeds}: one after the other {seq:.1f} s, --launcher ray {par:.1f} s, "
          f"speed-up {seq / par:.2f}x (ideal {min(n, os.cpu_count() or 1)}x on {os.cpu_count()} free cores; "
          f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after)")


if __name__ == "__main__":
    main()
