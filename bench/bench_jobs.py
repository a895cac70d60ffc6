"""Two seeds of a tiny experiment one after the other vs at once (``harness run --jobs 2``).

Prints the wall time of each way and their ratio, measured in one run (this machine is
noisy: compare the ratio, not the seconds). Every run starts from an empty output directory;
the tiny world must be built already (``harness tiny``).

    .venv/bin/python bench/bench_jobs.py [experiments/tiny/spin.toml] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_run(exp: Path, seeds: str, flags: list[str], out: Path) -> float:
    """Wall seconds of ``harness run -q EXP --seeds SEEDS FLAGS...`` into the empty ``out``; exits
    naming the seeds that did not finish."""
    text = re.sub(r"(?m)^\[experiment\]\n", f'[experiment]\noutput_dir = "{out}"\n', exp.read_text(), count=1)
    cfg = out / exp.name
    out.mkdir(parents=True)
    cfg.write_text(text)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "-q", str(cfg), "--seeds", seeds,
                           *flags], capture_output=True, text=True)
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
    with tempfile.TemporaryDirectory() as tmp:
        seq = timed_run(exp, a.seeds, ["--jobs", "1"], Path(tmp) / "sequential")
        par = timed_run(exp, a.seeds, ["--jobs", "2"], Path(tmp) / "jobs2")
    n = len(a.seeds.split(","))
    print(f"{exp.name}, seeds {a.seeds}: one after the other {seq:.1f} s, --jobs 2 {par:.1f} s, "
          f"speed-up {seq / par:.2f}x (ideal {min(n, 2)}x on 2 free cores)")


if __name__ == "__main__":
    main()
