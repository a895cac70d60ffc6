"""QLoRA as the harness runs it: the adapter trains in float32 at DPO learning rates (trl
casts it to bfloat16), and every quantized load has the same numerics, iteration 0 included."""

from __future__ import annotations

import pytest
import torch

from full_forward import sequence_logprobs
from harness.models.load import load_policy
from harness.train import lora_config, train_dpo
from harness.train.trainer import prepare_policy
from test_train import PAIRS, make_cfg, qlora_dir  # noqa: F401  (the 4-bit-able tiny model fixture)

pytest.importorskip("bitsandbytes")


def _on_bf16_grid(t: torch.Tensor) -> torch.Tensor:
    return t == t.bfloat16().float()


def test_qlora_adapter_trains_in_float32_at_dpo_learning_rates(qlora_dir, tmp_path):
    """At lr 5e-6 an Adam step is far below half of bfloat16's spacing at lora_A's values, so a
    bfloat16 adapter's lora_A never changes; the harness's float32 adapter moves, and is saved
    in float32."""
    from safetensors.torch import load_file

    cfg = make_cfg(qlora_dir, tmp_path, model={"quantization": "4bit"},
                   training={"learning_rate": 5e-6, "batch_size": 2})
    model, _ = load_policy(cfg, [])
    start, _ = prepare_policy(model, cfg, 1)  # the first adapter, as train_dpo initialises it
    init = {n.replace(".default", ""): p.detach().clone() for n, p in start.named_parameters() if "lora_A" in n}
    del model, start
    model, tok = load_policy(cfg, [])
    train_dpo(model, tok, PAIRS, cfg, 1, tmp_path / "it1")
    saved = load_file(str(tmp_path / "it1" / "adapter" / "adapter_model.safetensors"))
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    lora_a = {k: t for k, t in saved.items() if "lora_A" in k}
    assert lora_a.keys() == init.keys()
    moved = torch.cat([(lora_a[k] != init[k]).flatten() for k in init])
    assert moved.float().mean() > 0.5, f"only {moved.float().mean():.1%} of lora_A entries moved"
    after = torch.cat([lora_a[k].flatten() for k in init])
    assert (~_on_bf16_grid(after[moved])).float().mean() > 0.9   # off bfloat16's grid
    steps = torch.cat([(lora_a[k] - init[k]).abs().flatten() for k in init])
    assert steps.max() < 1e-4  # the steps are below bfloat16's spacing there: only float32 holds them


def test_continued_qlora_adapter_keeps_its_float32_values(qlora_dir, tmp_path):
    """trl's cast would round a continued adapter (iteration 2 starts from iteration 1's) to
    bfloat16 before it trains; the policy trl holds starts from the saved float32 values."""
    from peft import get_peft_model

    from harness.train import dpo_trainer

    cfg = make_cfg(qlora_dir, tmp_path, model={"quantization": "4bit"})
    model, _ = load_policy(cfg, [])
    peft = get_peft_model(model, lora_config(cfg.lora))
    for name, p in peft.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.02)  # float32 values, almost none on bfloat16's grid
    peft.save_pretrained(str(tmp_path / "a1"))
    saved = {n: p.detach().clone() for n, p in peft.named_parameters() if "lora_" in n}
    del model, peft
    model, tok = load_policy(cfg, [tmp_path / "a1"])
    trainer = dpo_trainer(model, tok, PAIRS[:4], cfg, 2, tmp_path / "it2")
    held = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n and ".default." in n}
    assert held and all(p.dtype == torch.float32 and p.requires_grad for p in held.values())
    for name, p in held.items():
        assert torch.equal(p.detach(), saved[name]), name


def test_quantized_iteration0_has_the_numerics_of_later_bases(qlora_dir, tmp_path):
    """peft's k-bit preparation (float32 embeddings, norms and head) at every quantized load:
    iteration 0's model and a later iteration's base have one dtype layout, and the later
    model with its adapter disabled gives iteration 0's log-probs."""
    from peft import LoraConfig, get_peft_model

    cfg = make_cfg(qlora_dir, tmp_path, model={"quantization": "4bit", "dtype": "bfloat16"},
                   training={"gradient_checkpointing": True})
    m0, tok = load_policy(cfg, [])
    torch.manual_seed(0)
    peft = get_peft_model(load_policy(cfg, [])[0], LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
    peft.save_pretrained(str(tmp_path / "a1"))
    del peft
    m1, _ = load_policy(cfg, [tmp_path / "a1"])

    def layout(model):
        return {n.removeprefix("base_model.model.").replace(".base_layer", ""): p.dtype
                for n, p in model.named_parameters() if "lora_" not in n}

    base_layout = layout(m0)
    assert base_layout == layout(m1)
    assert base_layout["model.embed_tokens.weight"] == torch.float32
    assert base_layout["model.norm.weight"] == torch.float32
    msgs, answers = [p["messages"] for p in PAIRS[:4]], [p["chosen"] for p in PAIRS[:4]]
    at0 = sequence_logprobs(m0, tok, msgs, answers)
    with m1.disable_adapter():
        at1 = sequence_logprobs(m1, tok, msgs, answers)
    assert at1 == pytest.approx(at0, abs=1e-5)
    assert sequence_logprobs(m1, tok, msgs, answers) != pytest.approx(at0, abs=1e-3)  # the adapter is not a no-op
