"""Method strategies on hand-built samples and score tables (no model needed)."""

from __future__ import annotations

import pytest

import math
import random

from harness.config.experiment import SftSection, parse
from harness.models.data import Example
from harness.methods.base import Candidate, Group, IterationContext, iteration_slice
from harness.methods.dno import replayed, repetition_rate
from harness.methods import METHODS
from harness.config.schema import ConfigError

VALIDATION = {"validation": {"prompts": "v.jsonl"}}


def cfg_for(method, options=None, judge="oracle", **sections):
    doc = {"experiment": {"name": "m"}, "model": {"base": "tiny"}, "data": {"train": "x.jsonl"},
           "method": {"name": method, **({method: options} if options else {})},
           "judge": judge if isinstance(judge, dict) else {"name": judge}, **sections}
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


def test_self_rewarding_pairs_on_the_rubrics_zero_to_five_scale():
    """The additive rubric gives 0 to the worst answers: they pair as rejected, not drop out."""
    cfg = cfg_for("self_rewarding")
    ctx = IterationContext(cfg, 1, [], judge_scale=(0.0, 5.0))
    pairs, stats = METHODS.get("self_rewarding").build_pairs(ctx, groups_from({0: [0.0, 3.0, 0.0, 2.0]}))
    assert [(p["chosen"], p["rejected"], p["score_rejected"]) for p in pairs] == [("c1", "c0", 0.0)]
    assert stats["pairs/score_hist_0"] == 2


def test_self_rewarding_requires_several_self_judgments():
    with pytest.raises(ConfigError, match=r"judge\.self\.samples"):
        cfg_for("self_rewarding", judge="self")


def test_self_rewarding_sft_settings_are_its_own():
    cfg = cfg_for("self_rewarding", {"ift": "i.jsonl", "sft": {"learning_rate": 2e-5, "epochs": 3, "batch_size": 4}},
                  training={"learning_rate": 1e-6})
    m = METHODS.get("self_rewarding")
    got = m.init_sft_settings(cfg)
    assert got is cfg.options.sft and m.init_sft_settings(cfg_for("self_rewarding")) is None  # no data, no stage
    assert (got.learning_rate, got.epochs, got.batch_size) == (2e-5, 3.0, 4) and cfg.training.learning_rate == 1e-6
    assert SftSection().learning_rate == 1e-4 and SftSection().batch_size == 16   # documented defaults
    with pytest.raises(ConfigError, match=r"method\.self_rewarding\.sft\.learnin_rate.*did you mean 'learning_rate'"):
        cfg_for("self_rewarding", {"sft": {"learnin_rate": 1e-5}})


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


def test_dno_tie_at_the_top_keeps_the_pair_that_passes():
    """Teacher and student tie at the top, the worst is 1 point below: the teacher's pair
    needs 2, the student's 1. The student's pair is kept (it used to be dropped because the
    teacher was picked first); when both pass, the teacher is the positive."""
    cfg = cfg_for("dno", {"margin": 2.0, "student_margin": 1.0})
    ctx = IterationContext(cfg, 1, [], judge_scale=(1.0, 5.0))
    groups = groups_from({0: [5.0, 4.0, 5.0], 1: [5.0, 2.0, 5.0], 2: [4.0, 3.0, 4.0]},
                         sources={k: ["policy", "policy", "teacher"] for k in range(3)})
    pairs, stats = METHODS.get("dno").build_pairs(ctx, groups)
    assert [(p["id"], p["chosen"], p["chosen_source"]) for p in pairs] == [
        ("p0", "c0", "policy"), ("p1", "c2", "teacher"), ("p2", "c0", "policy")]
    assert "pairs/dropped_margin_too_small" not in stats


