"""Terminal output: one line per stage, progress bars, nothing from other libraries on the
terminal (it goes to RUN_DIR/harness.log), data on stdout, one ``error:`` line for a crash."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from test_eval_fixtures import experiment_head

from harness.console import terminal as console


@pytest.fixture(autouse=True)
def _library_console():
    yield
    console.reset()


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_stage_lines_and_progress_on_a_plain_stream():
    term, out = io.StringIO(), io.StringIO()
    console.configure(console.NORMAL, term=term, out=out)
    with console.stage("iter 1", "generate") as line:
        bar = console.progress(total=256, desc="iter 1 generate", unit="samples")
        bar.update(128)
        bar.set_postfix(tok_s="8760")
        bar.update(128)
        bar.close()
        line.done("256 samples · 1,129 tokens")
    with console.stage("iter 0", "init_sft") as line:
        line.skip()  # a stage that does not apply: no line
    with console.stage("iter 1", "evaluate") as line:
        line.done("tiny_gen 0.400 (+0.047) · " + "x" * 200)
    lines = term.getvalue().splitlines()
    assert lines[0] == "iter 1  generate     0.0s  256 samples · 1,129 tokens"
    assert len(lines) == 2 and len(lines[1]) == 120 and lines[1].endswith("…")
    assert "\r" not in term.getvalue() and out.getvalue() == ""  # no live bar on a non-terminal
    console.data("| table |")
    assert out.getvalue() == "| table |\n"


def test_live_line_on_a_terminal_stays_within_the_width():
    term = FakeTTY()
    console.configure(console.NORMAL, term=term)
    with console.stage("iter 12", "train") as line:
        bar = console.progress(total=1000, desc="train", unit="steps")
        for _ in range(10):
            bar.update(100)
            bar.set_postfix(loss="0.6931")
            line.draw(force=True)
        bar.close()
        console.phase("probe")
        line.done("1,000 steps · loss 0.693→0.512")
    frames = [f.replace("\x1b[2K", "") for f in re.split(r"[\r\n]", term.getvalue()) if f.strip()]
    live = [f for f in frames if "steps ·" in f and "/1,000" in f]
    assert live and all(len(f) < 120 for f in frames)
    assert "1,000/1,000 steps" in live[-1] and "loss 0.6931" in live[-1] and "/s" in live[-1]
    assert frames[-1].startswith("iter 12 train") and frames[-1].endswith("1,000 steps · loss 0.693→0.512")


def test_a_failing_stage_is_named():
    term = io.StringIO()
    console.configure(console.NORMAL, term=term)
    with pytest.raises(ValueError):
        with console.stage("iter 3", "judge"):
            raise ValueError("boom")
    assert console.failed_stage() == "iteration 3 judge"
    assert term.getvalue().splitlines() == ["iter 3  judge      failed"]


def test_stage_summaries_say_what_changed_since_iteration_0():
    evaluate = {"lm_eval/tiny_gen/exact_match": 0.46, "lm_eval/tiny_gen/exact_match_stderr": 0.04,
                "alpaca_eval/win_rate": 34.5, "alpaca_eval/standard_error": 3.5, "alpaca_eval/n_total": 100,
                "alpaca_eval/coverage": 1.0}
    base = {"lm_eval/tiny_gen/exact_match": 0.353, "alpaca_eval/win_rate": 26.5}
    assert console.summarize("evaluate", evaluate, baseline=base) == \
        "tiny_gen 0.460 +0.107 · win rate 34.5±3.5 (+8.0), n=100, 100% judged"
    # the validation stage: the same evaluations under "validation/", plus the judge's mean score
    validation = {"validation/" + k: v for k, v in evaluate.items()} | {
        "validation/judge/score_mean": 4.11, "validation/judge/n_scored": 64, "validation/judge/n_prompts": 64}
    vbase = {"validation/" + k: v for k, v in base.items()} | {"validation/judge/score_mean": 3.75}
    assert console.summarize("validation", validation, baseline=vbase) == (
        "tiny_gen 0.460 +0.107 · win rate 34.5±3.5 (+8.0), n=100, 100% judged · judge score 4.11 +0.360 on 64 prompts")
    assert console.summarize("validation", {"validation/judge/score_mean": 3.75}) == "judge score 3.75"


def test_levels_and_whose_logging_is_shown():
    term = io.StringIO()
    console.configure(console.NORMAL, term=term)
    logging.getLogger("harness.evaluate").warning("indicator over threshold: distinct_1 0.10 < 0.20")
    logging.getLogger("harness").info("run finished")
    logging.getLogger("lm_eval.evaluator").warning("Overwriting default num_fewshot")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("pkg_resources is deprecated as an API", UserWarning)
    assert term.getvalue() == "warning: indicator over threshold: distinct_1 0.10 < 0.20\n"

    quiet = io.StringIO()
    console.configure(console.QUIET, term=quiet)
    logging.getLogger("harness").warning("not shown with -q")
    console.info("status line")
    with console.stage("iter 1", "pairs") as line:
        line.done("158 pairs")
    console.error("something failed")
    assert quiet.getvalue() == "error: something failed\n"

    loud = io.StringIO()
    console.configure(console.VERBOSE, term=loud)
    logging.getLogger("lm_eval.evaluator").info("Building contexts")
    assert "lm_eval.evaluator: Building contexts" in loud.getvalue()


def test_capture_sends_everything_else_to_the_log(tmp_path, capfd):
    console.configure(console.NORMAL)
    with console.capture():
        os.write(2, b"raw fd 2 noise\n")
        subprocess.run(["sh", "-c", "echo 'fatal: not a git repository' >&2; echo child stdout"], check=True)
        os.write(1, b"fd 1 noise\n")
        print("print() noise")
        print("stderr noise", file=sys.stderr)
        logging.getLogger("lm_eval.evaluator").warning("Overwriting default num_fewshot")
        warnings.warn("a FutureWarning from some library", FutureWarning)
        console.log_to(tmp_path / "run" / console.LOG_NAME)
        logging.getLogger("harness.loop").debug("a debug line of ours")
        console.info("our status line")
        with console.stage("iter 1", "pairs") as line:
            line.done("158 pairs")
        console.data("| the table |")
        assert console.log_path() == tmp_path / "run" / "harness.log"
    captured = capfd.readouterr()
    assert captured.out == "| the table |\n"
    assert captured.err.splitlines() == ["our status line", "iter 1  pairs        0.0s  158 pairs"]
    log = (tmp_path / "run" / "harness.log").read_text()
    for text in ("raw fd 2 noise", "fatal: not a git repository", "child stdout", "fd 1 noise", "print() noise",
                 "stderr noise",
                 "Overwriting default num_fewshot", "FutureWarning", "a debug line of ours", "our status line",
                 "iter 1  pairs"):
        assert text in log, text
    assert console.log_path() is None
    os.write(1, b"after\n")  # descriptors restored
    assert capfd.readouterr().out == "after\n"


# ---------------------------------------------------------------- harness table

def test_harness_table_writes_only_the_table_to_stdout(tmp_path, capfd):
    import pandas as pd

    from harness.cli import main
    from harness.report import build_table, load_rows, to_csv

    run = tmp_path / "results" / "exp"
    run.mkdir(parents=True)
    rows = [{"experiment": "exp", "method": "spin", "iteration": it, "model": "tiny",
             "metrics": {"lm_eval/t/acc": 0.5 + 0.1 * it, "lm_eval/t/acc_stderr": 0.05, "alpaca_eval/win_rate": 40.0 + it,
                         "alpaca_eval/standard_error": 2.0, "alpaca_eval/n_total": 100, "alpaca_eval/coverage": 1.0},
             "provenance": {"git_commit": "unknown"}} for it in range(3)]
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert main(["table", str(tmp_path / "results"), "--format", "csv"]) == 0
    got = capfd.readouterr()
    assert got.err == "" and got.out == to_csv(build_table(load_rows([run])))
    pd.read_csv(io.StringIO(got.out))  # `harness table --format csv > t.csv` is a valid CSV file
    assert not list(tmp_path.rglob("*.png"))  # plots only when asked for

    assert main(["table", str(tmp_path / "results")]) == 0
    got = capfd.readouterr()
    assert got.err == "" and got.out.startswith("| experiment ") and "win rate" in got.out and "judged" in got.out
    assert all(len(line) <= 120 for line in got.out.splitlines())

    for fmt in ("markdown", "html"):
        assert main(["table", str(tmp_path / "results"), "--format", fmt]) == 0
        got = capfd.readouterr()
        assert got.err == "" and (got.out.startswith("| experiment ") if fmt == "markdown"
                                  else got.out.startswith("<!DOCTYPE html>") and got.out.rstrip().endswith("</html>"))

    out = tmp_path / "board" / "leaderboard.html"
    assert main(["table", str(tmp_path / "results"), "--format", "html", "--out", str(out)]) == 0
    got = capfd.readouterr()
    assert got.out == "" and got.err.splitlines() == [f"wrote {out}"]  # the page inlines its plots: no PNGs
    assert not list(out.parent.glob("*.png"))
    assert main(["table", str(tmp_path / "results"), "--plots", str(tmp_path / "p"), "-q"]) == 0
    got = capfd.readouterr()
    assert got.err == "" and (tmp_path / "p" / "exp.png").exists()


# ---------------------------------------------------------------- harness run, in process

def _experiment(tmp: Path, model_dir: Path, out: Path) -> Path:
    data = tmp / "sft.jsonl"
    words = ["fox", "dog", "yes", "no", "lazy", "quick", "brown", "the"]
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"say {words[i % 8]} {words[(i * 3 + 1) % 8]}",
                                        "response": f"{words[i % 8]} {words[(i * 3 + 1) % 8]}"}) + "\n"
                            for i in range(16)))
    exp = tmp / f"{out.name}.toml"
    exp.write_text(experiment_head("console", 1, out, model_dir) + f"""
