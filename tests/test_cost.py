"""Cost accounting (harness.store.cost): what every stage's manifest and every results row say it cost."""

from __future__ import annotations

import json

import pytest

from harness.store import cost
from harness.engines.generate import Prompt, Sampling, generate
from harness.judges.base import JudgeItem, Verdict
from test_eval_fixtures import tiny  # noqa: F401  (fixture)

PROMPTS = [Prompt(f"p{i}", ({"role": "user", "content": f"say {w} {i}"},))
           for i, w in enumerate(["fox", "dog", "yes", "no", "lazy", "quick"])]


def test_generated_tokens_are_counted_as_the_sampler_counts_them(tiny):
    model, tok = tiny
    for sampling in (Sampling(max_new_tokens=7), Sampling(temperature=1.0, max_new_tokens=7, n=2)):
        meter = cost.start()
        out = generate(model, tok, PROMPTS, sampling, seed_key=(0,), batch_size=4)
        reading = cost.stop(meter)
        assert reading["gen_tokens"] == sum(s["n_tokens"] for r in out.values() for s in r["samples"]) > 0
    # without a meter nothing is counted, and generate is unchanged
    again = generate(model, tok, PROMPTS, Sampling(max_new_tokens=7), seed_key=(0,), batch_size=4)
    assert cost._active is None and again["p0"]["samples"][0]["n_tokens"] > 0


def test_plain_generate_with_padding_after_a_stop(tiny):
    """Rows ended early by a stopping criterion are padded by generate: padding is not counted."""
    model, tok = tiny
    enc = tok(["<s>user: say fox\nassistant:", "<s>user: no\nassistant:"], return_tensors="pt", padding=True)
    meter = cost.start()
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    counted = cost.stop(meter)["gen_tokens"]
    new = out[:, enc.input_ids.shape[1]:].tolist()
    want = 0
    for row in new:
        stop = next((i for i, t in enumerate(row) if t == tok.eos_token_id), None)
        real = [i for i, t in enumerate(row) if t != tok.pad_token_id]
        want += stop + 1 if stop is not None else (real[-1] + 1 if real else 0)
    assert counted == want > 0


def test_judge_calls_count_answers_and_skip_cache_hits(tmp_path):
    from harness.config.experiment import JudgeSection
    from harness.judges import build_judge

    class ThreeSamples:
        name, scale = "fake", (1.0, 5.0)

        def score(self, items):
            return [Verdict(3.0, raw=("Score: 3",) * 3, scores=(3.0,) * 3) for _ in items]

    judge = cost.count_judge(ThreeSamples())
    assert isinstance(judge, ThreeSamples)
    meter = cost.start()
    judge.score([JudgeItem("a", "q", "r"), JudgeItem("b", "q", "s")])
    assert cost.stop(meter)["judge_calls"] == 6  # 2 items x 3 samples

    items = [JudgeItem(f"i{k}", "What is 2 plus 3?", str(k)) for k in range(4)]
    cached = build_judge(JudgeSection(name="oracle"), cache_path=tmp_path / "cache.jsonl")
    meter = cost.start()
    cached.score(items)
    cached.score(items)  # all cache hits: no judge call
    assert cost.stop(meter)["judge_calls"] == 4


def test_http_judge_usage_tokens(monkeypatch):
    from test_judges_http import KEY_ENV, FakeServer, items, judge_for

    monkeypatch.setenv(KEY_ENV, "k")

    def behave(body, instr, n):
        usage = {"prompt_tokens": 30, "completion_tokens": 5} if instr != "silent" else None
        return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": "Score: 4"}}],
                                **({"usage": usage} if usage else {})})

    server = FakeServer(behave)
    server.thread.start()
    try:
        judge = cost.count_judge(judge_for(server.url, samples=2))
        meter = cost.start()
        verdicts = judge.score(items("a", "b", "silent"))
        reading = cost.stop(meter)
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    assert [v.score for v in verdicts] == [4.0, 4.0, 4.0]
    assert reading["judge_calls"] == 6
    assert (reading["judge_prompt_tokens"], reading["judge_completion_tokens"]) == (4 * 30, 4 * 5)


