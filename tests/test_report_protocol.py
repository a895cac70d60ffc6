"""The AlpacaEval protocol on every row: leaderboards never rank win rates of different
protocols in one column (harness.report.table, harness.report.protocol)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from test_eval_fixtures import SHARED_DATA, require, tiny, tiny_dir  # noqa: F401  (fixtures)

from harness.report import build_table, leaderboard, load_rows, read_csv, to_csv, to_html, to_markdown, to_terminal
from harness.report.protocol import UNKNOWN, difference, identity, labels, record

WR, SE, N, COV = ("alpaca_eval/win_rate", "alpaca_eval/standard_error", "alpaca_eval/n_total",
                  "alpaca_eval/coverage")
EM = "lm_eval/tiny_gen/exact_match"
AE_DATA = SHARED_DATA / "alpaca_eval"
SYSTEMS = ("alpaca-7b", "gemma-7b-it")  # the published systems whose annotations are in the shared data
RUBRIC_LABEL = "harness rubric: oracle vs tiny_reference"
AE2_LABEL = "AlpacaEval 2.0 (weighted_alpaca_eval_gpt4_turbo vs gpt4_1106_preview)"


def _write(run_dir: Path, rows: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def _rubric_protocol(n: int = 4) -> dict:
    """A tiny-world evaluation's record, as protocol_record writes it (oracle judge, rubric)."""
    return {"annotator": "harness_rubric", "template_hash": None, "judge_model": "oracle", "endpoint_kind": "oracle",
            "base_url": None, "position": "random",
            "reference": {"instructions": "tiny:alpaca_eval", "reference": "instructions",
                          "generator": ["tiny_reference"]},
            "n": n, "n_instructions": n, "coverage": 1.0,
            "length_controlled": {"status": "unavailable", "reason": "x"}, "alpaca_eval_version": None}


def _published_protocol() -> dict:
    return {"annotator": "weighted_alpaca_eval_gpt4_turbo", "judge_model": "gpt-4-1106-preview",
            "config_model_name": ["gpt-4-1106-preview"], "template_hash": None,
            "endpoint_kind": "published annotations",
            "reference": {"instructions": "alpaca_eval", "reference": "instructions",
                          "generator": ["gpt4_1106_preview"]},
            "n": 805, "n_instructions": 805, "coverage": 1.0}


def _tiny_run(wrs=(30.0, 45.0, 80.0), protocol: dict | None = None, exp="tiny-spin") -> list[dict]:
    """A tiny-world run's rows: a win rate of 80 against the tiny reference is not a win rate of 80
    on AlpacaEval 2.0."""
    protocol = protocol or _rubric_protocol()
    return [{"experiment": exp, "method": "spin", "iteration": it, "model": "tiny",
             "metrics": {EM: 0.1 * it, WR: wr, SE: 2.0, N: 4, COV: 1.0},
             "protocol": {"alpaca_eval": protocol}, "provenance": {"seed": 0}} for it, wr in enumerate(wrs)]


def _published(name: str, wr: float) -> dict:
    return {"experiment": name, "method": "published", "iteration": 0, "metrics": {WR: wr, SE: 1.0, N: 805, COV: 1.0},
            "protocol": {"alpaca_eval": _published_protocol()}, "provenance": {"imported_from": {}}}


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    base = tmp_path / "results"
    _write(base / "tiny-spin", _tiny_run())
    _write(base / "gemma-7b-it", [_published("gemma-7b-it", 6.93)])
    _write(base / "alpaca-7b", [_published("alpaca-7b", 2.59)])
    return base


def _win_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("alpaca_eval/win_rate") and not c.endswith((" ±", " sd"))]