[method]
name = "spin"
iterations = 1
beta = 0.1

[data]
train = "{data}"

[generation]
max_new_tokens = 6
batch_size = 8

[training]
learning_rate = 0.005
batch_size = 2
epochs = 1
max_length = 48

[eval.indicators]
num_prompts = 0
""")
    return exp


OURS = re.compile(r"^(console: spin|(iter \d+)? +[a-z_]+ +([\d.:]+s?|kept|failed)  |results: |cost: |full table: |error: )")


def test_harness_run_output(tiny_dir, tmp_path, capfd, monkeypatch):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    exp = _experiment(tmp_path, tiny_dir, tmp_path / "out")
    assert main(["run", str(exp)]) == 0
    got = capfd.readouterr()
    err = got.err.splitlines()
    assert err and all(OURS.match(line) for line in err), got.err  # nothing from another library
    assert all(len(line) <= 120 for line in got.err.splitlines() + got.out.splitlines())
    assert [line.split()[2] for line in err if line.startswith("iter")] == ["evaluate", "generate", "pairs", "train",
                                                                            "evaluate"]
    assert got.out.startswith("| experiment ") and all(line.startswith("|") for line in got.out.splitlines())
    run = tmp_path / "out" / "console"
    log = (run / "harness.log").read_text()
    assert "iter 1  train" in log and "WARNING" in log  # what was silenced is in the log
    assert {p.name for p in run.iterdir()} >= {"results.csv", "results.md", "results.html", "harness.log"}

    # -q: only the final table; the rerun keeps every stage
    assert main(["run", "-q", str(exp)]) == 0
    got_q = capfd.readouterr()
    assert got_q.err == "" and got_q.out == got.out

    # an unexpected exception: one error line naming the stage, the traceback in the log, finished stages kept
    import harness.train

    def broken(*args, **kwargs):
        raise ValueError("the optimizer exploded\nsecond line of the message")

    monkeypatch.setattr(harness.train, "train_dpo", broken)
    exp2 = _experiment(tmp_path, tiny_dir, tmp_path / "crash")
    assert main(["run", str(exp2)]) == 1
    got = capfd.readouterr()
    assert got.out == ""
    errors = [line for line in got.err.splitlines() if line.startswith("error:")]
    assert errors == ["error: console, iteration 1 train: ValueError: the optimizer exploded "
                      "(traceback in crash/console/harness.log)"]
    assert "Traceback" not in got.err and "iter 1  train      failed" in got.err
    log = (tmp_path / "crash" / "console" / "harness.log").read_text()
    assert "Traceback (most recent call last)" in log and "second line of the message" in log
    assert (tmp_path / "crash" / "console" / "iter_001" / "generate" / "manifest.json").exists()


def test_a_reader_that_stops_early_gets_no_traceback():
    """``harness validate --explain | head -1``: a closed pipe ends the command quietly."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first write: every write meets a closed pipe
    try:
        proc = subprocess.run([sys.executable, "-m", "harness.cli", "validate", "--explain"],
                              stdout=write_end, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_full_disk_ends_in_one_line_and_exit_1():
    """``harness validate --explain > FILE`` on a full disk (/dev/full answers every write with
    ENOSPC): one line, exit 1 (not the interpreter's 120 from its exit-time flush), no traceback."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "harness.cli", "validate", "--explain"],
                              stdout=full, stderr=subprocess.PIPE, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.strip() == "harness validate: writing the output: No space left on device"


def test_provenance_outside_a_git_checkout(tmp_path, capfd):
    from harness.run.provenance import git_state

    assert git_state(tmp_path) == {"git_commit": "unknown", "git_dirty": None}
    if subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], capture_output=True).returncode == 0:
        (tmp_path / "repo" / "site-packages").mkdir()
        # a tree inside some other repository is not a checkout of the harness
        assert git_state(tmp_path / "repo" / "site-packages")["git_commit"] == "unknown"
    assert "fatal" not in capfd.readouterr().err
