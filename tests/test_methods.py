"""Method strategies on hand-built samples and score tables (no model needed)."""

from __future__ import annotations

import pytest

from harness.config import parse
from harness.data import Example
from harness.methods.base import Candidate, Group, IterationContext, iteration_slice
from harness.methods.dno import replayed, repetition_rate
from harness.registry import METHODS


def cfg_for(method, options=None, judge="oracle"):
    doc = {"experiment": {"name": "m"}, "model": {"base": "tiny"}, "data": {"train": "x.jsonl"},
           "method": {"name": method, **({method: options} if options else {})}, "judge": {"name": judge}}
    if method == "spin":
        doc["judge"] = {"name": "none"}
    return parse(doc)


def ex(i, response=None):
    return Example(f"p{i}", ({"role": "user", "content": f"question {i}"},), response)


def groups_from(table, sources=None):
    """table: {prompt index: [score, ...]}; candidate texts are c0, c1, ..."""
    out = []
    for i, scores in table.items():
        srcs = (sources or {}).get(i, ["policy"] * len(scores))
        out.append(Group(ex(i), [Candidate(f"c{j}", source=s) for j, s in enumerate(srcs)], list(scores)))
    return out


# ---- Self-Rewarding -------------------------------------------------------------
def test_self_rewarding_pairs_are_max_vs_min_and_ties_dropped():
    cfg = cfg_for("self_rewarding")
    m = METHODS.get("self_rewarding")
    ctx = IterationContext(cfg, 1, [])
    groups = groups_from({0: [3.0, 4.67, 1.33, 2.0], 1: [3.0, 3.0, 3.0, 3.0], 2: [None, 5.0, None, None],
                          3: [2.0, None, 4.0, 4.0]})
    pairs, stats = m.build_pairs(ctx, groups)
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [("p0", "c1", "c2"), ("p3", "c2", "c0")]
    assert stats["pairs/ties_dropped"] == 1 and stats["pairs/too_few_scores"] == 1
    assert stats["pairs/n_pairs"] == 2 and {k: v for k, v in stats.items() if "hist" in k} == {
        "pairs/score_hist_1": 1, "pairs/score_hist_2": 2, "pairs/score_hist_3": 5, "pairs/score_hist_4": 2,
        "pairs/score_hist_5": 2}


def test_self_rewarding_requires_several_self_judgments():
    from harness.schema import ConfigError

    with pytest.raises(ConfigError, match="judge.samples"):
        cfg_for("self_rewarding", judge="self")


# ---- DNO --------------------------------------------------------------------------
def test_dno_margin_filter_and_teacher_handling():
    cfg = cfg_for("dno", {"margin": 2.0, "student_margin": 1.0, "positive_min": 0.75})
    m = METHODS.get("dno")
    ctx = IterationContext(cfg, 1, [], judge_scale=(1.0, 5.0))   # positive must reach 4.0
    teacher_last = ["policy", "policy", "teacher"]
    groups = groups_from({
        0: [1.0, 3.0, 5.0],     # teacher 5 vs 1: margin 4 >= 2 -> kept, chosen = teacher
        1: [3.0, 3.5, 4.0],     # teacher 4 vs 3: margin 1 < 2 -> dropped
        2: [4.0, 3.0],          # student 4 vs 3: margin 1 >= 1 -> kept (no teacher)
        3: [3.5, 1.0],          # best 3.5 below the top -> dropped
        4: [5.0, 2.0, 5.0],     # tie at the top: the teacher is preferred as positive
    }, sources={0: teacher_last, 1: teacher_last, 4: teacher_last})
    pairs, stats = m.build_pairs(ctx, groups)
    got = [(p["id"], p["chosen"], p["rejected"], p["chosen_source"]) for p in pairs]
    assert got == [("p0", "c2", "c0", "teacher"), ("p2", "c0", "c1", "policy"), ("p4", "c2", "c1", "teacher")]
    assert stats["pairs/dropped_margin_too_small"] == 1 and stats["pairs/dropped_positive_below_top"] == 1
    assert stats["pairs/teacher_positives"] == 2


def test_dno_candidates_add_teacher_and_mark_repetitive_samples():
    cfg = cfg_for("dno")
    m = METHODS.get("dno")
    ctx = IterationContext(cfg, 1, [], judge_scale=(1.0, 5.0))
    cands = m.candidates(ctx, ex(0, response="the teacher answer"),
                         ["a fine answer here", "go go go go go go go go go go", "ababababababab"])
    assert [c.source for c in cands] == ["policy", "policy", "policy", "teacher"]
    assert [c.fixed_score for c in cands] == [None, 1.0, 1.0, None]