def test_labels():
    assert list(labels([_rubric_protocol()]).values()) == [RUBRIC_LABEL]
    assert list(labels([_published_protocol()]).values()) == [AE2_LABEL]
    h2h = {**_rubric_protocol(), "reference": {"instructions": "tiny:alpaca_eval", "reference": "iteration0",
                                                "generator": ["tiny-spin/iter_000"]}}
    assert list(labels([h2h]).values()) == ["head-to-head vs iteration 0 (oracle)"]
    # two runs' head-to-heads are against different starting points: told apart
    other = {**h2h, "reference": {**h2h["reference"], "generator": ["tiny-sr/iter_000"]}}
    assert sorted(labels([h2h, other]).values()) == ["head-to-head vs tiny-spin/iter_000 (oracle) on tiny:alpaca_eval",
                                                       "head-to-head vs tiny-sr/iter_000 (oracle) on tiny:alpaca_eval"]
    # the same annotator on a stand-in judge is another protocol; on part of the set it is the same one
    # (the number of items is the row's n and coverage)
    local = {**_published_protocol(), "judge_model": "llama-3-8b"}
    part = {**_published_protocol(), "n": 803, "n_instructions": 803}
    assert sorted(labels([_published_protocol(), local, part]).values()) == [
        AE2_LABEL, "AlpacaEval 2.0 (weighted_alpaca_eval_gpt4_turbo vs gpt4_1106_preview, judged by llama-3-8b)"]
    assert identity(part) == identity(_published_protocol())
    # protocols that read the same even in detail: a hash tells them apart
    a, b = {**_rubric_protocol(), "template_hash": "a" * 64}, {**_rubric_protocol(), "template_hash": "b" * 64}
    named = sorted(labels([a, b]).values())
    assert len(set(named)) == 2 and all(n.startswith(RUBRIC_LABEL + " on tiny:alpaca_eval #") for n in named)
    assert labels([None]) == {UNKNOWN: UNKNOWN} and record({"protocol": {}}) is None


def test_win_rates_of_two_protocols_are_never_in_one_column(mixed):
    df = build_table(load_rows([mixed]))
    assert WR not in df.columns
    assert _win_columns(df) == [f"{WR} [P1]", f"{WR} [P2]"]  # P1 = AlpacaEval 2.0, P2 = the rubric (alphabetical)
    for col in _win_columns(df):
        values = df[df[col].notna()]
        assert values["protocol"].nunique() == 1, col
    assert df.set_index("experiment")[f"{WR} [P1]"].dropna().to_dict() == {"gemma-7b-it": 6.93, "alpaca-7b": 2.59}
    assert df[df.experiment == "tiny-spin"][f"{WR} [P2]"].tolist() == [30.0, 45.0, 80.0]
    # each protocol's companions and Δ are split with it; lm-eval stays one column
    for c in (f"{WR} [P1] ±", f"{N} [P1]", f"{COV} [P2]", f"Δ {WR} [P2]"):
        assert c in df.columns, c
    assert f"Δ {WR} [P1]" in df.columns and df[f"Δ {WR} [P1]"].isna().all()  # published rows have no Δ
    assert df[f"Δ {WR} [P2]"].dropna().tolist() == [0.0, 15.0, 50.0]
    assert EM in df.columns
    assert df.set_index("experiment")["protocol"].to_dict() == {"tiny-spin": RUBRIC_LABEL, "gemma-7b-it": AE2_LABEL,
                                                                "alpaca-7b": AE2_LABEL}
    # one protocol shown (a filter): nothing is split
    alone = build_table(load_rows([mixed]), filters={"method": "published"})
    assert _win_columns(alone) == [WR] and alone["protocol"].unique().tolist() == [AE2_LABEL]


def test_sort_ranks_only_within_a_protocol(mixed, tmp_path):
    rows = load_rows([mixed])
    df = build_table(rows, sort_by="win_rate")
    # the rubric's 80 / 45 / 30 are never ranked above or among AlpacaEval 2.0's 6.93 / 2.59
    assert list(zip(df.experiment, df.iteration)) == [("gemma-7b-it", 0), ("alpaca-7b", 0), ("tiny-spin", 2),
                                                      ("tiny-spin", 1), ("tiny-spin", 0)]
    assert df.protocol.tolist() == [AE2_LABEL] * 2 + [RUBRIC_LABEL] * 3
    asc = build_table(rows, sort_by=WR, descending=False)
    assert list(zip(asc.experiment, asc.iteration)) == [("alpaca-7b", 0), ("gemma-7b-it", 0), ("tiny-spin", 0),
                                                        ("tiny-spin", 1), ("tiny-spin", 2)]
    # a Δ too; and by one protocol's column: its rows ranked, the others after them
    assert build_table(rows, sort_by=f"Δ {WR}").protocol.tolist()[:2] == [AE2_LABEL] * 2
    by_p2 = build_table(rows, sort_by=f"{WR} [P2]")
    assert by_p2[f"{WR} [P2]"].tolist()[:3] == [80.0, 45.0, 30.0] and by_p2[f"{WR} [P2]"][3:].isna().all()
    # rows without AlpacaEval come last; lm-eval metrics still rank across protocols
    _write(mixed / "lm-only", [{"experiment": "lm-only", "method": "sft", "iteration": 0, "metrics": {EM: 0.9}}])
    rows = load_rows([mixed])
    assert build_table(rows, sort_by="win_rate").experiment.tolist()[-1] == "lm-only"
    assert build_table(rows, sort_by=EM).experiment.tolist()[:2] == ["lm-only", "tiny-spin"]
    # columns naming the unsplit metric show every protocol's
    assert _win_columns(build_table(rows, columns=[WR])) == [f"{WR} [P1]", f"{WR} [P2]"]


