"""``harness validate`` and ``harness run``: experiment files loaded and checked once per sweep point
(``load_checked``: every problem of every file before any compute), run directories that two runs
would share or that hold stages this config would refuse, then the runs here, as ``--jobs``
processes or as Ray tasks, with one line per stage, the tables and the cost line. The other
commands and the argument parser are ``harness.cli``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from harness.config.schema import ConfigError
from harness.console import terminal as console
from harness.fmt import short_path


def validate_command(args) -> int:
    """``harness validate``: each file at each sweep point "ok" (with what it would run) or its
    problems, warnings about its existing run directories; 0 when all pass. ``--explain``: the
    table of every field."""
    from harness.config import experiment as config

    if args.explain:
        from harness.judges import JUDGES
        from harness.methods import METHODS
        from harness.config.schema import explain

        rows = explain(config.Config)
        for name in METHODS.names():
            rows += explain(METHODS.get(name).Options, f"method.{name}")
        for name in JUDGES.names():  # the same tables go under every judge section ([eval.alpaca_eval.judge.<name>], ...)
            rows += explain(JUDGES.get(name).Options, f"judge.{name}") or [
                (f"judge.{name}", "table", "{}", f"The {name} judge has no options of its own.")]
        rows = [r for r in rows if r[0].rsplit(".", 1)[-1] not in ("options", "source", "point")]
        print("| key | type | default | meaning |\n|---|---|---|---|")
        for key, tp, default, doc in rows:
            print(f"| `{key}` | {tp} | `{default}` | {doc} |")
        return 0
    if not args.files:
        print("harness validate: give at least one experiment file (or --explain)", file=sys.stderr)
        return 2
    points = _sweep_points(args)
    if points is None:
        return 2
    checked, ok = load_checked(args.files, check_endpoints=args.check_endpoints, overrides=args.overrides,
                               points=points)
    for cfg, report in checked:
        unmet = (f"; needs {', '.join(sorted(report.unmet))}, which this machine lacks: what depends on it "
                 "was not checked") if report.unmet else ""
        print(f"{_named(cfg)}: ok ({cfg.method.name}, {console.plural(cfg.method.iterations, 'iteration')}, "
              f"config {cfg.hash()}{unmet})")
        for run in cfg.for_seeds():
            conflicts = _existing_run(run)
            for line in conflicts:
                print(f"{cfg.source}: warning: {line}", file=sys.stderr)
    return 0 if ok else 1


def _existing_run(cfg) -> list[str]:
    """What a run of ``cfg`` would meet in its existing run directory: a note of where it
    continues (on stdout) and, returned, the finished stages it would refuse."""
    from harness.run.reuse import last_finished_iteration

    last = last_finished_iteration(cfg.run_dir)
    if last is None:
        return []
    conflicts = _existing_conflicts(cfg)
    if not conflicts:
        more = (f"; continues to iteration {cfg.method.iterations}" if cfg.method.iterations > last
                else "; nothing left to compute" if cfg.method.iterations == last else "")
        print(f"  {short_path(cfg.run_dir)}: finished up to iteration {last}{more}")
    return conflicts


def _existing_conflicts(cfg) -> list[str]:
    """The finished stages of ``cfg``'s run directory that this config would refuse, as lines."""
    from harness.run.reuse import finished_conflicts

    return [f"{short_path(cfg.run_dir)}: {c}: the run would stop there (revert the change, or --fresh for a "
            "new run directory)" for c in finished_conflicts(cfg)]


def _sweep_points(args) -> list[tuple[str, ...]] | None:
    """The grid of the command's ``--sweep`` options (``overrides.sweep_grid``); None, after one
    ``error:`` line, when one is malformed."""
    from harness.config.overrides import sweep_grid

    try:
        return sweep_grid(args.sweeps)
    except ValueError as e:
        console.error(f"harness {args.cmd}: {e}")
        return None


