"""Run experiment files with several experiment seeds and print iteration 0 -> last per
metric as mean ± spread (half the range) over the seeds, plus wall time per iteration.

    .venv/bin/python bench/seeds.py experiments/tiny/*.toml [--seeds 0 1 2] [--metrics M ...]

Runs go to results/bench/ as bench-<name>-s<seed> (resumable like any run). Every figure
printed comes from these runs. Results repeat exactly on one machine; on another CPU they
may differ (other kernels, other float reduction orders), which is why several seeds are
reported rather than one.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
from pathlib import Path

from harness import config
from harness.loop import run_experiment

OUT = Path("results/bench")
DEFAULT_METRICS = ("lm_eval/tiny_gen/exact_match", "lm_eval/tiny_mc/acc", "alpaca_eval/win_rate")


def run_seed(path: str, seed: int) -> list[dict]:
    cfg = config.load(path)
    exp = dataclasses.replace(cfg.experiment, seed=seed, output_dir=str(OUT),
                              name=f"bench-{cfg.experiment.name}-s{seed}")
    _, rows = run_experiment(dataclasses.replace(cfg, experiment=exp))
    return rows


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    args = ap.parse_args()
    import os

    print(f"hardware: {cpu_name()}, {os.cpu_count()} cores; seeds {args.seeds}")
    for path in args.files:
        runs = {s: run_seed(path, s) for s in args.seeds}
        name = config.load(path).experiment.name
        for metric in args.metrics:
            first = [rows[0]["metrics"].get(metric) for rows in runs.values()]
            last = [rows[-1]["metrics"].get(metric) for rows in runs.values()]
            if None in first or None in last:
                continue
            print(f"{name:<24} {metric:<32} {spread(first)} -> {spread(last)}   "
                  f"per seed: {', '.join(f'{a:.3f}->{b:.3f}' for a, b in zip(first, last))}")
        walls = [r["metrics"].get("wall_time_s") or 0.0 for rows in runs.values() for r in rows[1:]]
        if walls:
            print(f"{name:<24} {'wall time per iteration (s)':<32} {spread(walls)}")


if __name__ == "__main__":
    main()