def test_row_metrics_and_summary():
    from harness.store.cost import cost_summary

    stages = [{"wall_s": 10.0, "gen_tokens": 1200, "train_tokens": 0, "judge_calls": 0, "peak_mem_mb": 900.0,
               "peak_rss_mb": 900.0, "device": "cpu"},
              {"wall_s": 50.0, "gen_tokens": 0, "train_tokens": 30000, "judge_calls": 0, "peak_mem_mb": 1900.0,
               "peak_rss_mb": 1900.0, "device": "cpu"}, None]
    metrics, device = cost.row_metrics(stages)
    assert metrics["cost/wall_s"] == 60.0 and metrics["cost/gen_tokens"] == 1200
    assert metrics["cost/train_tokens"] == 30000 and metrics["cost/peak_mem_mb"] == 1900.0
    assert metrics["cost/gpu_s"] == 0 and device == "cpu"
    assert cost.row_metrics([None]) == ({}, None)
    gpu, device = cost.row_metrics([{"wall_s": 3600.0, "peak_mem_mb": 5000.0, "peak_rss_mb": 3000.0,
                                     "device": "cuda (NVIDIA H100)"},
                                    {"wall_s": 1.0, "peak_mem_mb": 8000.0, "device": "cpu"}])
    assert gpu["cost/peak_mem_mb"] == 5000.0 and gpu["cost/peak_rss_mb"] == 8000.0 and gpu["cost/gpu_s"] == 3600.0
    assert device == "cpu, cuda (NVIDIA H100)"

    rows = [{"experiment": "e", "iteration": t, "device": "cpu", "metrics": metrics} for t in (0, 1, 2)]
    assert cost_summary(rows) == ("cost: 2 iterations, 3.0 min wall, 3.6k tokens generated, 90k trained, "
                                  "0 judge calls, peak 1.9 GB RSS, cpu")
    rows.append({"experiment": "g", "iteration": 1, "device": device, "metrics": gpu})
    lines = cost_summary(rows + [{"experiment": "old", "iteration": 1, "metrics": {}}]).splitlines()
    assert len(lines) == 2 and lines[0].startswith("cost of e: ")
    assert lines[1].startswith("cost of g: 1 iteration, 1.0 h wall") and "peak 4.9 GB GPU, 1.00 GPU-hours" in lines[1]


def test_a_run_records_cost_per_stage_and_per_row(tiny_dir, tmp_path):
    """Every stage manifest has a cost reading; rows sum their stages; generated and trained
    tokens agree with the stages' own counts."""
    from harness.config.experiment import load
    from harness.run.loop import run_experiment
    from harness.store.cost import cost_summary
    from harness.store.files import read_json
    from test_console import _experiment

    cfg = load(_experiment(tmp_path, tiny_dir, tmp_path / "out"))
    run_dir, rows = run_experiment(cfg)
    manifests = {p.parent.name: read_json(p)["outputs"] for p in (run_dir / "iter_001").glob("*/manifest.json")}
    assert {"generate", "pairs", "train", "evaluate"} <= set(manifests)
    for name, out in manifests.items():
        c = out["cost"]
        assert c["device"] == "cpu" and c["peak_mem_mb"] > 0 and c["wall_s"] == pytest.approx(out["seconds"], abs=0.5)
    assert manifests["generate"]["cost"]["gen_tokens"] == manifests["generate"]["metrics"]["gen/tokens"] > 0
    assert manifests["train"]["cost"]["train_tokens"] == manifests["train"]["metrics"]["train/tokens"] > 0
    assert manifests["pairs"]["cost"]["gen_tokens"] == manifests["pairs"]["cost"]["train_tokens"] == 0
    row = rows[1]
    assert row["device"] == "cpu"
    m = row["metrics"]
    assert m["cost/gen_tokens"] == sum(o["cost"]["gen_tokens"] for o in manifests.values())
    assert m["cost/train_tokens"] == manifests["train"]["metrics"]["train/tokens"]
    assert m["cost/wall_s"] == pytest.approx(sum(o["cost"]["wall_s"] for o in manifests.values()), abs=0.05)
    assert m["cost/peak_mem_mb"] == max(o["cost"]["peak_mem_mb"] for o in manifests.values())
    assert json.loads((run_dir / "results.jsonl").read_text().splitlines()[1])["metrics"] == m
    assert cost_summary(rows).startswith("cost: 1 iteration, ")
