"""Over-optimisation indicators: the top-k formulas, distinct-n, thresholds, and a run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from test_eval_fixtures import tiny, tiny_dir  # noqa: F401  (fixtures)

from harness.config.eval_sections import IndicatorSection
from harness.evaluate.indicators import check_thresholds, distinct_n, indicator_metrics, run_indicators
from harness.engines.generate import Prompt, topk_stats


def test_topk_stats_match_the_formula_on_hand_built_logits():
    p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    logits = torch.log(p) + 3.0  # a shift must not matter (softmax)
    ent, mass = topk_stats(logits.unsqueeze(0), k=2)
    q = torch.tensor([0.5, 0.25]) / 0.75  # renormalised over the top 2
    assert mass.item() == pytest.approx(0.75, abs=1e-6)
    assert ent.item() == pytest.approx(-(q * q.log()).sum().item(), abs=1e-6)
    assert ent.item() == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3), abs=1e-6)
    # k >= vocabulary: all mass, the full entropy
    ent, mass = topk_stats(logits.unsqueeze(0), k=10)
    assert mass.item() == pytest.approx(1.0, abs=1e-6)
    assert ent.item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-6)
    # rows are independent: a uniform row has entropy log k
    ent, mass = topk_stats(torch.stack([logits, torch.zeros(5)]), k=4)
    assert ent[1].item() == pytest.approx(math.log(4), abs=1e-6) and mass[1].item() == pytest.approx(0.8, abs=1e-6)


def test_distinct_n_counts_whitespace_ngrams_across_outputs():
    texts = ["a b a", "a b", ""]
    assert distinct_n(texts, 1) == 2 / 5          # tokens a b a a b
    assert distinct_n(texts, 2) == 2 / 3          # (a b) (b a) (a b): no n-gram crosses outputs
    assert distinct_n(["one"], 2) is None


def test_thresholds_warn_only_when_enabled_and_crossed():
    m = {"indicators/topk_entropy": 0.5, "indicators/topk_mass": 0.9}
    assert check_thresholds(m, IndicatorSection()) == []  # 0 = off
    w = check_thresholds(m, IndicatorSection(entropy_min=1.0, mass_min=0.95))
    assert len(w) == 2 and "entropy 0.5000" in w[0] and "mass 0.9000" in w[1]
    assert check_thresholds(m, IndicatorSection(entropy_min=0.4, mass_min=0.85)) == []
    assert check_thresholds({"indicators/topk_entropy": None}, IndicatorSection(entropy_min=1.0)) == []


def test_metrics_average_per_answer():
    samples = [{"text": "x y", "n_tokens": 4, "topk_entropy": 1.0, "topk_mass": 0.5, "finish": "length"},
               {"text": "x", "n_tokens": 2, "topk_entropy": 2.0, "topk_mass": 0.7, "finish": "eos"}]
    m = indicator_metrics(samples)
    assert m["indicators/topk_entropy"] == 1.5 and m["indicators/topk_mass"] == pytest.approx(0.6)
    assert m["indicators/mean_length"] == 3 and m["indicators/distinct_1"] == 2 / 3
    assert (m["indicators/n_cut"], m["indicators/cut_share"]) == (1, 0.5)  # the first hit max_new_tokens


def test_run_indicators_on_the_tiny_model(tiny, tmp_path):
    model, tok = tiny
    prompts = [Prompt(f"p{i}", ({"role": "user", "content": f"say {i} fox"},)) for i in range(6)]
    section = IndicatorSection(num_prompts=4, top_k=5, temperature=1.0, entropy_min=100.0)
    m = run_indicators(model, tok, prompts, section, seed_key=(0, 1), max_new_tokens=6, batch_size=4,
                       out_dir=tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").open()]
    assert sorted(s["id"] for s in samples) == ["p0", "p1", "p2", "p3"]  # only num_prompts
    # the metrics are the per-answer means of the recorded samples (each checked against an
    # independent forward pass in test_generate), every answer weighing the same
    recs = [s["samples"][0] for s in samples]
    assert m["indicators/topk_entropy"] == pytest.approx(sum(r["topk_entropy"] for r in recs) / 4)
    assert m["indicators/topk_mass"] == pytest.approx(sum(r["topk_mass"] for r in recs) / 4)
    assert m["indicators/mean_length"] == sum(r["n_tokens"] for r in recs) / 4
    assert m["indicators/distinct_1"] == distinct_n([r["text"] for r in recs], 1)
    assert m["indicators/n_cut"] == sum(r["n_tokens"] == 6 and r["finish"] == "length" for r in recs)
    assert saved["metrics"] == m and len(saved["warnings"]) == 1  # entropy_min=100 always warns
    # seeded per prompt: another batch size gives the same samples; the logits (and so the
    # top-k statistics) differ only by float rounding of different batch shapes
    again = run_indicators(model, tok, prompts, section, seed_key=(0, 1), max_new_tokens=6, batch_size=2,
                           out_dir=tmp_path / "again")
    assert again == pytest.approx(m, rel=1e-5)
    texts = [json.loads(line)["samples"][0]["text"] for line in (tmp_path / "again" / "samples.jsonl").open()]
    assert sorted(texts) == sorted(s["samples"][0]["text"] for s in samples)