def load_checked(files: list[str], check_endpoints: bool = False, overrides: list[str] = (),
                 points: list[tuple[str, ...]] = ((),)) -> tuple[list, bool]:
    """Parse and check every file, each with the ``--set KEY=VALUE`` ``overrides`` written into it,
    once per sweep point of ``points`` (``overrides.sweep_grid``), before any compute; print every
    problem to stderr as ``FILE: dotted.path: problem`` (warnings as ``FILE: dotted.path: warning:
    ...``; a field an override wrote as ``FILE: --set path: ...``, one a sweep point wrote as
    ``FILE: --sweep KEY=VALUE: ...``), each line once however many points share it.
    Returns ([(config, validate.Report)] of the (file, point)s that passed, whether all did)."""
    from harness.config import experiment as config
    from harness.config.overrides import blame_overrides, blame_point, override_keys
    from harness.validate.experiment import check

    good, said = [], set()

    def say(text: str) -> None:
        for line in text.splitlines():
            if line not in said:
                said.add(line)
                print(line, file=sys.stderr)

    keys = override_keys(overrides)
    for f in files:
        for point in points:
            try:
                cfg = config.load(f, overrides, point)
            except ConfigError as e:
                say(str(e))
                continue
            report = check(cfg, check_endpoints=check_endpoints)
            report.errors = blame_overrides(blame_point(report.errors, point), keys)
            report.warnings = blame_overrides(blame_point(report.warnings, point), keys)
            for w in report.warnings:
                say(f"{f}: {w.path}: warning: {w.message}")
            if report.errors:
                say(str(ConfigError(f, report.errors)))
            else:
                good.append((cfg, report))
    return good, len(good) == len(files) * len(points)


def run_command(args) -> int:
    """Run each experiment with one line per stage on the terminal; everything other
    libraries print goes to RUN_DIR/harness.log (see harness.console.terminal)."""

    if args.address and args.launcher != "ray":
        console.error("harness run: --address goes with --launcher ray")
        return 2
    if args.jobs is not None and args.jobs < 1:
        console.error(f"harness run: --jobs needs a number >= 1, got {args.jobs}")
        return 2
    points = _sweep_points(args)
    if points is None:
        return 2
    with console.capture():
        with contextlib.redirect_stderr(console.terminal()):  # config problems are for the reader
            # every file and sweep point before any runs
            checked, ok = load_checked(args.files, overrides=args.overrides, points=points)
            for cfg, report in checked:
                if report.unmet and args.launcher == "ray":  # the workers' own runs check again
                    print(f"{cfg.source}: experiment.requires: needs {', '.join(sorted(report.unmet))}, which this "
                          "machine lacks: left to the Ray workers", file=sys.stderr)
                elif report.unmet:
                    ok = False
                    print(f"{cfg.source}: experiment.requires: needs {', '.join(sorted(report.unmet))}, "
                          "which this machine lacks", file=sys.stderr)
            if not ok:
                return 1
        cfgs = [c for cfg, _ in checked for c in cfg.for_seeds(args.seeds)]
        from harness.validate.values import seed_problem

        bad_seeds = [(c, p) for c in cfgs if args.seeds and (p := seed_problem(c.experiment.seed, c.method.iterations))]
        for c, problem in bad_seeds:  # experiment.seeds were checked with the file; --seeds only here
            console.error(f"{c.source}: --seeds: {problem}")
        if bad_seeds:
            return 1
        shared = _shared_run_dirs(cfgs)
        for line in shared:
            console.error(line)
        if shared:
            return 1
        if not args.fresh:  # finished stages this config would refuse: said before any compute
            refused = [(c, line) for c in cfgs for line in _existing_conflicts(c)]
            for c, line in refused:
                console.error(f"{c.source}: {line}")
            if refused:
                return 1
        if args.launcher == "ray":
            from harness.run.launch_ray import run_ray

            return run_ray(cfgs, address=args.address, jobs=args.jobs, fresh=args.fresh, overrides=args.overrides)
        if (args.jobs or 1) > 1 and len(cfgs) > 1:
            from harness.run.launch import run_parallel

            return run_parallel(cfgs, jobs=args.jobs, fresh=args.fresh, overrides=args.overrides)
        return _run_checked(args, cfgs)


def _shared_run_dirs(cfgs: list) -> list[str]:
    """One line per run directory that two of the runs would share (two sweep values that parse
    to one value, two files with one experiment name), naming both."""
    seen: dict[Path, object] = {}
    out = []
    for c in cfgs:
        other = seen.setdefault(c.run_dir, c)
        if other is not c:
            out.append(f"{_named(c)}: the run directory {short_path(c.run_dir)} is also {_named(other)}'s: "
                       "the two would be one run")
    return out


