"""``harness``: validate | run | status | table | import-alpaca-eval | import-mt-bench | export | tiny. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from pathlib import Path

from harness.console import terminal as console
from harness.fmt import short_path
from harness.config.schema import ConfigError


def _validate(args) -> int:
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


def _run(args) -> int:
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


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2, got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0, got {text!r}")
    return seeds


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


def _status(args) -> int:
    from harness.store.rundir import RunDir
    from harness.run.reuse import status
    from harness.store.files import read_json

    layout = RunDir(args.run_dir)
    if not layout.config.exists():
        print(f"harness status: {layout.root} is not a run directory (no config.json)", file=sys.stderr)
        return 1
    try:
        cfg = read_json(layout.config)
        method = cfg["config"]["method"]
        head = f"{method['name']}, {console.plural(method['iterations'], 'iteration')}, config {cfg['hash']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        head = f"{layout.config} is unreadable ({type(e).__name__}: {e})"
    print(f"{layout.root}: {head}")
    for row in status(layout.root):
        print(f"  iter {row['iteration']:>3}  {row['stage']:<10} {row['state']:<8} {row['detail']}")
    if layout.final.exists():
        try:
            print(f"  final: {read_json(layout.final)}")
        except (ValueError, UnicodeDecodeError) as e:
            print(f"  final: {layout.final} is unreadable ({e})")
    return 0


def _table(args) -> int:
    from harness.report import ResultsError, leaderboard

    if args.compare:
        return _compare(args)
    if args.iteration is not None or args.allow_protocol_mismatch:
        console.error(f"harness table: {'--iteration' if args.iteration is not None else '--allow-protocol-mismatch'} "
                      "goes with --compare A B")
        return 2
    bad = [f for f in args.filter if "=" not in f]
    if bad:
        console.error(f"harness table: --filter needs KEY=VALUE, got {bad[0]!r}")
        return 2
    filters = dict(f.split("=", 1) for f in args.filter)
    width = console.width() if sys.stdout.isatty() else console.MAX_WIDTH
    try:  # plots only where --plots names a directory
        text, written, left_out = leaderboard(
            [Path(d) for d in args.dirs], fmt=args.format, out=Path(args.out) if args.out else None,
            sort_by=args.sort, filters=filters or None, plot_dir=Path(args.plots) if args.plots else None, width=width,
            per_seed=args.per_seed)
    except ResultsError as e:
        console.error(f"harness table: {e}")
        return 1
    if args.out is None:
        console.data(text)  # the table and nothing else: `harness table --format csv > t.csv` is a CSV file
    if left_out:
        console.info(f"not shown to fit {width} columns: {', '.join(left_out)} (--format markdown, csv or html "
                     "for every column)")
    for path in written:
        console.info(f"wrote {path}")
    return 0


def _compare(args) -> int:
    """``harness table --compare A B``: B - A on the items both evaluated, one line per metric."""
    from harness.report.compare import CompareError, compare_text

    if args.dirs != ["results"] or args.out or args.filter or args.sort or args.plots or args.per_seed \
            or args.format != "text":
        console.error("harness table: --compare A B takes only --iteration N and --allow-protocol-mismatch")
        return 2
    try:
        text = compare_text(Path(args.compare[0]), Path(args.compare[1]), args.iteration,
                            allow_protocol_mismatch=args.allow_protocol_mismatch)
    except CompareError as e:
        console.error(f"harness table --compare: {e}")
        return 1
    console.data(text)
    return 0


def _import(args) -> int:
    from harness.report.published import PublishedError, import_published

    try:
        path = import_published(args.dest, args.name, args.outputs, args.annotations)
    except PublishedError as e:
        console.error(f"harness import-alpaca-eval: {e}")
        return 1
    console.info(f"imported {args.name} -> {path}")
    return 0


def _import_mt_bench(args) -> int:
    from harness.report.published import PublishedError, import_mt_bench

    try:
        path = import_mt_bench(args.dest, args.name, args.judgments, args.model)
    except PublishedError as e:
        console.error(f"harness import-mt-bench: {e}")
        return 1
    console.info(f"imported {args.name} -> {path}")
    return 0


def _export(args) -> int:
    """One iterate of a run as a Hugging Face model directory (harness.export); every failure is
    one ``error:`` line (an unexpected one with its traceback in the log)."""
    from harness.export import ExportError, export

    with console.capture():  # other libraries' loading output goes to the log
        try:
            it = export(Path(args.run_dir), args.iteration, Path(args.out), adapter_only=args.adapter_only)
        except ExportError as e:
            console.error(f"harness export: {e}")
            return 1
        except Exception as e:  # noqa: BLE001  (anything else: one line here, the traceback in the log)
            logging.getLogger("harness.cli").error("harness export failed", exc_info=e, extra={"terminal": False})
            first = next((x.strip() for x in str(e).splitlines() if x.strip()), "")
            log_file = console.log_path()
            console.error(f"harness export: {type(e).__name__}{f': {first}' if first else ''}"
                          + (f" (traceback in {log_file})" if log_file else ""))
            return 1
    console.info(f"iteration {it.iteration}: {it.chosen_by}")
    console.info(f"wrote {short_path(args.out)}/ ({'one adapter' if args.adapter_only else 'float32 model'}, "
                 "model card README.md)")
    return 0


def _iteration_arg(text: str) -> str | int:
    if text == "final":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an iteration number or 'final', got {text!r}")
    return int(text)


def _tiny(args) -> int:
    from harness.tiny.build import ensure_tiny

    print(ensure_tiny(seed=args.seed))
    return 0


def _verbosity_flags(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="also show other libraries' logging, warnings and progress bars")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="show only the final table (and errors)")


def _set_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override a field of every FILE before it is validated (repeatable): a dotted key and a "
                             "TOML value, bare words as strings, e.g. --set model.base=smollm2-135m-instruct "
                             "--set training.learning_rate=1e-5; the run records the resulting config")


def _sweep_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep", action="append", default=[], dest="sweeps", metavar="KEY=V1,V2,...",
                        help="run every FILE once per value (repeatable: the grid of all of them), each point validated "
                             "before any runs, in its own run directory <name>/<key>-<value>/... and recorded in its "
                             "config (experiment.sweep); KEY and values as --set's, values split at commas outside "
                             "[...] and quotes, e.g. --sweep training.learning_rate=1e-5,5e-5")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="harness", description="Iterative self-improvement alignment benchmark harness.")
    _verbosity_flags(p, 0)
    common = argparse.ArgumentParser(add_help=False)
    _verbosity_flags(common, argparse.SUPPRESS)  # also accepted after the command
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    v = add("validate", help="check experiment files; every error as FILE: dotted.path: problem")
    v.add_argument("files", nargs="*")
    v.add_argument("--explain", action="store_true", help="print every config field with its default and meaning")
    v.add_argument("--check-endpoints", action="store_true", help="also check that HTTP judge endpoints answer")
    _set_flag(v)
    _sweep_flag(v)
    v.set_defaults(fn=_validate)

    r = add("run", help="run (or resume) experiments; finished stages are skipped")
    r.add_argument("files", nargs="+", metavar="FILE")
    r.add_argument("--fresh", action="store_true", help="use a new run directory instead of resuming")
    r.add_argument("--seeds", type=_seed_list, default=(), metavar="0,1,2",
                   help="run each experiment once per seed (run directories <name>/seed-<k>); overrides experiment.seeds")
    r.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="run N runs (experiments x sweep points x seeds) at once, each a `harness run` process of its "
                        "own; a run on CUDA gets a GPU to itself (never two on one card), so at most one per GPU runs. "
                        "With --launcher ray: at most N in flight (default: as many as the cluster's resources hold)")
    r.add_argument("--launcher", choices=("local", "ray"), default="local",
                   help="local (default): this machine, --jobs at a time; ray: each run a Ray task (one GPU each "
                        "when its device is CUDA), on a local Ray instance or the cluster at --address "
                        "(./install.sh --ray)")
    r.add_argument("--address", metavar="ADDR",
                   help="with --launcher ray: the Ray cluster to join (e.g. auto, or HEAD_IP:6379); none = start a "
                        "local Ray instance")
    _set_flag(r)
    _sweep_flag(r)
    r.set_defaults(fn=_run)

    s = add("status", help="which stages of a run are done, partial or missing")
    s.add_argument("run_dir")
    s.set_defaults(fn=_status)

    t = add("table", help="leaderboard across runs (rows: experiment, method, iteration; seeds averaged)")
    t.add_argument("dirs", nargs="*", default=["results"])
    t.add_argument("--format", choices=("text", "markdown", "csv", "html"), default="text",
                   help="text: the main metrics, fitted to the terminal; markdown, csv: every column; "
                        "html: one self-contained page that sorts and filters")
    t.add_argument("--out", help="write the table to this file instead of stdout (no plots: see --plots)")
    t.add_argument("--sort", help="metric column to sort by")
    t.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="keep rows whose KEY (experiment, method, model, seed, ...) matches VALUE (glob)")
    t.add_argument("--plots", metavar="DIR", help="also write the PNG plots into DIR (none without it)")
    t.add_argument("--per-seed", action="store_true",
                   help="one row per seed instead of the mean ± sd over the seeds of a run (harness run --seeds)")
    t.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="paired comparison of two run directories on the items both evaluated: per metric "
                        "B - A, its standard error, 95%% interval and n")
    t.add_argument("--iteration", type=int, metavar="N",
                   help="with --compare: compare at iteration N (default: the last both evaluated)")
    t.add_argument("--allow-protocol-mismatch", action="store_true",
                   help="with --compare: pair the items even where the runs' protocols differ (another judge, "
                        "reference set, answer cap or lm-eval settings); the output says which differ")
    t.set_defaults(fn=_table)

    i = add("import-alpaca-eval", help="add a published AlpacaEval system to the leaderboard")
    i.add_argument("--name", required=True,
                   help="the system's name: one path component (letters, digits, '.', '_', '-', '+'), "
                        "the directory DEST/NAME")
    i.add_argument("--outputs", required=True, help="<system>.model_outputs.json")
    i.add_argument("--annotations", required=True, help="<system>.<annotator>.annotations.json")
    i.add_argument("--dest", default="results/published")
    i.set_defaults(fn=_import)

    m = add("import-mt-bench", help="add a model's published MT-Bench judgments (FastChat's) to the leaderboard")
    m.add_argument("--name", required=True,
                   help="the row's name: one path component (letters, digits, '.', '_', '-', '+'), the directory "
                        "DEST/NAME")
    m.add_argument("--judgments", required=True, help="FastChat's model_judgment/<judge>_single.jsonl")
    m.add_argument("--model", help="the model's name in that file (default: --name)")
    m.add_argument("--dest", default="results/published")
    m.set_defaults(fn=_import_mt_bench)

    e = add("export", help="one iterate of a run as a Hugging Face model directory with its model card")
    e.add_argument("run_dir")
    e.add_argument("--iteration", type=_iteration_arg, default="final", metavar="N|final",
                   help="which iterate: an iteration number, or final (default): the one final.json names; a run "
                        "without final.json (not finished) gives its last finished iteration")
    e.add_argument("--out", required=True, metavar="DIR", help="the directory to write (absent or empty)")
    e.add_argument("--adapter-only", action="store_true",
                   help="write the adapter chain as one peft adapter instead of merged float32 weights")
    e.set_defaults(fn=_export)

    b = add("tiny", help="build (or find) the embedded offline tiny world and print its path")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(fn=_tiny)

    args = p.parse_args(argv)

    console.configure(console.VERBOSE if args.verbose else console.QUIET if args.quiet else console.NORMAL)
    try:
        code = args.fn(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:  # the reader went away (`harness table ... | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit flush
        return 1
    except OSError as e:  # the environment (a full disk, an unwritable file): one line, no traceback
        where = e.filename or ("writing the output" if e.errno in (errno.ENOSPC, errno.EIO) else "")
        print(f"harness {args.cmd}: {f'{where}: ' if where else ''}{e.strerror or e}", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # exit 1, not 120 from the exit flush
        return 1


if __name__ == "__main__":
    sys.exit(main())