def test_dno_candidates_add_teacher_and_mark_repetitive_samples():
    cfg = cfg_for("dno")
    m = METHODS.get("dno")
    texts = ["a fine answer here", "go go go go go go go go go go", "ababababababab"]
    ctx = IterationContext(cfg, 1, [], judge_scale=(1.0, 5.0))
    cands = m.candidates(ctx, ex(0, response="the teacher answer"), texts)
    assert [c.source for c in cands] == ["policy", "policy", "policy", "teacher"]
    assert [c.fixed_score for c in cands] == [None, 1.0, 1.0, None]
    # the bottom of the judge's own scale, known before candidates are built
    zero = m.candidates(IterationContext(cfg, 1, [], judge_scale=(0.0, 5.0)), ex(0), texts)
    assert [c.fixed_score for c in zero] == [None, 0.0, 0.0]
    unbounded = m.candidates(IterationContext(cfg, 1, [], judge_scale=(-math.inf, math.inf)), ex(0), texts)
    assert [c.fixed_score for c in unbounded] == [None, -math.inf, -math.inf]
    with pytest.raises(ValueError, match="scale"):
        m.candidates(IterationContext(cfg, 1, []), ex(0), texts)


def test_dno_unbounded_scale_rewards():
    """A reward model's scale is (-inf, inf): the threshold is a quantile of the iteration's
    rewards (never NaN, which silently let every pair through), margins are in standard
    deviations, and a repetitive sample can never be chosen: it is below every real reward."""
    cfg = cfg_for("dno", {"positive_min": 0.5, "margin": 1.0, "student_margin": 0.5})
    ctx = IterationContext(cfg, 1, [], judge_scale=(-math.inf, math.inf))
    auto = -math.inf
    g = [Group(ex(0), [Candidate("rep", fixed_score=auto), Candidate("a"), Candidate("b")], [auto, -7.0, -6.5]),
         Group(ex(1), [Candidate("x"), Candidate("y")], [3.0, 2.9]),
         Group(ex(2), [Candidate("lo"), Candidate("hi")], [-9.0, 4.0])]
    pairs, stats = METHODS.get("dno").build_pairs(ctx, g)
    # real rewards -9, -7, -6.5, 2.9, 3, 4: the median (nearest rank below) is -6.5; mean -2.1, sd sqrt(179.2 / 6)
    assert stats["pairs/positive_threshold"] == -6.5
    assert stats["pairs/margin_unit"] == pytest.approx(math.sqrt(179.2 / 6)) and stats["pairs/score_center"] == pytest.approx(-2.1)
    got = [(p["id"], p["chosen"], p["rejected"], p["rejected_auto_negative"]) for p in pairs]
    # p0: "b" (-6.5) reaches the threshold and beats the automatic negative; p1: 0.1 < 0.5 sd apart
    assert got == [("p0", "b", "rep", True), ("p2", "hi", "lo", False)]
    assert pairs[0]["score_rejected"] is None and stats["pairs/dropped_margin_too_small"] == 1
    # a repetitive sample never becomes the positive, even when the judge "likes" nothing else
    alone = [Group(ex(3), [Candidate("rep", fixed_score=auto), Candidate("a")], [auto, -50.0])]
    pairs, _ = METHODS.get("dno").build_pairs(ctx, alone)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "rep")]


@pytest.mark.parametrize("text, n, lo, hi", [
    ("the cat sat on the mat today", 3, 0.0, 0.0),
    ("go go go go go go go go", 3, 0.8, 1.0),
    ("abcabcabcabc", 3, 0.6, 0.8),   # short answers: character n-grams
    ("", 3, 0.0, 0.0),
])
def test_repetition_rate(text, n, lo, hi):
    assert lo <= repetition_rate(text, n) <= hi


def test_replay_is_a_seeded_sample_of_earlier_iterations():
    earlier = {1: [{"id": f"a{i}"} for i in range(40)], 2: [{"id": f"b{i}"} for i in range(40)]}
    own = [{"id": f"c{i}"} for i in range(20)]
    got = [p["id"] for p in replayed(own, (0.3, 0.15), 3, lambda k: earlier[k], seed=0)]
    # round(0.3 * 20) = 6 from iteration 2, round(0.15 * 20) = 3 from iteration 1, no repeats
    assert [g[0] for g in got] == ["b"] * 6 + ["a"] * 3 and len(set(got)) == 9
    # kept in file order, and not simply the first ones (a sample, not a prefix)
    b = [int(g[1:]) for g in got[:6]]
    assert b == sorted(b) and b != list(range(6))
    assert got == [p["id"] for p in replayed(own, (0.3, 0.15), 3, lambda k: earlier[k], seed=0)]  # seeded
    # another experiment seed or iteration draws another sample
    assert len({tuple(p["id"] for p in replayed(own, (0.3,), 2, lambda k: earlier[k], seed=s)) for s in range(5)}) > 1
    assert [p["id"] for p in replayed(own, (0.3,), 2, lambda k: earlier[1], seed=0)] != \
        [p["id"] for p in replayed(own, (0.3,), 3, lambda k: earlier[1], seed=0)]
    assert replayed(own, (0.3, 0.15), 1, lambda k: earlier[k], seed=0) == []  # nothing earlier
    # never more than there is
    assert len(replayed(own, (1.0,), 2, lambda k: earlier[k][:3], seed=0)) == 3


