"""bfloat16 bases: merge each iteration's LoRA delta (in float32, keeping float32 master
weights) or continue one adapter on the bf16 base? Measures, on a random Llama whose
weights have sd 0.02 and a LoRA delta of sd ~1e-5 (one LoRA DPO iteration at lr ~2e-6):

- how much of the delta survives: entries of the weights changed by a merge, and the
  log-prob gap of each option against the unmerged model (bf16 base + float32 adapter,
  the model training saw), summed over each sequence's tokens;
- memory (weights held) and time (a LoRA training step, a no-grad forward) of
  A = merge in float32, keep float32 master weights (compute then runs in float32, or
  casts them to bf16, which rounds the delta away again), against
  B = the continue chain: bf16 base + one adapter (+ a frozen reference adapter).

    python bench/bench_bf16_merge.py [--hidden 512 --layers 4 --seq 128 --batch 8]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def build(hidden: int, layers: int, vocab: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128 or 1,
                      max_position_embeddings=1024, initializer_range=0.02)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def add_adapter(model, delta_sd: float, r: int = 16, name: str = "default"):
    from peft import LoraConfig, PeftModel, get_peft_model

    lc = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    if isinstance(model, PeftModel):
        model.add_adapter(name, lc)
    else:
        model = get_peft_model(model, lc, adapter_name=name)
    g = torch.Generator().manual_seed(1)
    scale = 2.0  # alpha / r
    for n, p in model.named_parameters():  # delta = scale * B @ A with sd ~ delta_sd
        if f"lora_A.{name}" in n:
            p.data = torch.randn(p.shape, generator=g).to(p.dtype) / r ** 0.5
        if f"lora_B.{name}" in n:
            p.data = (torch.randn(p.shape, generator=g) * delta_sd / scale).to(p.dtype)
    return model


@torch.no_grad()
def seq_logps(model, ids) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)


def merged(peft_model, master: torch.dtype, compute: torch.dtype):
    """The adapter folded into a copy of the base: W + delta in ``master``, then cast."""
    m = copy.deepcopy(peft_model)
    base = m.get_base_model()
    for module in m.modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            w = module.base_layer.weight
            w.data = (w.data.to(master) + module.get_delta_weight("default").to(master)).to(compute)
    m.unload()  # drop the adapter layers; the base now holds the merged weights
    return base.to(compute)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def train_step_time(model, ids, steps: int = 3) -> float:
    params = [p for n, p in model.named_parameters() if "lora_" in n and ".ref." not in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    t = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = -torch.log_softmax(model(input_ids=ids).logits.float(), -1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        t.append(time.perf_counter() - t0)
    model.eval()
    return min(t[1:])


def forward_time(model, ids, reps: int = 3) -> float:
    t = []
    with torch.no_grad():
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            model(input_ids=ids)
            t.append(time.perf_counter() - t0)
    return min(t[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--delta-sd", type=float, default=1e-5)
    a = ap.parse_args()
    torch.manual_seed(2)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))

    base16 = build(a.hidden, a.layers, a.vocab, torch.bfloat16)
    sd = torch.cat([m.weight.float().flatten() for n, m in base16.named_modules() if n.endswith("q_proj")]).std()
    unmerged = add_adapter(copy.deepcopy(base16), a.delta_sd)          # what training saw (B without a ref)
    want = seq_logps(unmerged, ids)
    base_lp = seq_logps(base16, ids)
    deltas = torch.cat([m.get_delta_weight("default").flatten().float() for m in unmerged.modules()
                        if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})])
    print(f"weights sd {sd:.4f}, delta sd {deltas.std():.2e}; the adapter moves log-probs by "
          f"{(want - base_lp).abs().mean():.4f} nats per sequence ({a.batch} x {a.seq} tokens)")

    options = {"merge in bf16 (old)": merged(unmerged, torch.bfloat16, torch.bfloat16),
               "merge in fp32, cast to bf16": merged(unmerged, torch.float32, torch.bfloat16),
               "A: merge in fp32, keep fp32": merged(unmerged, torch.float32, torch.float32)}
    ref_q = [m.base_layer.weight for n, m in unmerged.named_modules() if n.endswith("q_proj")][0]
    print(f"{'option':32} {'changed':>8} {'gap (nats)':>11} {'kept':>6}")
    for name, m in options.items():
        w = [mm.weight for n, mm in m.named_modules() if n.endswith("q_proj")][0]
        changed = (w.float() != ref_q.float()).float().mean().item()
        lp = seq_logps(m, ids)
        kept = ((lp - base_lp) * (want - base_lp)).sum() / ((want - base_lp) ** 2).sum()
        print(f"{name:32} {changed:8.1%} {(lp - want).abs().max().item():11.4f} {kept.item():6.2f}")
    print(f"{'B: continue (bf16 + adapter)':32} {'-':>8} {0.0:11.4f} {1.0:6.2f}  (no merge: the trained model itself)")

    # memory and time of the next iteration: A = fp32 merged base + a fresh adapter (the reference is the
    # adapter disabled); B = bf16 base + the continued adapter + a frozen "ref" copy
    a_model = add_adapter(options["A: merge in fp32, keep fp32"], 0.0)
    b_model = add_adapter(copy.deepcopy(unmerged), a.delta_sd, name="ref")
    b_model.set_adapter("default")
    rows = {"A": a_model, "B": b_model}
    res = {k: (weight_bytes(m), train_step_time(m, ids), forward_time(m, ids)) for k, m in rows.items()}
    torch.set_num_threads(torch.get_num_threads())
    for k, (mem, tr, fw) in res.items():
        print(f"{k}: weights {mem / 2**20:.1f} MiB, train step {tr * 1e3:.0f} ms, forward {fw * 1e3:.0f} ms")
    (ma, ta, fa), (mb, tb, fb) = res["A"], res["B"]
    print(f"ratios A/B: memory {ma / mb:.2f}, train step {ta / tb:.2f}, forward {fa / fb:.2f}")


if __name__ == "__main__":
    main()