def test_renderers_show_the_protocols(mixed, tmp_path):
    df = build_table(load_rows([mixed]), sort_by="win_rate")
    note = f"AlpacaEval protocols (win rates of different protocols are never ranked together; each has its own " \
           f"columns): [P1] {AE2_LABEL}; [P2] {RUBRIC_LABEL}."
    md = to_markdown(df)
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert "protocol" in header and f"{WR} [P1]" in header and f"{WR} [P2]" in header and WR not in header
    assert md.endswith("\n\n" + note)
    text, left_out = to_terminal(df, 200)
    head = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    assert left_out == [] and head == ["experiment", "method", "iter", "tiny_gen exact_match", "Δ", "win rate [P1]",
                                       "Δ", "n [P1]", "judged [P1]", "win rate [P2]", "Δ", "n [P2]", "judged [P2]"]
    # narrower: every protocol's n and coverage go before any protocol's win rate
    text, left_out = to_terminal(df)
    assert max(map(len, text.splitlines())) <= 120 and "win rate [P1]" in text and "win rate [P2]" in text
    assert left_out == [f"{N} [P1]", f"{COV} [P1]", f"{N} [P2]", f"{COV} [P2]"]
    assert " ".join(text.split()).endswith(" ".join(note.split()))  # the note may wrap
    to_csv(df, tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as f:
        got = {(r["experiment"], r["iteration"]): r["protocol"] for r in csv.DictReader(f)}
    assert got[("tiny-spin", "2")] == RUBRIC_LABEL and got[("alpaca-7b", "0")] == AE2_LABEL
    back = read_csv(tmp_path / "t.csv")
    assert list(back.columns) == list(df.columns)
    kept = [c for c in df.columns if c not in ("config_hash", "commit", "torch", "transformers", "trl")]  # all blank
    pd.testing.assert_frame_equal(back[kept], df[kept])
    page = to_html(df)
    assert '<th data-name="protocol" data-type="text"' in page and f">{RUBRIC_LABEL}<" in page
    assert f'title="{WR} [P2]: {RUBRIC_LABEL}"' in page and "[P1] AlpacaEval 2.0" in page


def test_one_protocol_is_a_note(tmp_path):
    run = _write(tmp_path / "tiny-spin", _tiny_run())
    md = leaderboard([run], fmt="markdown").text
    table, note = md.split("\n\n")
    assert note == f"AlpacaEval protocol: {RUBRIC_LABEL}." and "protocol" not in table.splitlines()[0]
    assert leaderboard([run]).text.endswith(f"\nAlpacaEval protocol: {RUBRIC_LABEL}.")
    page = leaderboard([run], fmt="html").text
    assert f"AlpacaEval protocol: {RUBRIC_LABEL}." in page and 'data-name="protocol"' not in page
    assert leaderboard([run], fmt="csv").text.splitlines()[1].count(RUBRIC_LABEL) == 1
    # a table without AlpacaEval has no protocol at all
    lm = _write(tmp_path / "lm", [{"experiment": "lm", "method": "sft", "iteration": 0, "metrics": {EM: 0.5}}])
    assert "protocol" not in leaderboard([lm], fmt="csv").text and "protocol" not in leaderboard([lm]).text


def test_rows_without_a_protocol_are_unknown_and_not_ranked_with_known_ones(tmp_path):
    old = _tiny_run(exp="old-run")
    for r in old:
        del r["protocol"]
    _write(tmp_path / "old-run", old)
    _write(tmp_path / "tiny-spin", _tiny_run(wrs=(10.0, 20.0, 25.0)))
    df = build_table(load_rows([tmp_path]), sort_by="win_rate")
    assert set(df.protocol) == {UNKNOWN, RUBRIC_LABEL}
    assert df.experiment.tolist() == ["tiny-spin"] * 3 + ["old-run"] * 3  # rubric = P1, unknown = P2
    with pytest.raises(Exception, match="protocol"):
        load_rows([_write(tmp_path / "bad", [{**_tiny_run()[0], "protocol": {"alpaca_eval": "x"}}])])


def test_seeds_keep_their_protocol(tmp_path):
    rows = [{**r, "seed": s} for s in (0, 1) for r in _tiny_run()]
    _write(tmp_path / "tiny-spin", rows)
    _write(tmp_path / "gemma-7b-it", [_published("gemma-7b-it", 6.93)])
    df = build_table(load_rows([tmp_path]))
    assert df.protocol.tolist() == [RUBRIC_LABEL] * 3 + [AE2_LABEL] and f"{WR} [P2] sd" in df.columns


def test_tiny_world_evaluation_and_imported_systems(tiny, tmp_path):  # noqa: F811
    """A real tiny-world evaluation (the oracle through the rubric) beside the imported published
    systems: the imported rows reproduce the published numbers exactly, carry AlpacaEval 2.0's
    protocol read from their annotations files, and no column ranks them with the tiny run."""
    require(AE_DATA.is_dir(), f"published AlpacaEval files not found at {AE_DATA} (shared data folder absent)")
    import alpaca_eval

    from harness.config.eval_sections import AlpacaEvalSection
    from harness.evaluate.alpaca import run_alpaca_eval
    from harness.judges import build_judge
    from harness.report.published import import_published

    model, tok = tiny
    section = AlpacaEvalSection(instructions="tiny:alpaca_eval", limit=4, max_new_tokens=6)
    metrics = run_alpaca_eval(model, tok, section, lambda: build_judge(section.judge, seed_key=(0, 1)), tmp_path / "ae",
                              seed_key=(0, 1), generator="tiny-spin/iter_000", batch_size=4)
    capped = RUBRIC_LABEL + ", answers capped at 6 tokens"  # below alpaca_eval's 2048: part of the protocol
    protocol = json.loads((tmp_path / "ae" / "metrics.json").read_text())["protocol"]
    _write(tmp_path / "board" / "tiny-spin", [{"experiment": "tiny-spin", "method": "spin", "iteration": 0,
                                               "model": "tiny", "metrics": metrics,
                                               "protocol": {"alpaca_eval": protocol}, "provenance": {}}])
    for name in SYSTEMS:
        import_published(tmp_path / "board", name, AE_DATA / f"{name}.model_outputs.json",
                         AE_DATA / f"{name}.weighted_alpaca_eval_gpt4_turbo.annotations.json")
    path = (Path(alpaca_eval.__file__).parent / "leaderboards" / "data_AlpacaEval_2"
            / "weighted_alpaca_eval_gpt4_turbo_leaderboard.csv")
    with path.open() as f:
        published = {row[""]: row for row in csv.DictReader(f)}
    rows = load_rows([tmp_path / "board"])
    df = build_table(rows, sort_by="win_rate", columns=[WR, N, "alpaca_eval/discrete_win_rate"])
    assert df.protocol.tolist()[:2] == [AE2_LABEL] * 2 and df.protocol.tolist()[2] == capped
    for name in SYSTEMS:
        row = df[df.experiment == name].iloc[0]
        for k, col in (("win_rate", f"{WR} [P1]"), ("standard_error", f"{WR} [P1] ±"),
                       ("discrete_win_rate", "alpaca_eval/discrete_win_rate [P1]")):
            assert repr(float(row[col])) == published[name][k], (name, k)  # every printed digit
        assert int(row[f"{N} [P1]"]) == int(published[name]["n_total"])
        assert math.isnan(row[f"{WR} [P2]"])
    tiny_row = df[df.experiment == "tiny-spin"].iloc[0]
    assert tiny_row[f"{WR} [P2]"] == metrics[WR] and pd.isna(tiny_row[f"{WR} [P1]"])
    # the imported rows' protocol is read from the annotations files
    for r in rows:
        if r["method"] == "published":
            p = r["protocol"]["alpaca_eval"]
            assert p["annotator"] == "weighted_alpaca_eval_gpt4_turbo" and p["judge_model"] == "gpt-4-1106-preview"
            assert p["reference"]["generator"] == ["gpt4_1106_preview"] and p["n_instructions"] == 805
            assert p["from_annotations_file"] == ["annotator", "generator_1"]
    md = to_markdown(build_table(rows))
    assert f"[P1] {AE2_LABEL}; [P2] {capped}" in md


def test_published_protocol_defaults_when_the_file_does_not_say(tmp_path):
    require(AE_DATA.is_dir(), f"published AlpacaEval files not found at {AE_DATA} (shared data folder absent)")
    from harness.evaluate.published import write_published_run

    ann = json.loads((AE_DATA / "alpaca-7b.weighted_alpaca_eval_gpt4_turbo.annotations.json").read_text())
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([{k: v for k, v in a.items() if k not in ("annotator", "generator_1")} for a in ann]))
    path = write_published_run(tmp_path / "x", "alpaca-7b", AE_DATA / "alpaca-7b.model_outputs.json", bare)
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    p = row["protocol"]["alpaca_eval"]
    assert p["annotator"] == "weighted_alpaca_eval_gpt4_turbo" and p["reference"]["generator"] == ["gpt4_1106_preview"]
    assert p["from_annotations_file"] == []
    assert build_table(load_rows([tmp_path / "x"])).protocol.tolist() == [AE2_LABEL]