def test_prompts_split_into_non_overlapping_parts():
    items = list(range(10))
    parts = [iteration_slice(items, 4, t) for t in (1, 2)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="only 10 exist; set reuse_prompts"):
        iteration_slice(items, 4, 3)                        # never wraps silently
    assert iteration_slice(items, 4, 3, reuse=True) == [8, 9, 0, 1]   # wraps when asked to
    assert iteration_slice(items, 0, 5) == items


def test_dno_selects_best_iterate_on_validation():
    cfg = cfg_for("dno", {"select_metric": "validation/judge/score_mean"}, eval=VALIDATION)
    rows = [{"iteration": i, "metrics": {"validation/judge/score_mean": v, "lm_eval/t/exact_match": 1 - v}}
            for i, v in enumerate([0.2, 0.5, 0.4, 0.5])]
    assert METHODS.get("dno").select_final(cfg, rows) == {"iteration": 1, "metric": "validation/judge/score_mean",
                                                          "value": 0.5}


def test_dno_never_selects_on_a_reported_metric():
    with pytest.raises(ConfigError, match="select_metric.*peek at the test numbers"):
        cfg_for("dno", {"select_metric": "lm_eval/t/exact_match"})
    with pytest.raises(ConfigError, match=r"select_metric.*\[eval.validation\] configures no evaluation"):
        cfg_for("dno", {"select_metric": "validation/judge/score_mean"})


def test_dno_trains_at_most_one_epoch_per_iteration():
    with pytest.raises(ConfigError, match=r"training.epochs: 2 epochs per iteration; DNO trains at most one epoch"):
        cfg_for("dno", training={"epochs": 2.0})
    assert cfg_for("dno", training={"epochs": 1.0}).training.epochs == 1.0
    assert cfg_for("spin", training={"epochs": 2.0}).training.epochs == 2.0  # SPIN's paper: 2 epochs


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
    cfg = cfg_for("self_rewarding", {"self_instruct": 4, "self_instruct_shots": 2, "self_instruct_min_chars": 5,
                                     "self_instruct_max_chars": 30})
    seeds = [Example(f"s{i}", ({"role": "user", "content": f"seed task {i}"},)) for i in range(3)]
    m = METHODS.get("self_rewarding")
    plan = m.self_instruct(IterationContext(cfg, 1, seeds))
    assert plan.model == "" and [r.id for r in plan.requests] == ["si-1-0", "si-1-1", "si-1-2", "si-1-3"]
    assert "Task: seed task 0\nTask: seed task 1" in plan.requests[0].messages[0]["content"]
    answers = ["Count the cats.\nTask: more", "seed task 1", "hi", "Count the cats."]
    out = {r.id: {"samples": [{"text": a}]} for r, a in reversed(list(zip(plan.requests, answers)))}
    # first line only; a copy of a seed, a too-short one and a duplicate are dropped
    assert [(e.id, e.instruction) for e in plan.select(out)] == [("si-1-0", "Count the cats.")]
    # the base prompts come without the generated ones (the loop adds the stage's output)
    assert m.prompts(IterationContext(cfg, 1, seeds)) == seeds
    # the next iteration shows other shots
    later = m.self_instruct(IterationContext(cfg, 2, seeds))
    assert later.requests[0].messages != plan.requests[0].messages
    fixed = cfg_for("self_rewarding", {"self_instruct": 1, "self_instruct_model": "smollm2-135m-instruct"})
    assert m.self_instruct(IterationContext(fixed, 1, seeds)).model == "smollm2-135m-instruct"
    assert m.self_instruct(IterationContext(cfg_for("self_rewarding"), 1, seeds)) is None


