"""Self-Rewarding and DNO through the real loop (``harness.run.loop.run_experiment``) on the
embedded tiny world, with few prompts and small evaluations. Each test reads back the
artefacts of every stage and checks them against the papers' rules: M1 SFT with its own
settings, self-instruction as its own stage, generation, judging on the judge's own scale,
pairs, replay, training against the previous iterate, evaluation, and DNO's best-iterate
selection on validation data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from harness.run import loop
from harness.run import stages
from harness.store import files as store
from harness.config.experiment import parse
from harness.models.data import Example
from harness.methods import METHODS
from harness.engines.generate import is_cut
from harness.methods.base import Group, IterationContext, mark_cut
from harness.run.loop import run_experiment
from harness.models.sources import resolve_ref

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("library_console")]


def read(path: Path) -> list[dict]:
    return store.read_jsonl(path)


def manifest(run: Path, t: int, stage: str) -> dict:
    return json.loads((run / f"iter_{t:03d}" / stage / "manifest.json").read_text())["outputs"]


def subset(ref: str, n: int, dest: Path) -> str:
    dest.write_text("".join(line + "\n" for line in Path(resolve_ref(ref)).read_text().splitlines()[:n]))
    return str(dest)


def common(tmp_path: Path, name: str) -> dict:
    return {"experiment": {"name": name, "seed": 0, "output_dir": str(tmp_path / "out")},
            "model": {"base": "tiny", "device": "cpu", "cpu_threads": 1},
            "lora": {"r": 8, "alpha": 16},
            "data": {"train": "tiny:prompts_train"},
            "generation": {"max_new_tokens": 16, "batch_size": 64},
            "training": {"learning_rate": 5e-4, "epochs": 1, "batch_size": 8, "max_length": 160,
                         "warmup_ratio": 0.0, "probe_share": 1.0},  # the probe measures every pair
            "eval": {"lm_eval_tasks": ["tiny:tiny_gen"], "limit": 8, "batch_size": 32,
                     "alpaca_eval": {"instructions": "tiny:alpaca_eval", "limit": 8},
                     "indicators": {"num_prompts": 0}}}


def assert_trained_against_previous_iterate(run: Path, iterations: int, start_policy: str | None = None,
                                            cfg=None):
    """Each iteration starts from the model the previous one trained, and trl's reference
    log-probs equal that model's (the loop records both on its probe's pairs: all of them, up to
    256, with probe_share = 1). With ``cfg``,
    the previous iterate is also loaded afresh from its saved adapters and its log-probs on the
    iteration's pairs are computed independently of the training code's own "before" values."""
    previous = start_policy
    for t in range(1, iterations + 1):
        out = manifest(run, t, "train")
        if previous is not None:
            assert out["policy"] == previous
        assert out["reference"]["kind"] == "previous" and out["reference"]["policy"] == out["policy"]
        m = out["metrics"]
        assert m["train/ref_gap_to_start"] < 1e-3
        assert m["train/ref_logp_chosen"] == pytest.approx(m["train/logp_chosen_before"], abs=1e-3)
        # training moved the policy far beyond that tolerance, so a stale reference would show
        assert abs(m["train/logp_chosen"] - m["train/logp_chosen_before"]) > 0.02
        pairs = read(run / f"iter_{t:03d}" / "pairs" / "pairs.jsonl")
        if cfg is not None and m["train/n_replayed"] == 0 and m["train/n_pairs"] == len(pairs) == m["train/probe_pairs"]:
            from harness.models.load import load_policy
            from harness.models.sources import locate, materialize
            from harness.train import pair_logps

            chain = [run / "iter_000" / "init_sft" / "adapter"] if (run / "iter_000" / "init_sft").exists() else []
            chain += [run / f"iter_{k:03d}" / "train" / "adapter" for k in range(1, t)]
            model, tok = load_policy(cfg, chain, base=materialize(locate(cfg.model.base)))
            chosen, rejected = pair_logps(model, tok, pairs, cfg.training.max_length)
            assert m["train/ref_logp_chosen"] == pytest.approx(sum(chosen) / len(chosen), abs=1e-3)
            assert m["train/ref_logp_rejected"] == pytest.approx(sum(rejected) / len(rejected), abs=1e-3)
        previous = out["trained"]


def test_self_rewarding_through_the_loop(tmp_path, monkeypatch):
    doc = common(tmp_path, "sr")
    doc["method"] = {"name": "self_rewarding", "iterations": 2, "beta": 0.1,
                     "self_rewarding": {"num_samples": 4, "prompts_per_iteration": 12,
                                        "ift": subset("tiny:ift", 24, tmp_path / "ift.jsonl"),
                                        "eft": subset("tiny:eft", 24, tmp_path / "eft.jsonl"),
                                        "self_instruct": 4, "self_instruct_shots": 2,
                                        "sft": {"learning_rate": 1e-3, "epochs": 1, "batch_size": 8,
                                                "max_length": 160, "warmup_ratio": 0.0,
                                                "lr_scheduler": "constant"}}}
    doc["judge"] = {"name": "self", "min_coverage": 0.0,
                    "self": {"template": "tiny:judge_template", "samples": 2, "temperature": 0.7, "max_new_tokens": 8}}
    cfg = parse(doc)
    run, rows = run_experiment(cfg)

    # M1: SFT on IFT + EFT with its own settings (not [training]'s), recorded
    sft = manifest(run, 0, "init_sft")
    assert sft["settings"]["learning_rate"] == 1e-3 and sft["settings"]["batch_size"] == 8
    assert sft["metrics"]["train/n_examples"] == 48 and sft["metrics"]["train/steps"] == 6
    lrs = {h["learning_rate"] for h in read(run / "iter_000" / "init_sft" / "log_history.jsonl")
           if "learning_rate" in h}
    assert lrs == {1e-3}   # the constant SFT rate, not training.learning_rate = 5e-4

    base_ids, n_cut = [], 0
    for t in (1, 2):
        it = run / f"iter_{t:03d}"
        # self-instruction: its own finished stage, read by generation
        si = manifest(run, t, "self_instruct")
        new = read(it / "self_instruct" / "prompts.jsonl")
        assert si["metrics"]["self_instruct/n_requests"] == 4 and si["metrics"]["self_instruct/n_prompts"] == len(new)
        assert len(read(it / "self_instruct" / "outputs.jsonl")) == 4
        prompts = read(it / "generate" / "prompts.jsonl")
        assert len(prompts) == 12 + len(new) and [p["id"] for p in prompts[12:]] == [p["id"] for p in new]
        base_ids.append({p["id"] for p in prompts[:12]})
        samples = {r["id"]: r for r in read(it / "generate" / "samples.jsonl")}
        assert all(len(samples[p["id"]]["samples"]) == 4 for p in prompts)
        cut = {(p["id"], x["text"]): x["finish"] == "length" for p in prompts for x in samples[p["id"]]["samples"]}
        gen = manifest(run, t, "generate")["metrics"]
        assert gen["gen/n_cut"] == sum(x["finish"] == "length" for r in samples.values() for x in r["samples"])
        assert gen["gen/cut_share"] == gen["gen/n_cut"] / (4 * len(prompts))

        # judging on the template's own scale (the tiny template: undeclared, so 1-5)
        judge = manifest(run, t, "judge")
        assert judge["scale"] == [1.0, 5.0]
        m = judge["metrics"]
        recs = read(it / "judge" / "judgments.jsonl")
        assert m["judge/n_items"] == 4 * len(prompts) and m["judge/n_answers"] == 2 * m["judge/n_items"]
        answers = [(s, cut) for r in recs for ss, cc in zip(r["answer_scores"], r["truncated"])
                   for s, cut in zip(ss, cc)]
        assert m["judge/n_truncated"] == sum(cut for _, cut in answers)
        assert m["judge/n_parse_failed"] == sum(s is None and not cut for s, cut in answers)
        assert all(1 <= s <= 5 for s, _ in answers if s is not None)
        assert all(1 <= s <= 5 for r in recs for s in r["scores"] if s is not None)

        # pairs: (highest, lowest) average score, ties and prompts with < 2 scores dropped, and
        # (cut_chosen = "drop") those whose chosen sample hit max_new_tokens
        pairs = read(it / "pairs" / "pairs.jsonl")
        by_id = {r["id"]: r for r in recs}
        expect, chosen_cut = [], 0
        for p in prompts:
            scored = [(s, x) for s, x in zip(by_id[p["id"]]["scores"], samples[p["id"]]["samples"]) if s is not None]
            if len(scored) >= 2 and max(s for s, _ in scored) > min(s for s, _ in scored):
                best = max(scored, key=lambda sx: (sx[0], sx[1]["finish"] != "length"))[1]  # as build_pairs
                chosen_cut += best["finish"] == "length"
                if best["finish"] != "length":
                    expect.append(p["id"])
        assert [p["id"] for p in pairs] == expect
        pm = manifest(run, t, "pairs")["metrics"]
        assert pm["pairs/n_pairs"] == len(pairs) and pm["pairs/cut_chosen_dropped"] == chosen_cut
        for p in pairs:
            cands = dict(zip([x["text"] for x in samples[p["id"]]["samples"]], by_id[p["id"]]["scores"]))
            assert p["score_chosen"] > p["score_rejected"] and cands[p["chosen"]] == p["score_chosen"]
            assert p["chosen_cut"] is False and p["rejected_cut"] is cut[p["id"], p["rejected"]]
        assert pm["pairs/rejected_cut"] == sum(p["rejected_cut"] for p in pairs)
        n_cut += gen["gen/n_cut"]
        train = manifest(run, t, "train")["metrics"]
        assert train["train/n_pairs"] == len(pairs) and train["train/n_replayed"] == 0

        ev = manifest(run, t, "evaluate")["metrics"]
        per_doc = read(run / f"iter_{t:03d}" / "evaluate" / "lm_eval" / "samples_tiny_gen.jsonl")
        assert len(per_doc) == 8 and ev["alpaca_eval/n_instructions"] == 8  # eval.limit, alpaca_eval.limit
        assert ev["lm_eval/tiny_gen/exact_match"] == pytest.approx(sum(d["exact_match"] for d in per_doc) / 8)
    assert not base_ids[0] & base_ids[1]   # non-overlapping prompt parts
    assert n_cut > 0   # generation.max_new_tokens = 16 cuts some of the tiny model's samples
    assert_trained_against_previous_iterate(run, 2, cfg=cfg)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert [r["metrics"]["selected"] for r in rows] == [0, 0, 1]
    final = json.loads((run / "final.json").read_text())
    assert final["iteration"] == 2 and final["selected_by"] == "last iterate"

    # a finished run is resumed without loading any model: no stage (self_instruct included) reruns
    manifests = {p: p.stat().st_mtime_ns for p in run.glob("iter_*/*/manifest.json")}

    def no_model(*a, **k):
        raise AssertionError("a finished run loaded a model")

    monkeypatch.setattr(loop, "load_policy", no_model)
    monkeypatch.setattr(stages, "load_model", no_model)
    _, again = run_experiment(cfg)
    assert {p: p.stat().st_mtime_ns for p in run.glob("iter_*/*/manifest.json")} == manifests
    assert [r["metrics"] for r in again] == [r["metrics"] for r in rows]


def test_dno_through_the_loop(tmp_path):
    doc = common(tmp_path, "dno")
    doc["method"] = {"name": "dno", "iterations": 2, "beta": 0.1,
                     "dno": {"num_samples": 3, "teacher": "tiny:teacher", "prompts_per_iteration": 16,
                             "replay": [0.5], "select_metric": "validation/judge/score_mean"}}
    doc["judge"] = {"name": "oracle"}
    doc["training"].update(learning_rate=3e-3, batch_size=4)   # iterates that differ on validation
    doc["eval"]["validation"] = {"prompts": "tiny:ift", "num_prompts": 32, "judge": {"name": "oracle"}}
    cfg = parse(doc)
    run, rows = run_experiment(cfg)

    own = {}
    for t in (1, 2):
        it = run / f"iter_{t:03d}"
        dno = METHODS.get("dno")
        ctx = IterationContext(cfg, t, [], judge_scale=(1.0, 5.0))
        prompts = read(it / "generate" / "prompts.jsonl")
        assert len(prompts) == 16 and all(p["response"] for p in prompts)   # each with its teacher answer
        samples = {r["id"]: r for r in read(it / "generate" / "samples.jsonl")}
        recs = {r["id"]: r for r in read(it / "judge" / "judgments.jsonl")}
        assert manifest(run, t, "judge")["scale"] == [1.0, 5.0]
        groups = []
        for p in prompts:
            r = recs[p["id"]]
            assert len(r["scores"]) == 4                         # K = 3 samples + the teacher
            assert all(1 <= s <= 5 for s in r["scores"] if s is not None)
            # automatic negatives are not judged and score the bottom of the scale
            for raw, s in zip(r["raw"], r["scores"]):
                assert raw or s == 1.0
            example = Example(p["id"], tuple(p["messages"]), p["response"])
            texts = [x["text"] for x in samples[p["id"]]["samples"]]
            cands = mark_cut(dno.candidates(ctx, example, texts), [is_cut(x) for x in samples[p["id"]]["samples"]])
            groups.append(Group(example, cands, r["scores"]))
        pairs = read(it / "pairs" / "pairs.jsonl")
        o = cfg.options
        # the stored pairs are the method's (hand-checked in test_methods) of the judged candidates
        expected, _ = dno.build_pairs(ctx, groups)
        assert pairs == json.loads(json.dumps(expected)) and pairs
        assert not any(p["chosen_cut"] for p in pairs)   # cut_chosen = "drop"
        # the judge's mean score is the policy samples'; the teacher's answers are reported apart
        judged = [(c.source, s) for g in groups for c, s in zip(g.candidates, g.scores)
                  if c.fixed_score is None and s is not None]
        jm = manifest(run, t, "judge")["metrics"]
        policy, teacher = ([s for src, s in judged if src == want] for want in ("policy", "teacher"))
        assert jm["judge/score_mean"] == pytest.approx(sum(policy) / len(policy))
        assert jm["judge/teacher_score_mean"] == pytest.approx(sum(teacher) / len(teacher))
        for p in pairs:
            need = o.margin if p["chosen_source"] == "teacher" else o.student_margin
            assert p["score_chosen"] >= 4.0 and p["score_chosen"] - p["score_rejected"] >= need
            teacher = next(q["response"] for q in prompts if q["id"] == p["id"])
            sampled = [s["text"] for s in samples[p["id"]]["samples"]]
            assert p["chosen"] == teacher if p["chosen_source"] == "teacher" else p["chosen"] in sampled
        own[t] = pairs
        train = manifest(run, t, "train")["metrics"]
        replay = min(len(own[1]), round(0.5 * len(pairs))) if t == 2 else 0
        assert train["train/n_pairs"] == len(pairs) + replay and train["train/n_replayed"] == replay
    assert_trained_against_previous_iterate(run, 2, cfg=cfg)

    # validation ("validation/...", oracle-scored answers to held-out prompts) on every iterate;
    # the final model is the best one on it, and final.json reports its test numbers
    vals = [r["metrics"]["validation/judge/score_mean"] for r in rows]
    assert all(1 <= v <= 5 for v in vals) and all(r["metrics"]["validation/judge/n_prompts"] == 32 for r in rows)
    for t, r in enumerate(rows):  # validation answers that hit generation.max_new_tokens are counted
        gens = read(run / f"iter_{t:03d}" / "validation" / "judge" / "generations.jsonl")
        n_cut = sum(x["finish"] == "length" for g in gens for x in g["samples"])
        assert r["metrics"]["validation/judge/n_cut"] == n_cut
    assert len(set(vals)) > 1, vals   # the choice is not trivial
    best = max(range(len(rows)), key=lambda i: (vals[i], -i))
    final = json.loads((run / "final.json").read_text())
    assert (final["iteration"], final["metric"], final["value"]) == (best, "validation/judge/score_mean", vals[best])
    assert final["selected_by"] == "validation"
    assert final["test"]["lm_eval/tiny_gen/exact_match"] == rows[best]["metrics"]["lm_eval/tiny_gen/exact_match"]
    assert not any(k.startswith("validation/") for k in final["test"])
    assert [r["metrics"]["selected"] for r in rows] == [int(i == best) for i in range(3)]
    saved = read(run / "results.jsonl")
    assert [r["metrics"]["selected"] for r in saved] == [int(i == best) for i in range(3)]
    # the validation prompts are disjoint from the reported AlpacaEval / lm-eval set
    held_out = {json.loads(x)["prompt"] for x in Path(resolve_ref("tiny:eval")).read_text().splitlines()}
    assert not held_out & {json.loads(x)["prompt"] for x in Path(resolve_ref("tiny:ift")).read_text().splitlines()}


def test_dno_with_a_reward_model_judge(tmp_path, tiny_reward_model):
    """An unbounded judge: the scale is known before candidates are built, automatic negatives
    sit below every real reward (never chosen), and the positive threshold is a real number."""
    doc = common(tmp_path, "dno-rm")
    doc["method"] = {"name": "dno", "iterations": 1,
                     "dno": {"num_samples": 4, "prompts_per_iteration": 16, "repetition_max": 0.0,
                             "positive_min": 0.5, "margin": 0.5, "student_margin": 0.25}}
    doc["judge"] = {"name": "reward_model", "reward_model": {"model": str(tiny_reward_model)}}
    doc["eval"] = {"indicators": {"num_prompts": 0}}
    run, rows = run_experiment(parse(doc))
    it = run / "iter_001"
    judge = manifest(run, 1, "judge")
    assert judge["scale"] == [None, None] and judge["metrics"]["judge/scale_lo"] is None
    recs = read(it / "judge" / "judgments.jsonl")
    auto = [s for r in recs for s, raw in zip(r["scores"], r["raw"]) if not raw]
    assert auto and all(s == -math.inf for s in auto)     # repeated n-grams: automatic negatives
    real = [s for r in recs for s, raw in zip(r["scores"], r["raw"]) if raw]
    assert real and all(math.isfinite(s) for s in real)
    stats = manifest(run, 1, "pairs")["metrics"]
    assert math.isfinite(stats["pairs/positive_threshold"]) and stats["pairs/margin_unit"] > 0
    pairs = read(it / "pairs" / "pairs.jsonl")
    samples = {r["id"]: r["samples"] for r in read(it / "generate" / "samples.jsonl")}
    autos = {(r["id"], s["text"]) for r in recs for s, raw in zip(samples[r["id"]], r["raw"]) if not raw}
    assert pairs and not any((p["id"], p["chosen"]) in autos for p in pairs)
    assert all(p["score_chosen"] >= stats["pairs/positive_threshold"] for p in pairs)
    assert stats["pairs/auto_negative_rejected"] == sum(p["rejected_auto_negative"] for p in pairs)
    assert rows[-1]["metrics"]["train/n_pairs"] == len(pairs)
