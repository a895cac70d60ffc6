"""``harness``: validate | run | status | table | import-alpaca-eval | tiny. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from harness.schema import ConfigError


def _validate(args) -> int:
    from harness import config

    if args.explain:
        from harness.registry import METHODS
        from harness.schema import explain

        rows = explain(config.Config)
        for name in METHODS.names():
            rows += explain(METHODS.get(name).Options, f"method.{name}")
        rows = [r for r in rows if not r[0].startswith(("options", "source"))]
        print("| key | type | default | meaning |\n|---|---|---|---|")
        for key, tp, default, doc in rows:
            print(f"| `{key}` | {tp} | `{default}` | {doc} |")
        return 0
    if not args.files:
        print("harness validate: give at least one experiment file (or --explain)", file=sys.stderr)
        return 2
    bad = 0
    for f in args.files:
        try:
            cfg = config.load(f)
            print(f"{f}: ok ({cfg.method.name}, {cfg.method.iterations} iterations, config {cfg.hash()})")
        except ConfigError as e:
            bad += 1
            print(str(e), file=sys.stderr)
    return 1 if bad else 0


def _run(args) -> int:
    from harness import config
    from harness.data import DataError
    from harness.judges import CoverageError
    from harness.loop import run_experiment
    from harness.results import render_leaderboard
    from harness.store import RunLocked, StageChanged
    from harness.train import TrainingError

    cfgs = []
    for f in args.files:  # validate every file before running any
        try:
            cfgs.append(config.load(f))
        except ConfigError as e:
            print(str(e), file=sys.stderr)
    if len(cfgs) < len(args.files):
        return 1
    run_dirs = []
    for cfg in cfgs:
        try:
            run_dir, _ = run_experiment(cfg, fresh=args.fresh)
        except (StageChanged, RunLocked, CoverageError, DataError, TrainingError, FileNotFoundError) as e:
            # finished stages stay on disk; the failing stage is left unfinished for the next attempt
            print(f"harness run: {cfg.source}: {e}", file=sys.stderr)
            return 1
        run_dirs.append(run_dir)
        print(render_leaderboard([run_dir], fmt="markdown", plot_dir=run_dir))
    for d in run_dirs:
        print(f"results: {d / 'results.jsonl'}   plots: {d}/*.png")
    if len(run_dirs) > 1:  # the combined leaderboard; its plot beside the run directories when they share a parent
        parents = {Path(d).resolve().parent for d in run_dirs}
        board = parents.pop() if len(parents) == 1 else None
        plot = board / "comparison.png" if board is not None else None
        if plot is not None and plot.exists():
            plot.unlink()  # never point at an older run's plot
        print("\n" + render_leaderboard(run_dirs, fmt="markdown", plot_dir=board))
        if plot is not None and plot.exists():
            print(f"comparison plot: {plot}")
    print(f"leaderboard: harness table {' '.join(str(d) for d in run_dirs)}")
    return 0


def _status(args) -> int:
    import json

    from harness.loop import status

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").exists():
        print(f"harness status: {run_dir} is not a run directory (no config.json)", file=sys.stderr)
        return 1
    cfg = json.loads((run_dir / "config.json").read_text())
    print(f"{run_dir}: {cfg['config']['method']['name']}, {cfg['config']['method']['iterations']} iterations, "
          f"config {cfg['hash']}")
    for row in status(run_dir):
        print(f"  iter {row['iteration']:>3}  {row['stage']:<10} {row['state']:<8} {row['detail']}")
    if (run_dir / "final.json").exists():
        print(f"  final: {json.loads((run_dir / 'final.json').read_text())}")
    return 0


def _table(args) -> int:
    from harness.results import ResultsError, render_leaderboard

    bad = [f for f in args.filter if "=" not in f]
    if bad:
        print(f"harness table: --filter needs KEY=VALUE, got {bad[0]!r}", file=sys.stderr)
        return 2
    filters = dict(f.split("=", 1) for f in args.filter)
    try:
        out = render_leaderboard([Path(d) for d in args.dirs], fmt=args.format,
                                 out=Path(args.out) if args.out else None, sort_by=args.sort, filters=filters or None,
                                 plot_dir=Path(args.plots or (Path(args.out).parent if args.out else args.dirs[0])))
    except ResultsError as e:
        print(f"harness table: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _import(args) -> int:
    from harness.evaluate.alpaca import write_published_run

    path = write_published_run(Path(args.dest) / args.name, args.name, Path(args.outputs), Path(args.annotations))
    print(f"imported {args.name} -> {path}")
    return 0


def _tiny(args) -> int:
    from harness.tiny import ensure_tiny

    print(ensure_tiny(seed=args.seed))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="harness", description="Iterative self-improvement alignment benchmark harness.")
    sub = p.add_subparsers(dest="cmd", required=True)

    v = sub.add_parser("validate", help="check experiment files; every error as FILE: dotted.path: problem")
    v.add_argument("files", nargs="*")
    v.add_argument("--explain", action="store_true", help="print every config field with its default and meaning")
    v.set_defaults(fn=_validate)

    r = sub.add_parser("run", help="run (or resume) experiments; finished stages are skipped")
    r.add_argument("files", nargs="+", metavar="FILE")
    r.add_argument("--fresh", action="store_true", help="use a new run directory instead of resuming")
    r.set_defaults(fn=_run)

    s = sub.add_parser("status", help="which stages of a run are done, partial or missing")
    s.add_argument("run_dir")
    s.set_defaults(fn=_status)

    t = sub.add_parser("table", help="leaderboard across runs (rows: experiment, method, iteration)")
    t.add_argument("dirs", nargs="*", default=["results"])
    t.add_argument("--format", choices=("markdown", "csv", "html"), default="markdown")
    t.add_argument("--out", help="write the table to this file (csv/html)")
    t.add_argument("--sort", help="metric column to sort by")
    t.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="keep rows whose KEY (experiment, method) matches VALUE (glob)")
    t.add_argument("--plots", help="directory for the PNG plots (default: next to --out, else the first DIR)")
    t.set_defaults(fn=_table)

    i = sub.add_parser("import-alpaca-eval", help="add a published AlpacaEval system to the leaderboard")
    i.add_argument("--name", required=True)
    i.add_argument("--outputs", required=True, help="<system>.model_outputs.json")
    i.add_argument("--annotations", required=True, help="<system>.<annotator>.annotations.json")
    i.add_argument("--dest", default="results/published")
    i.set_defaults(fn=_import)

    b = sub.add_parser("tiny", help="build (or find) the embedded offline tiny world and print its path")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(fn=_tiny)

    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