def test_chat_messages_and_parquet_input(tmp_path):
    import pandas as pd

    from harness.models.data import load_examples
    from harness.config.experiment import DataSection

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             "prompt_id": "a"},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}], "prompt_id": "b"}]
    path = tmp_path / "chat.parquet"
    pd.DataFrame(rows).to_parquet(path)
    exs = load_examples(DataSection(train=str(path), messages_field="messages", id_field="prompt_id"), seed=0)
    assert [(e.id, e.response, [m["role"] for m in e.messages]) for e in exs] == [
        ("a", "hello", ["user"]), ("b", "4", ["system", "user"])]


def test_num_prompts_subset_follows_the_experiment_seed(tmp_path):
    from harness.config.experiment import DataSection
    from harness.models.data import load_examples

    path = tmp_path / "p.jsonl"
    path.write_text("".join(f'{{"id": "q{i:02d}", "prompt": "task {i}"}}\n' for i in range(30)))
    section = DataSection(train=str(path), num_prompts=10)
    subset = {s: [e.id for e in load_examples(section, seed=s)] for s in (0, 1, 2)}
    assert all(len(ids) == 10 for ids in subset.values())
    assert len({tuple(ids) for ids in subset.values()}) == 3          # another seed, another subset
    ids = sorted(f"q{i:02d}" for i in range(30))
    random.Random(1).shuffle(ids)
    assert subset[1] == ids[:10]                                      # sorted by id, shuffled with the seed
    assert [e.id for e in load_examples(DataSection(train=str(path)), seed=5)][:3] == ["q00", "q01", "q02"]


def test_self_rewarding_m1_data_and_new_prompts_use_the_system_prompt(tmp_path):
    """M1 trains, and self-instructed prompts are sampled, in the context every generation prompt
    has (after data.system_prompt); EFT examples are judge prompts, sent without it."""
    import json

    rows = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(3)]
    for name in ("ift", "eft"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfg_for("self_rewarding", {"ift": str(tmp_path / "ift.jsonl"), "eft": str(tmp_path / "eft.jsonl"),
                                     "self_instruct": 2, "self_instruct_shots": 2},
                  data={"train": "x.jsonl", "system_prompt": "Answer briefly."})
    m = METHODS.get("self_rewarding")
    data = m.init_sft_data(cfg)
    system = {"role": "system", "content": "Answer briefly."}
    assert [d["messages"][0] for d in data[:3]] == [system] * 3                   # IFT
    assert all(d["messages"][0]["role"] == "user" for d in data[3:]) and len(data) == 6  # EFT
    plan = m.self_instruct(IterationContext(cfg, 1, [ex(i) for i in range(4)]))
    new = plan.select({r.id: {"samples": [{"text": f"Write a poem number {i} about the sea"}]}
                       for i, r in enumerate(plan.requests)})
    assert [e.messages[0] for e in new] == [system] * 2 and new[0].instruction.startswith("Write a poem")


def test_eft_prompts_must_be_the_judge_template_filled_in(tmp_path):
    import json

    from harness.judges.parsing import load_judge_template

    tpl = load_judge_template("").text  # the built-in additive rubric, the self-judge's default
    good = tpl.replace("{instruction}", "Say hi.").replace("{response}", "hi")
    for name, prompt in (("good", good), ("bad", "Rate this answer from 1 to 10: hi")):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"prompt": prompt, "response": "Score: 4"}) + "\n")
    judge = {"name": "self", "self": {"samples": 3, "temperature": 0.7}}  # a self-judge that samples
    m = METHODS.get("self_rewarding")
    ok = cfg_for("self_rewarding", {"eft": str(tmp_path / "good.jsonl")}, judge=judge)
    assert m.check_inputs(ok, [ex(i) for i in range(40)]) == []
    bad = cfg_for("self_rewarding", {"eft": str(tmp_path / "bad.jsonl")}, judge=judge)
    errors = m.check_inputs(bad, [ex(i) for i in range(40)])
    assert [e.path for e in errors] == ["method.self_rewarding.eft"]
    assert "is not a prompt of the judge's template" in errors[0].message