def test_constants_match_the_evaluation():
    from harness.evaluate import alpaca, annotators
    from harness.report import protocol

    assert (protocol.RUBRIC, protocol.AE2, protocol.HUB_SET, protocol.AE_SET_SIZE) == (
        annotators.RUBRIC, annotators.AE2, annotators.HUB_SET, alpaca.AE_SET_SIZE)


def test_comparison_plot_has_a_panel_per_protocol(mixed, monkeypatch):
    from harness.report import plots

    seen = {}
    real = plots._comparison_figure

    def spy(by_exp, published):
        fig = real(by_exp, published)
        seen["titles"] = [ax.get_title() for ax in fig.axes if ax.get_title()]
        seen["suptitle"] = fig.get_suptitle()
        return fig

    monkeypatch.setattr(plots, "_comparison_figure", spy)
    pngs = plots.render_plots(load_rows([mixed]))
    assert "comparison" in pngs
    wins = [t for t in seen["titles"] if t.startswith("AlpacaEval win rate")]
    # the published systems (AlpacaEval 2.0, P1) have no run of their protocol to stand beside: no bars;
    # the tiny run's rubric win rate (P2) has its own panel
    assert [t.split("\n")[0].split(" (± s.e.)")[0] for t in wins] == ["AlpacaEval win rate (%) [P2]"]
    assert f"[P2] {RUBRIC_LABEL}" in seen["suptitle"] and "[P1]" not in seen["suptitle"]
    # a run of the published systems' protocol stands beside them, in its own panel
    ae2 = {**_published_protocol(), "judge_model": "gpt-4-1106-preview"}
    _write(mixed / "ae2-run", _tiny_run(protocol=ae2, exp="ae2-run"))
    plots.render_plots(load_rows([mixed]))
    wins = [t.split("\n")[0].split(" (± s.e.)")[0] for t in seen["titles"] if t.startswith("AlpacaEval win rate")]
    assert wins == ["AlpacaEval win rate (%) [P1]", "AlpacaEval win rate (%) [P2]"]


