"""Samples cut at max_new_tokens: counted by the stages that generate them, marked in the
candidates and pairs, dropped from pairs when chosen (by default), and trained without an
end-of-turn; DNO's judge score mean is the policy's, the teacher's apart."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harness.run import stages
from harness.store import files as store
from harness.engines.vllm_engine import _sample
from harness.engines.generate import CUT, Prompt, Sampling, completion_ids, cut_metrics, generate, is_cut
from harness.methods import METHODS
from harness.methods.base import Candidate, Group, IterationContext
from harness.models.load import load_policy
from harness.train import dpo_trainer
from harness.train.probe import _sides
from test_eval_fixtures import tiny  # noqa: F401  (the fixture)
from test_methods import cfg_for, ex
from test_train import make_cfg


def test_hf_samples_that_hit_max_new_tokens_are_marked_and_counted(tiny):
    """Each sample's draws depend only on its own seed, so with a larger cap an ended sample
    comes out the same and a cut one goes on."""
    model, tok = tiny
    prompts = [Prompt(f"p{i}", ({"role": "user", "content": t},)) for i, t in enumerate(["say yes", "fox", "no"])]
    short = generate(model, tok, prompts, Sampling(temperature=1.0, max_new_tokens=3, n=4), seed_key=(0,))
    longer = generate(model, tok, prompts, Sampling(temperature=1.0, max_new_tokens=8, n=4), seed_key=(0,))
    pairs = [(s, t) for pid in short for s, t in zip(short[pid]["samples"], longer[pid]["samples"])]
    for s, t in pairs:
        if is_cut(s):
            assert s["finish"] == CUT and s["n_tokens"] == 3 and t["n_tokens"] > 3
        else:
            assert s["finish"] == "eos" and (t["text"], t["n_tokens"]) == (s["text"], s["n_tokens"])
    n_cut = sum(bool(is_cut(s)) for s, _ in pairs)
    assert 0 < n_cut < len(pairs)  # a random tiny model: some stop early, some are cut
    assert cut_metrics(short, "gen") == {"gen/n_cut": n_cut, "gen/cut_share": n_cut / len(pairs)}


def test_samples_of_an_older_run_without_finish_are_unknown_not_an_error():
    old = {"p0": {"id": "p0", "samples": [{"text": "a", "n_tokens": 1}]}}
    assert is_cut(old["p0"]["samples"][0]) is None
    assert cut_metrics(old, "gen") == {"gen/n_cut": None, "gen/cut_share": None}
    mixed = [{"samples": [{"finish": "eos"}, {"finish": CUT}, {}]}]
    assert cut_metrics(mixed, "x") == {"x/n_cut": 1, "x/cut_share": 0.5}


def test_vllm_samples_take_vllms_finish_reason():
    """vLLM says why a request ended; the record follows it (before, only an eos id among the
    returned tokens counted as an end, so a stop whose token vLLM left out read as cut)."""
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: " ".join(map(str, ids)))
    assert _sample(tok, {"token_ids": [5, 6, 7], "finish": "stop"}, {2})["finish"] == "eos"
    assert _sample(tok, {"token_ids": [5, 6, 7], "finish": "length"}, {2})["finish"] == CUT
    got = _sample(tok, {"token_ids": [5, 2, 7]}, {2})  # no reason sent: the eos id decides
    assert (got["finish"], got["n_tokens"]) == ("eos", 2)


def _samples_dir(tmp_path, records):
    store.write_jsonl(tmp_path / "samples.jsonl", records)
    return SimpleNamespace(final=tmp_path)


def test_candidates_are_marked_cut_from_their_samples(tmp_path):
    cfg = cfg_for("dno")
    ctx = IterationContext(cfg, 1, [], judge_scale=(1.0, 5.0))
    e = ex(0, response="the teacher answer")
    gen = _samples_dir(tmp_path, [{"id": "p0", "samples": [
        {"text": "a whole answer", "finish": "eos"}, {"text": "an answer cut in the mid", "finish": CUT},
        {"text": "an old sample"}]}])
    (g,) = stages.candidate_groups(SimpleNamespace(method=METHODS.get("dno")), ctx, gen, [e])
    assert [(c.source, c.cut) for c in g.candidates] == [("policy", False), ("policy", True), ("policy", None),
                                                         ("teacher", None)]


def _group(scores, cut, teacher=None):
    cands = [Candidate(f"c{j}", cut=c) for j, c in enumerate(cut)]
    if teacher is not None:
        cands.append(Candidate("t", source="teacher"))
        scores = [*scores, teacher]
    return Group(ex(len(scores)), cands, list(scores))


@pytest.mark.parametrize("method", ["self_rewarding", "dno"])
def test_a_pair_whose_chosen_answer_is_cut_is_dropped_by_default_and_counted(method):
    groups = [Group(ex(0), [Candidate("best but cut", cut=True), Candidate("bad", cut=False)], [5.0, 1.0]),
              Group(ex(1), [Candidate("good", cut=False), Candidate("bad and cut", cut=True)], [5.0, 1.0]),
              Group(ex(2), [Candidate("good", cut=None), Candidate("bad", cut=None)], [5.0, 1.0])]
    m = METHODS.get(method)
    pairs, stats = m.build_pairs(IterationContext(cfg_for(method), 1, [], judge_scale=(1.0, 5.0)), groups)
    assert [p["id"] for p in pairs] == ["p1", "p2"] and stats["pairs/cut_chosen_dropped"] == 1
    # a cut rejected answer is kept (the judge scored exactly that text) and marked
    assert [(p["chosen_cut"], p["rejected_cut"]) for p in pairs] == [(False, True), (None, None)]
    assert stats["pairs/rejected_cut"] == 1 and stats["pairs/chosen_cut"] == 0
    assert "pairs/cut_rejected_dropped" not in stats
    keep = cfg_for(method, {"cut_chosen": "keep", "cut_rejected": "drop"})
    pairs, stats = m.build_pairs(IterationContext(keep, 1, [], judge_scale=(1.0, 5.0)), groups)
    assert [(p["id"], p["chosen_cut"]) for p in pairs] == [("p0", True), ("p2", None)]
    assert stats["pairs/cut_rejected_dropped"] == 1 and stats["pairs/chosen_cut"] == 1


def test_spin_keeps_a_cut_opponent_answer_and_marks_it():
    ctx = IterationContext(cfg_for("spin"), 1, [])
    groups = [Group(ex(0, "42 is the answer"), [Candidate("41 is", cut=True)])]
    pairs, stats = METHODS.get("spin").build_pairs(ctx, groups)
    assert [(p["chosen"], p["rejected"], p["rejected_cut"]) for p in pairs] == [("42 is the answer", "41 is", True)]
    assert "chosen_cut" not in pairs[0] and stats["pairs/rejected_cut"] == 1


def test_a_cut_answer_trains_without_an_end_of_turn(tiny_dir, tmp_path):
    """trl's rows: a cut answer's ids are its text's, nothing after; a whole answer keeps the
    template's end-of-turn; the probe's forward tokenizes both exactly as the rows."""
    cfg = make_cfg(tiny_dir, tmp_path)
    model, tok = load_policy(cfg, [])
    msgs = [{"role": "user", "content": "say yes"}]
    pairs = [{"id": "a", "messages": msgs, "chosen": "yes yes", "rejected": "no no", "chosen_cut": True,
              "rejected_cut": False},
             {"id": "b", "messages": msgs, "chosen": "yes yes", "rejected": "no no", "rejected_cut": True},
             {"id": "c", "messages": msgs, "chosen": "yes yes", "rejected": "no no"}]
    data = dpo_trainer(model, tok, pairs, cfg, 1, tmp_path / "it1").train_dataset
    rows = {r["row"]: r for r in data}
    closed = completion_ids(tok, msgs, "yes yes")[1]
    open_ = completion_ids(tok, msgs, "yes yes", end_turn=False)[1]
    eot = closed[len(open_):]
    assert eot and closed[:len(open_)] == open_   # the template closes the turn after the text
    assert rows[0]["chosen_ids"] == open_ and rows[1]["chosen_ids"] == rows[2]["chosen_ids"] == closed
    no_closed, no_open = completion_ids(tok, msgs, "no no")[1], completion_ids(tok, msgs, "no no", end_turn=False)[1]
    assert rows[1]["rejected_ids"] == no_open and rows[0]["rejected_ids"] == rows[2]["rejected_ids"] == no_closed
    assert tok.decode(rows[0]["chosen_ids"]).rstrip().endswith("yes yes")
    for i, p in enumerate(pairs):
        shared, sides = _sides(tok, p, cfg.training.max_length)
        assert [shared + r for r, _ in sides] == [rows[i]["prompt_ids"] + rows[i][f"{k}_ids"]
                                                  for k in ("chosen", "rejected")]


def test_dno_judge_score_mean_is_the_policys_and_the_teachers_is_apart():
    groups = [_group([2.0, 4.0], [False, False], teacher=5.0), _group([3.0, 1.0], [False, False], teacher=5.0)]
    groups[1].candidates[1] = Candidate("rep", fixed_score=1.0)  # an automatic negative: no judgment
    recs = [{"scores": g.scores} for g in groups]
    got = stages.score_metrics(groups, recs)
    assert got["judge/score_mean"] == pytest.approx(3.0)  # (2 + 4 + 3) / 3; with the teacher's it was 3.8
    assert got["judge/teacher_score_mean"] == 5.0 and (got["judge/score_min"], got["judge/score_max"]) == (2.0, 4.0)
    no_teacher = stages.score_metrics([_group([2.0, 4.0], [None, None])], [{"scores": [2.0, 4.0]}])
    assert no_teacher["judge/teacher_score_mean"] is None and no_teacher["judge/score_mean"] == 3.0


@pytest.mark.slow
@pytest.mark.usefixtures("library_console")
def test_short_samples_through_the_loop_are_counted_and_cut_chosen_answers_dropped(tmp_path):
    """Self-Rewarding with an oracle judge and answers capped at 4 tokens: the generate stage
    counts the cut samples, the pairs stage drops exactly the pairs whose best sample is cut
    and marks kept cut rejected answers, and training runs on them."""
    from harness.config.experiment import parse
    from harness.run.loop import run_experiment

    doc = {"experiment": {"name": "cut", "seed": 0, "output_dir": str(tmp_path / "out")},
           "model": {"base": "tiny", "device": "cpu", "cpu_threads": 1}, "lora": {"r": 4, "alpha": 8},
           "data": {"train": "tiny:prompts_train"}, "generation": {"max_new_tokens": 4, "batch_size": 64},
           "method": {"name": "self_rewarding", "iterations": 1,
                      "self_rewarding": {"num_samples": 4, "prompts_per_iteration": 16, "temperature": 1.5,
                                         "top_p": 1.0}},
           "judge": {"name": "oracle"},
           "training": {"learning_rate": 1e-3, "epochs": 1, "batch_size": 8, "max_length": 96, "warmup_ratio": 0.0},
           "eval": {"indicators": {"num_prompts": 0}}}
    run, _ = run_experiment(parse(doc))
    it = run / "iter_001"
    metrics = {st: store.read_json(it / st / "manifest.json")["outputs"]["metrics"]
               for st in ("generate", "pairs", "train")}
    samples = {r["id"]: r["samples"] for r in store.read_jsonl(it / "generate" / "samples.jsonl")}
    n_cut = sum(s["finish"] == CUT for ss in samples.values() for s in ss)
    assert metrics["generate"]["gen/n_cut"] == n_cut and 0 < n_cut < 64
    judged = {r["id"]: r["scores"] for r in store.read_jsonl(it / "judge" / "judgments.jsonl")}
    dropped, expect = 0, []
    for pid in (q["id"] for q in store.read_jsonl(it / "generate" / "prompts.jsonl")):  # the pairs' order
        ss = samples[pid]
        scored = [(s, x) for s, x in zip(judged[pid], ss) if s is not None]
        if len(scored) < 2 or max(s for s, _ in scored) == min(s for s, _ in scored):
            continue
        best = max(scored, key=lambda sx: (sx[0], sx[1]["finish"] != CUT))[1]  # a whole one first
        dropped += best["finish"] == CUT
        if best["finish"] != CUT:
            expect.append(pid)
    pairs = store.read_jsonl(it / "pairs" / "pairs.jsonl")
    assert [p["id"] for p in pairs] == expect and dropped > 0
    assert metrics["pairs"]["pairs/cut_chosen_dropped"] == dropped
    assert not any(p["chosen_cut"] for p in pairs) and metrics["pairs"]["pairs/rejected_cut"] > 0
    assert metrics["train"]["train/n_pairs"] == len(pairs)


@pytest.mark.parametrize("method", ["self_rewarding", "dno"])
def test_among_equal_scores_a_whole_answer_is_chosen_before_a_cut_one(method):
    """A cut and a whole sample tie at the top: the whole one is the chosen answer, so the pair
    is kept (it used to be the first of equals, then dropped for its cut chosen answer); the
    same for the rejected side under cut_rejected = "drop"."""
    groups = [Group(ex(0), [Candidate("cut best", cut=True), Candidate("whole best", cut=False),
                            Candidate("bad", cut=False)], [5.0, 5.0, 1.0]),
              Group(ex(1), [Candidate("good", cut=False), Candidate("cut bad", cut=True),
                            Candidate("whole bad", cut=False)], [5.0, 1.0, 1.0])]
    m = METHODS.get(method)
    cfg = cfg_for(method, {"cut_rejected": "drop"})
    pairs, stats = m.build_pairs(IterationContext(cfg, 1, [], judge_scale=(1.0, 5.0)), groups)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("whole best", "bad"), ("good", "whole bad")]
    assert stats["pairs/cut_chosen_dropped"] == stats["pairs/cut_rejected_dropped"] == 0