@pytest.mark.parametrize("text, n, lo, hi", [
    ("the cat sat on the mat today", 3, 0.0, 0.0),
    ("go go go go go go go go", 3, 0.8, 1.0),
    ("abcabcabcabc", 3, 0.6, 0.8),   # short answers: character n-grams
    ("", 3, 0.0, 0.0),
])
def test_repetition_rate(text, n, lo, hi):
    assert lo <= repetition_rate(text, n) <= hi


def test_replay_fractions_take_from_earlier_iterations():
    earlier = {1: [{"id": f"a{i}"} for i in range(10)], 2: [{"id": f"b{i}"} for i in range(10)]}
    own = [{"id": f"c{i}"} for i in range(10)]
    got = replayed(own, (0.3, 0.15), 3, lambda k: earlier[k])
    assert [p["id"] for p in got] == ["b0", "b1", "b2", "a0", "a1"]   # round(0.15 * 10) = 2
    assert replayed(own, (0.3, 0.15), 1, lambda k: earlier[k]) == []  # nothing earlier


def test_prompts_split_into_non_overlapping_parts():
    items = list(range(10))
    parts = [iteration_slice(items, 4, t) for t in (1, 2)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="only 10 exist; set reuse_prompts"):
        iteration_slice(items, 4, 3)                        # never wraps silently
    assert iteration_slice(items, 4, 3, reuse=True) == [8, 9, 0, 1]   # wraps when asked to
    assert iteration_slice(items, 0, 5) == items


def test_dno_selects_best_iterate():
    cfg = cfg_for("dno", {"select_metric": "lm_eval/t/exact_match"})
    rows = [{"iteration": i, "metrics": {"lm_eval/t/exact_match": v}} for i, v in enumerate([0.2, 0.5, 0.4, 0.5])]
    assert METHODS.get("dno").select_final(cfg, rows) == {"iteration": 1, "metric": "lm_eval/t/exact_match",
                                                          "value": 0.5}


# ---- SPIN -------------------------------------------------------------------------
def test_spin_pairs_human_vs_model_and_drops_identical():
    cfg = cfg_for("spin")
    m = METHODS.get("spin")
    ctx = IterationContext(cfg, 2, [])
    groups = [Group(ex(0, "42"), [Candidate("41")]), Group(ex(1, "yes"), [Candidate(" yes ")])]
    pairs, stats = m.build_pairs(ctx, groups)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("42", "41")]
    assert stats["pairs/identical_dropped"] == 1


@pytest.mark.parametrize("mix, want", [("newest", [3]), ("newest_plus_previous", [2, 3]), ("all", [1, 2, 3])])
def test_spin_data_schedule(mix, want):
    cfg = cfg_for("spin", {"data_mix": mix})
    ctx = IterationContext(cfg, 3, [], pairs_of=lambda k: [{"iteration": k}])
    assert [p["iteration"] for p in METHODS.get("spin").training_set(ctx)] == want


def test_spin_needs_human_answers():
    cfg = cfg_for("spin")
    ctx = IterationContext(cfg, 1, [ex(0, "a"), ex(1, None)])
    with pytest.raises(ValueError, match="response_field"):
        METHODS.get("spin").prompts(ctx)


def test_self_instruct_dedups_and_filters_by_length():
    from harness.data import Example

    cfg = cfg_for("self_rewarding", {"self_instruct": 4, "self_instruct_shots": 2, "self_instruct_min_chars": 5,
                                     "self_instruct_max_chars": 30})
    seeds = [Example(f"s{i}", ({"role": "user", "content": f"seed task {i}"},)) for i in range(3)]
    answers = iter(["Count the cats.\nTask: more", "seed task 1", "hi", "Count the cats."])
    seen_prompts = []

    def fake_generate(prompts, sampling, tag):
        seen_prompts.extend(prompts)
        return {p.id: {"samples": [{"text": next(answers)}]} for p in prompts}

    ctx = IterationContext(cfg, 1, seeds, generate=fake_generate)
    new = METHODS.get("self_rewarding")._self_instruct(ctx, seeds)
    # first line only; a copy of a seed, a too-short one and a duplicate are dropped
    assert [e.instruction for e in new] == ["Count the cats."]
    assert "Task: seed task 0\nTask: seed task 1" in seen_prompts[0].messages[0]["content"]


def test_chat_messages_and_parquet_input(tmp_path):
    import pandas as pd

    from harness.data import load_examples
    from harness.config import DataSection

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             "prompt_id": "a"},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}], "prompt_id": "b"}]
    path = tmp_path / "chat.parquet"
    pd.DataFrame(rows).to_parquet(path)
    exs = load_examples(DataSection(train=str(path), messages_field="messages", id_field="prompt_id"))
    assert [(e.id, e.response, [m["role"] for m in e.messages]) for e in exs] == [
        ("a", "hello", ["user"]), ("b", "4", ["system", "user"])]
