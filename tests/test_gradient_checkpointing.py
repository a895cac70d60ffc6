"""training.gradient_checkpointing (on in every GPU config) trains the same adapter as without
it: a tiny DPO iteration on CPU, from one start on the same pairs, gives the same losses,
log-probs and adapter to float rounding, while its decoder layers really run again in the
backward pass (activations recomputed, not kept)."""

from __future__ import annotations

import pytest
import torch
from test_train import PAIRS, make_cfg, qlora_dir  # noqa: F401  (qlora_dir: the fixture)

from harness.models.load import load_policy
from harness.train import train_dpo


@pytest.mark.parametrize("base", ["merge", "continue", "4bit"])
def test_gradient_checkpointing_trains_the_same_adapter(tiny_dir, qlora_dir, tmp_path, base):
    """A float32 base on either chain, and a 4-bit base (QLoRA, as the DNO GPU config: peft's k-bit
    preparation makes the frozen base's inputs carry gradients through the checkpoints)."""
    got = {}
    for checkpointing in (False, True):
        model_dir, over = (qlora_dir, {"model": {"quantization": "4bit"}}) if base == "4bit" else \
            (tiny_dir, {"lora": {"chain": base}})
        cfg = make_cfg(model_dir, tmp_path, training={"gradient_checkpointing": checkpointing}, **over)
        model, tok = load_policy(cfg, [])
        calls = []  # the first attention's calls (transformers checkpoints a layer's forward, inside its hooks)
        hook = model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
        metrics, trained = train_dpo(model, tok, PAIRS, cfg, 1, tmp_path / f"gc-{checkpointing}")
        hook.remove()
        adapter = {n: p.detach().clone() for n, p in trained.named_parameters() if "lora_" in n and ".ref." not in n}
        got[checkpointing] = metrics, adapter, sum(calls)
    (m0, a0, calls0), (m1, a1, calls1) = got[False], got[True]
    # every training forward of the first layer runs once more, with gradients, while the backward recomputes it
    steps = len([h for h in m1["log_history"] if "loss" in h])
    assert steps > 0 and calls1 - calls0 >= steps, (calls0, calls1, steps)
    losses0 = [h["loss"] for h in m0["log_history"] if "loss" in h]
    assert [h["loss"] for h in m1["log_history"] if "loss" in h] == pytest.approx(losses0, abs=1e-5)
    for key in ("train/logp_chosen_before", "train/logp_rejected_before", "train/logp_chosen", "train/logp_rejected",
                "train/reward_margin"):
        assert m1[key] == pytest.approx(m0[key], abs=1e-4), key
    assert a1.keys() == a0.keys() and a1
    assert all(torch.allclose(a1[k], a0[k], atol=1e-5) for k in a1)
    moved = max((a0[k] - a1[k]).abs().max().item() for k in a0 if "lora_B" in k)
    assert max(a0[k].abs().max().item() for k in a0 if "lora_B" in k) > 100 * max(moved, 1e-7)  # training moved lora_B
