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
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_run(exp: Path, seeds: str, launcher: str, out: Path) -> float:
    text = re.sub(r"(?m)^\[experiment\]\n", f'[experiment]\noutput_dir = "{out}"\n', exp.read_text(), count=1)
    cfg = out / exp.name
    out.mkdir(parents=True)
    cfg.write_text(text)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "-q", str(cfg), "--seeds", seeds,
                           "--launcher", launcher], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    missing = [k for k in seeds.split(",") if not list(out.glob(f"*/seed-{k}/final.json"))]
    if missing:
        raise SystemExit(f"seeds {missing} did not finish (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("experiment", nargs="?", default="experiments/tiny/spin.toml")
    p.add_argument("--seeds", default="0,1")
    a = p.parse_args()
    exp = Path(a.experiment)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        seq = timed_run(exp, a.seeds, "local", Path(tmp) / "sequential")
        par = timed_run(exp, a.seeds, "ray", Path(tmp) / "ray")
    n = len(a.seeds.split(","))
    print(f"{exp.name}, seeds {a.seeds}: one after the other {seq:.1f} s, --launcher ray {par:.1f} s, "
          f"speed-up {seq / par:.2f}x (ideal {min(n, os.cpu_count() or 1)}x on {os.cpu_count()} free cores; "
          f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after)")


if __name__ == "__main__":
    main()