# ---------------------------------------------------------------- the endpoint, the items, the answer cap

LOCAL_URL = "http://127.0.0.1:8000/v1"


def _ae2_run_protocol(base_url: str, cap: int = 2048) -> dict:
    """An AlpacaEval 2.0 evaluation's record as protocol_record writes it for an annotator
    endpoint serving the model name gpt-4-1106-preview at ``base_url``."""
    return {**_published_protocol(), "endpoint_kind": "openai:chat/completions", "base_url": base_url,
            "endpoint": {"base_url": base_url, "model": "gpt-4-1106-preview"}, "max_new_tokens": cap}


def test_a_local_server_under_a_gpt4_name_is_not_gpt4(tmp_path):
    local = _ae2_run_protocol(LOCAL_URL)
    assert identity(local) != identity(_published_protocol())
    (name,) = labels([local]).values()
    assert name == f"weighted_alpaca_eval_gpt4_turbo judged by gpt-4-1106-preview at {LOCAL_URL} (vs gpt4_1106_preview)"
    assert "AlpacaEval 2.0" not in name
    assert difference(_published_protocol(), local) == (
        f"judge endpoint differs: gpt-4-1106-preview at https://api.openai.com/v1 vs gpt-4-1106-preview at {LOCAL_URL}")
    # at OpenAI's own API, uncut: the published systems' protocol
    official = _ae2_run_protocol("https://api.openai.com/v1/")
    assert identity(official) == identity(_published_protocol()) and labels([official]) == labels(
        [_published_protocol()])
    # the same judge on answers cut at 256 tokens is another protocol, and says so
    cut = _ae2_run_protocol("https://api.openai.com/v1", cap=256)
    assert list(labels([cut]).values()) == [AE2_LABEL + ", answers capped at 256 tokens"]
    assert difference(official, cut) == "answer cap (max_new_tokens) differs: none vs 256"
    # on the board: the local run gets its own column, the published systems keep theirs
    _write(tmp_path / "gemma-7b-it", [_published("gemma-7b-it", 6.93)])
    _write(tmp_path / "local", _tiny_run(protocol=local, exp="local"))
    df = build_table(load_rows([tmp_path]))
    assert _win_columns(df) == [f"{WR} [P1]", f"{WR} [P2]"]
    assert df.set_index("experiment")["protocol"].to_dict() == {"local": name, "gemma-7b-it": AE2_LABEL}