def _named(cfg) -> str:
    """An experiment file with its sweep point: ``FILE --sweep KEY=VALUE ...``."""
    return cfg.source + "".join(f" --sweep {p}" for p in cfg.point)


def _run_checked(args, cfgs: list) -> int:
    from harness.models.data import DataError
    from harness.judges import CoverageError
    from harness.run.loop import run_experiment
    from harness.run.reuse import adopt_iteration0
    from harness.store.cost import cost_summary
    from harness.report import combined_board, run_board
    from harness.store.files import RunLocked, StageChanged
    from harness.train import TrainingError

    known = (StageChanged, RunLocked, CoverageError, DataError, TrainingError, FileNotFoundError)
    quiet = console.level() <= console.QUIET
    run_dirs: list[Path] = []
    table = ""
    first_seed: dict[str, Path] = {}  # experiment -> the run directory of its first seed (or sweep point)
    for cfg in cfgs:
        iterations = console.plural(cfg.method.iterations, "iteration")
        seed = f", seed {cfg.experiment.seed}" if cfg.experiment.seeds else ""
        point = "".join(f", {p}" for p in cfg.point)
        console.heading(f"{cfg.experiment.name}: {cfg.method.name}, {iterations}, model {cfg.model.base}{point}{seed}")
        console.reset_failure()
        try:
            if (cfg.experiment.seeds or cfg.point) and cfg.source in first_seed and not args.fresh:
                shared = adopt_iteration0(first_seed[cfg.source], cfg)
                if shared:
                    console.info(f"iteration 0 ({', '.join(shared)}) shared with {short_path(first_seed[cfg.source])}: "
                                 "none of its stages read the seed" + (" or the swept fields" if cfg.point else ""))
            run_dir, rows = run_experiment(cfg, fresh=args.fresh)
            first_seed.setdefault(cfg.source, run_dir)
            with console.stage("", "tables") as line:
                table, written, left_out = run_board(run_dir, f"{cfg.experiment.name} ({cfg.method.name})",
                                                     width=console.width())
                line.done(f"{len(written)} files in {short_path(run_dir)}/")
        except known as e:
            # finished stages stay on disk; the failing stage is left unfinished for the next attempt
            where = console.failed_stage()
            console.error(f"{cfg.source}{f' ({where})' if where else ''}: {e}")
            return 1
        except KeyboardInterrupt:
            where = console.failed_stage()
            console.error(f"interrupted{f' in {where}' if where else ''}; finished stages are kept: "
                          "rerun the same command to resume")
            return 130
        except Exception as e:  # noqa: BLE001  (anything else: one line here, the traceback in the log)
            return _crash(cfg, e)
        run_dirs.append(run_dir)
        if not quiet:
            console.data(table)
        console.info(cost_summary(rows) or "cost: not recorded")
        console.info(f"results: {short_path(run_dir)}/ (results.csv, results.md, results.html, "
                     f"{', '.join(p.name for p in written if p.suffix == '.png') or 'no plots'}, harness.log)")
        if left_out:
            console.info(f"  not shown to fit {console.width()} columns: {', '.join(left_out)} (see results.csv)")
    if len(run_dirs) > 1:  # the combined leaderboard, beside the run directories when they share a parent
        try:
            table, written, left_out = combined_board(run_dirs, width=console.width())
        except Exception as e:  # noqa: BLE001
            return _crash(None, e)
        if not quiet:
            console.data("")
        console.data(table)
        if written:
            console.info(f"leaderboard: {', '.join(short_path(p) for p in written)}")
    elif quiet and run_dirs:
        console.data(table)
    if run_dirs:
        console.info(f"full table: harness table {' '.join(short_path(d) for d in run_dirs)} --format html --out FILE")
    return 0


def _crash(cfg, e: BaseException) -> int:
    """An unexpected exception: one ``error:`` line naming the stage, the traceback in the log."""

    where = console.failed_stage() or ("setup" if cfg is not None else "leaderboard")
    name = cfg.experiment.name if cfg is not None else "harness run"
    logging.getLogger("harness.cli").error("%s: %s failed", name, where, exc_info=e, extra={"terminal": False})
    first = next((x.strip() for x in str(e).splitlines() if x.strip()), "")
    log_file = console.log_path()
    console.error(f"{name}, {where}: {type(e).__name__}{f': {first}' if first else ''}"
                  + (f" (traceback in {short_path(log_file)})" if log_file else ""))
    return 1
