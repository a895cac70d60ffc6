"""The learning-rate schedule: no optimizer step gets a zero rate, so a short
iteration (one step) still trains; warmup rounds down."""

from __future__ import annotations

import pytest

from harness.config.experiment import parse
from harness.models.load import load_policy
from harness.train import lr_factor, optimizer_steps, train_dpo, warmup_steps


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant", "constant_with_warmup"])
@pytest.mark.parametrize("total", [1, 2, 3, 7, 10, 64])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5])
def test_no_step_has_zero_learning_rate(schedule, total, ratio):
    w = warmup_steps(ratio, total)
    factors = [lr_factor(schedule, w, total, s) for s in range(total)]
    assert all(0.0 < f <= 1.0 for f in factors), factors
    assert max(factors) == pytest.approx(1.0) or w == total  # the peak is reached after warmup
    if schedule in ("linear", "cosine") and total > w + 1:
        assert factors[-1] < factors[w]  # and it decays


def test_warmup_rounds_down():
    assert warmup_steps(0.1, 1) == 0
    assert warmup_steps(0.1, 9) == 0
    assert warmup_steps(0.1, 10) == 1
    assert warmup_steps(0.25, 10) == 2
    assert lr_factor("linear", 2, 10, 0) == pytest.approx(1 / 3)  # not 0, as in transformers


def test_optimizer_steps_counts_like_the_trainer():
    cfg = parse({"experiment": {"name": "t"}, "model": {"base": "tiny"}, "method": {"name": "spin"},
                 "data": {"train": "x.jsonl"}, "training": {"batch_size": 16, "gradient_accumulation_steps": 2,
                                                              "epochs": 2}})
    assert optimizer_steps(16, cfg.training) == 2
    assert optimizer_steps(33, cfg.training) == 4   # 3 batches -> 2 steps per epoch
    assert optimizer_steps(1, cfg.training) == 2


def test_one_step_iteration_with_warmup_trains(tiny_dir, tmp_path):
    """16 pairs, batch 16, warmup_ratio 0.1: one optimizer step. With transformers'
    schedule that step's rate is 0 and the adapter stays unchanged (an error)."""
    cfg = parse({"experiment": {"name": "t", "output_dir": str(tmp_path)},
                 "model": {"base": str(tiny_dir), "device": "cpu"},
                 "method": {"name": "spin", "iterations": 1}, "data": {"train": "unused.jsonl"},
                 "lora": {"r": 4, "alpha": 8},
                 "training": {"batch_size": 16, "learning_rate": 5e-3, "max_length": 64, "warmup_ratio": 0.1}})
    pairs = [{"messages": [{"role": "user", "content": f"what is {i} plus {i + 1}"}],
              "chosen": f"{2 * i + 1}", "rejected": "no no"} for i in range(16)]
    model, tok = load_policy(cfg, [])
    metrics, _ = train_dpo(model, tok, pairs, cfg, 1, tmp_path / "it1")
    assert metrics["train/steps"] == 1
    assert metrics["train/logp_chosen"] > metrics["train/logp_chosen_before"]