def test_a_subset_of_the_instructions_ranks_with_the_whole_set(tmp_path):
    """A published system with 803 of the 805 instructions annotated (as phi-2 on the published
    leaderboard) ranks in the same column as the 805-instruction systems; n says how many."""
    require(AE_DATA.is_dir(), f"published AlpacaEval files not found at {AE_DATA} (shared data folder absent)")
    from harness.report.published import import_published

    ann = json.loads((AE_DATA / "alpaca-7b.weighted_alpaca_eval_gpt4_turbo.annotations.json").read_text())
    outs = json.loads((AE_DATA / "alpaca-7b.model_outputs.json").read_text())
    part_ann, part_outs = tmp_path / "part.annotations.json", tmp_path / "part.model_outputs.json"
    part_ann.write_text(json.dumps(ann[:401] + ann[403:]))
    part_outs.write_text(json.dumps(outs[:401] + outs[403:]))
    board = tmp_path / "board"
    import_published(board, "alpaca-7b-803", part_outs, part_ann)
    import_published(board, "gemma-7b-it", AE_DATA / "gemma-7b-it.model_outputs.json",
                     AE_DATA / "gemma-7b-it.weighted_alpaca_eval_gpt4_turbo.annotations.json")
    df = build_table(load_rows([board]), sort_by="win_rate")
    assert _win_columns(df) == [WR] and df.protocol.tolist() == [AE2_LABEL] * 2
    assert df.set_index("experiment")[N].to_dict() == {"gemma-7b-it": 805, "alpaca-7b-803": 803}


# ---------------------------------------------------------------- lm-eval protocols

ACC = "lm_eval/tiny_mc/acc"


def _lm(shots: int, chat: bool = True) -> dict:
    return {"num_fewshot": shots, "apply_chat_template": chat, "fewshot_as_multiturn": chat,
            "system_instruction": "", "lm_eval_version": "0.4.9", "task_version": 1.0}


def _lm_row(exp: str, acc: float, lm: dict | None, it: int = 0, ae: dict | None = None) -> dict:
    metrics = {ACC: acc, EM: 0.5}
    protocol = {"lm_eval": {"tiny_mc": lm, "tiny_gen": _lm(0)}} if lm is not None else {}
    if ae is not None:
        metrics.update({WR: 40.0 + it, N: 4, COV: 1.0})
        protocol["alpaca_eval"] = ae
    return {"experiment": exp, "method": "spin", "iteration": it, "model": "m", "metrics": metrics,
            "protocol": protocol, "provenance": {"seed": 0}}


FIVE = "5-shot, chat template, few-shot as multi-turn, no system prompt, lm-eval 0.4.9, task version 1.0"
ZERO = "0-shot, no chat template, no system prompt, lm-eval 0.4.9, task version 1.0"
ZERO_CHAT = "0-shot, chat template, few-shot as multi-turn, no system prompt, lm-eval 0.4.9, task version 1.0"


