"""``harness``: validate | run | status | table | import-alpaca-eval | import-mt-bench | export | tiny. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from harness.cli_run import run_command, validate_command
from harness.console import terminal as console
from harness.fmt import short_path


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2, got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0, got {text!r}")
    return seeds


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
    v.set_defaults(fn=validate_command)

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
    r.set_defaults(fn=run_command)

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