def test_lm_eval_columns_split_by_task_protocol(tmp_path):
    _write(tmp_path / "five", [_lm_row("five", 0.9, _lm(5))])
    _write(tmp_path / "zero", [_lm_row("zero", 0.4, _lm(0, chat=False))])
    _write(tmp_path / "old", [_lm_row("old", 0.7, None)])
    rows = load_rows([tmp_path])
    df = build_table(rows)
    col = "protocol lm_eval/tiny_mc"
    assert df.set_index("experiment")[col].to_dict() == {"five": FIVE, "zero": ZERO, "old": UNKNOWN}
    # tags over the tasks alphabetically: tiny_gen (its recorded protocol, and "unknown" for the row
    # without a record) P1-P2, then tiny_mc's three P3-P5 (labels alphabetical: 0-shot, 5-shot, unknown)
    assert EM not in df.columns and f"{EM} [P1]" in df.columns and f"{EM} [P2]" in df.columns
    accs = [c for c in df.columns if c.startswith(ACC) and not c.endswith(" ±")]
    assert accs == [f"{ACC} [P3]", f"{ACC} [P4]", f"{ACC} [P5]"]
    got = {c: df.set_index("experiment")[c].dropna().to_dict() for c in accs}
    assert got == {f"{ACC} [P3]": {"zero": 0.4}, f"{ACC} [P4]": {"five": 0.9}, f"{ACC} [P5]": {"old": 0.7}}
    # sorting by the unsplit name puts one protocol after another, never ranking them together
    assert build_table(rows, sort_by="acc").experiment.tolist() == ["zero", "five", "old"]
    md = to_markdown(df)
    assert (f"lm-eval protocols (scores of different protocols are never ranked together; each has its own "
            f"columns): [P1] tiny_gen: {ZERO_CHAT}; [P2] tiny_gen: {UNKNOWN}; [P3] tiny_mc: {ZERO}; "
            f"[P4] tiny_mc: {FIVE}; [P5] tiny_mc: {UNKNOWN}.") in md
    to_csv(df, tmp_path / "t.csv")
    assert read_csv(tmp_path / "t.csv")[col].tolist() == df[col].tolist()
    # one protocol per task: nothing split, a note names each task's
    one = build_table(rows, filters={"experiment": "five"})
    assert ACC in one.columns and EM in one.columns
    md = to_markdown(one)
    assert md.endswith(f"\n\nlm-eval protocols: tiny_gen: {ZERO_CHAT}; tiny_mc: {FIVE}.")
    assert "protocol" not in md.splitlines()[0]


def test_lm_eval_backends_are_separate_protocols(tmp_path):
    """eval.backend is part of a task's protocol: numbers through vLLM are never ranked with
    numbers through transformers; a record from before the field existed is "hf" (every lm-eval
    number was), and only the vLLM label says its backend."""
    vllm = {**_lm(5), "backend": "vllm"}
    _write(tmp_path / "old", [_lm_row("old", 0.7, _lm(5))])
    _write(tmp_path / "hf", [_lm_row("hf", 0.6, {**_lm(5), "backend": "hf"})])
    _write(tmp_path / "vllm", [_lm_row("vllm", 0.65, vllm)])
    df = build_table(load_rows([tmp_path]))
    col = "protocol lm_eval/tiny_mc"
    assert df.set_index("experiment")[col].to_dict() == {"old": FIVE, "hf": FIVE, "vllm": f"{FIVE}, vllm backend"}
    accs = [c for c in df.columns if c.startswith(ACC) and not c.endswith(" ±")]
    assert accs == [f"{ACC} [P1]", f"{ACC} [P2]"]
    got = {c: df.set_index("experiment")[c].dropna().to_dict() for c in accs}
    assert got == {f"{ACC} [P1]": {"old": 0.7, "hf": 0.6}, f"{ACC} [P2]": {"vllm": 0.65}}
    scope = "lm_eval/tiny_mc"
    assert difference(_lm(5), {**_lm(5), "backend": "hf"}, scope) is None
    assert difference(_lm(5), vllm, scope) == "lm-eval backend differs: hf vs vllm"


def test_lm_eval_and_alpaca_eval_protocols_are_split_by_one_mechanism(tmp_path):
    _write(tmp_path / "a", [_lm_row("a", 0.9, _lm(5), ae=_rubric_protocol())])
    _write(tmp_path / "b", [_lm_row("b", 0.4, _lm(0), ae=_published_protocol())])
    df = build_table(load_rows([tmp_path]))
    # AlpacaEval's tags first (P1, P2), then tiny_mc's (P3 = 0-shot, P4 = 5-shot)
    assert f"{WR} [P1]" in df.columns and f"{WR} [P2]" in df.columns and f"{ACC} [P3]" in df.columns
    assert EM in df.columns  # tiny_gen: one protocol in both rows
    text, _ = to_terminal(df, 200)
    assert "[P3] tiny_mc: 0-shot" in " ".join(text.split()) and "[P1] " + AE2_LABEL in " ".join(text.split())


# ---------------------------------------------------------------- harness table --compare across protocols

def _evaluated_run(run: Path, ae: dict | None, lm: dict | None = None, in_results: bool = True) -> Path:
    d = run / "iter_000" / "evaluate"
    d.mkdir(parents=True)
    (d / "items.jsonl").write_text("".join(json.dumps({"metric": m, "item": f"i{k}", "value": float(k % 2)}) + "\n"
                                           for m in (WR, "lm_eval/tiny_mc/acc,none") for k in range(4)))
    protocol = {k: v for k, v in (("alpaca_eval", ae), ("lm_eval", lm)) if v is not None}
    if in_results:
        _write(run, [{"experiment": run.name, "method": "spin", "iteration": 0, "metrics": {WR: 50.0},
                      "protocol": protocol, "provenance": {}}])
    else:  # a run whose results row is not written yet: the evaluate stage's files say it
        for name, rec in protocol.items():
            (d / name).mkdir()
            (d / name / "metrics.json").write_text(json.dumps({"metrics": {}, "protocol": rec}))
    return run


def test_compare_refuses_to_pair_two_protocols(tmp_path, capfd):
    from harness.cli import main

    a = _evaluated_run(tmp_path / "a", _published_protocol())
    b = _evaluated_run(tmp_path / "b", {**_rubric_protocol(), "reference": _published_protocol()["reference"]})
    same = _evaluated_run(tmp_path / "same", _published_protocol())
    assert main(["table", "--compare", str(a), str(same)]) == 0
    assert "Protocols differ" not in capfd.readouterr().out
    assert main(["table", "--compare", str(a), str(b)]) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "alpaca_eval: annotator differs: weighted_alpaca_eval_gpt4_turbo vs " \
                                     "harness_rubric" in err and "--allow-protocol-mismatch" in err
    assert main(["table", "--compare", str(a), str(b), "--allow-protocol-mismatch"]) == 0
    out = capfd.readouterr().out
    assert "B - A at iteration 0" in out and "Protocols differ (paired anyway, --allow-protocol-mismatch): " \
                                             "alpaca_eval: annotator differs" in out
    # the judge model, read from the evaluate stage's files; lm-eval's settings per task
    c = _evaluated_run(tmp_path / "c", {**_rubric_protocol(), "judge_model": "gpt-4-1106-preview"}, in_results=False)
    d = _evaluated_run(tmp_path / "d", _rubric_protocol(), in_results=False)
    assert main(["table", "--compare", str(c), str(d)]) == 1
    assert "alpaca_eval: judge model differs: gpt-4-1106-preview vs oracle" in capfd.readouterr().err
    e = _evaluated_run(tmp_path / "e", _published_protocol(), {"tiny_mc": _lm(5)})
    f = _evaluated_run(tmp_path / "f", _published_protocol(), {"tiny_mc": _lm(0)})
    assert main(["table", "--compare", str(e), str(f)]) == 1
    assert "lm_eval/tiny_mc: num_fewshot differs: 5 vs 0" in capfd.readouterr().err
    assert main(["table", "--allow-protocol-mismatch"]) == 2  # only with --compare


def test_comparison_plot_splits_lm_eval_panels_by_protocol(tmp_path, monkeypatch):
    from harness.report import plots
    from harness.report.table import paired_of

    gain = {"mean": 0.1, "ci_low": 0.05, "ci_high": 0.15, "significant": True}
    rows = []
    for exp, shots in (("five", 5), ("zero", 0)):
        rows += [_lm_row(exp, 0.5, _lm(shots)), {**_lm_row(exp, 0.6, _lm(shots), it=1),
                                                   "paired": {f"{ACC},none": gain}}]
    seen = {}
    real = plots._comparison_figure

    def spy(by_exp, published):
        fig = real(by_exp, published)
        seen["titles"] = [ax.get_title().split("\n")[0] for ax in fig.axes if ax.get_title()]
        seen["suptitle"] = fig.get_suptitle()
        return fig

    monkeypatch.setattr(plots, "_comparison_figure", spy)
    plots.render_plots(rows)
    # tiny_mc's two protocols get a panel each (P1 = 0-shot, P2 = 5-shot); tiny_gen has one: one panel
    assert [t for t in seen["titles"] if "tiny_mc" in t] == ["tiny_mc acc [P1]", "tiny_mc acc [P2]"]
    assert [t for t in seen["titles"] if "tiny_gen" in t] == ["tiny_gen exact_match"]
    assert f"[P1] tiny_mc: {ZERO_CHAT}" in seen["suptitle"] and "[P2] tiny_mc: 5-shot" in seen["suptitle"]
    # a split key still finds its paired gain (the item key carries lm-eval's filter)
    split, _ = plots._by_protocol(rows)
    assert paired_of(split[1], f"{ACC} [P2]") == gain and paired_of(split[1], f"{ACC} [P1]") is None
