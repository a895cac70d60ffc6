"""DPO training throughput: the harness's ``train_dpo`` against a plain trl ``DPOTrainer`` script.

One iteration's pairs, built as SPIN's first iteration builds them: prompts and correct
answers from the tiny world's ``sft_train`` (chosen) and the model's own greedy answers
(rejected; generated once, untimed). Both sides start from a freshly loaded model and use
the same pairs, LoRA config, batch size, max_length, learning rate, epochs, optimizer and
seed, so they take the same number of optimizer steps (checked).

- harness: ``harness.train.train_dpo`` as the loop calls it (reference = the model passed in),
  timed as a whole: the reference log-probs computed once (``precompute_reference``), trl's
  dataset preparation, training, saving the adapter, and the reporting probe. The probe is
  counted honestly as harness cost: its "before" and "after" values take one prompt-shared
  forward each over its sample of the pairs (both within ``training.probe_share`` of the
  stage's forward work, default 0.05; ``--probe-share 1`` probes every pair), plus its checks
  on ``GAP_CHECK_PAIRS`` pairs (the start and the reference; merge chain: the merged model).
  The README's figures predate the "before" forward (the probe then took the precomputed
  reference log-probs as "before").
- harness per-step: the same with ``precompute=False`` (trl's reference forward in every
  step, and over the probe's pairs for the reference values it reports): the gain of
  precomputing, from the same run.
- trl: ``DPOTrainer(model, args=DPOConfig(...), peft_config=LoraConfig(...))``, ``train()``,
  ``save_model()``: what a user would write with trl alone (reference forward per step).

Sides run one after another, ``--repeats`` times in alternation; each keeps its fastest
run (robust on a shared machine). Pairs/s = pairs x epochs / seconds. ``--dtypes
float32,bfloat16`` also trains the harness side in each dtype and prints the speed ratio
and how far the bfloat16 model's log-probs of the pairs are from the float32 model's.
The last line is ``train harness/trl: R``, R = harness pairs/s / trl pairs/s.

    .venv/bin/python bench/bench_train.py [--model smollm2-135m-instruct|tiny] [--pairs 32]
        [--batch-size 8] [--epochs 1] [--max-length 128] [--repeats 1] [--dtypes float32] [--threads 1]
        [--probe-share 0.05]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from harness.models.load import offline_env


def make_cfg(args, out: Path, dtype: str = "float32"):
    import harness.methods  # noqa: F401  (registers the methods the config names)
    from harness.config.experiment import parse

    return parse({
        "experiment": {"name": "bench-train", "output_dir": str(out), "seed": 0},
        "model": {"base": args.model, "device": "cpu" if not torch.cuda.is_available() else "auto", "dtype": dtype},
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "method": {"name": "spin", "iterations": 1, "beta": 0.1, "loss": "sigmoid"},
        "data": {"train": "tiny:sft_train"},
        "training": {"learning_rate": 2e-4, "epochs": args.epochs, "batch_size": args.batch_size,
                     "max_length": args.max_length, "warmup_ratio": 0.0, "probe_share": args.probe_share}})


def make_pairs(cfg, n: int, max_new_tokens: int) -> list[dict]:
    """SPIN iteration-1 pairs: the data's answer is chosen, the model's greedy answer rejected."""
    from harness.models.data import load_examples
    from harness.engines.generate import Prompt, Sampling, generate
    from harness.models.load import load_policy

    examples = load_examples(cfg.data, seed=0)[:n]
    model, tok = load_policy(cfg, [])
    out = generate(model, tok, [Prompt(e.id, e.messages) for e in examples], Sampling(max_new_tokens=max_new_tokens),
                   seed_key=(0,), batch_size=32, desc="rejected answers")
    return [{"messages": list(e.messages), "chosen": e.response, "rejected": out[e.id]["samples"][0]["text"]}
            for e in examples]


def run_harness(cfg, pairs, out: Path, precompute: bool = True) -> tuple[float, dict]:
    from harness.models.load import load_policy
    from harness.train import train_dpo

    model, tok = load_policy(cfg, [])
    t0 = time.perf_counter()
    metrics, _ = train_dpo(model, tok, pairs, cfg, 1, out, precompute=precompute)
    return time.perf_counter() - t0, metrics


def run_trl(cfg, pairs, out: Path) -> tuple[float, dict]:
    """A plain trl script: the model, a LoraConfig, DPOConfig with the same settings."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from harness.models.load import load_policy

    model, tok = load_policy(cfg, [])  # same weights and tokenizer as the harness side
    t, lora = cfg.training, cfg.lora
    t0 = time.perf_counter()
    data = Dataset.from_list([{"prompt": p["messages"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    on_cuda = next(model.parameters()).device.type == "cuda"
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=t.batch_size,
                     gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=cfg.learning_rate_for(1),
                     num_train_epochs=t.epochs, lr_scheduler_type=t.lr_scheduler, optim=t.optimizer,
                     weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, max_length=t.max_length,
                     gradient_checkpointing=t.gradient_checkpointing, seed=cfg.experiment.seed + 1,
                     use_cpu=not on_cuda, bf16=on_cuda and cfg.model.dtype == "bfloat16", report_to="none",
                     save_strategy="no", logging_steps=1, disable_tqdm=True, beta=cfg.method.beta,
                     loss_type=[cfg.method.loss])
    peft = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft)
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    return time.perf_counter() - t0, {"train/steps": trainer.state.global_step}


@torch.inference_mode()
def logprob_agreement(cfg32, cfg16, pairs) -> tuple[float, float, float]:
    """(max |diff|, mean |diff|, mean |logp|) of the pairs' chosen + rejected log-probs,
    bfloat16 model vs float32 model."""
    from harness.models.load import load_policy
    from harness.train import pair_logps

    got = []
    for cfg in (cfg32, cfg16):
        model, tok = load_policy(cfg, [])
        c, r = pair_logps(model, tok, pairs, cfg.training.max_length)
        got.append(c + r)
        del model
    diffs = [abs(a - b) for a, b in zip(*got)]
    return max(diffs), sum(diffs) / len(diffs), sum(abs(a) for a in got[0]) / len(got[0])


def main() -> None:
    offline_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help='a model reference, e.g. "tiny"')
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=24, help="length of the rejected (generated) answers")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--probe-share", type=float, default=0.05, help="training.probe_share of the harness side")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per side; the fastest counts")
    ap.add_argument("--dtypes", default="float32",
                    help="float32 (default) or float32,bfloat16: also compare the harness side in bfloat16")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0 = torch's default); 1 by default: on a shared 2-core machine a "
                         "second thread contends with other processes and makes timings several times noisier")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from harness.train import GAP_CHECK_PAIRS

    tmp = Path(tempfile.mkdtemp(prefix="bench_train."))
    try:
        cfg = make_cfg(args, tmp)
        pairs = make_pairs(cfg, args.pairs, args.max_new_tokens)
        flags = " ".join(f for f in open("/proc/cpuinfo").read().split() if f in ("avx512_bf16", "amx_bf16")) \
            if os.path.exists("/proc/cpuinfo") else ""
        print(f"model={args.model} pairs={len(pairs)} batch_size={args.batch_size} epochs={args.epochs} "
              f"max_length={args.max_length} lora_r={args.lora_r} threads={torch.get_num_threads()} "
              f"torch={torch.__version__} cuda={torch.cuda.is_available()} cpu_bf16_flags={sorted(set(flags.split())) or 'none'} "
              f"repeats={args.repeats} (probe: 'before' and 'after' = one forward each over a sample "
              f"within probe_share={args.probe_share}, + {GAP_CHECK_PAIRS}-pair checks, counted as harness cost)",
              flush=True)
        run_harness(cfg, pairs[:max(2, args.batch_size)], tmp / "warmup")  # imports, first-call costs
        sides = {"harness": lambda out: run_harness(cfg, pairs, out),
                 "harness per-step ref": lambda out: run_harness(cfg, pairs, out, precompute=False),
                 "trl": lambda out: run_trl(cfg, pairs, out)}
        best: dict[str, tuple[float, dict]] = {}
        for rep in range(args.repeats):
            for name, fn in sides.items():
                out = tmp / f"{name.replace(' ', '_')}-{rep}"
                dt, metrics = fn(out)
                if name not in best or dt < best[name][0]:
                    best[name] = (dt, metrics)
                shutil.rmtree(out, ignore_errors=True)
        steps = {name: m["train/steps"] for name, (_, m) in best.items()}
        assert len(set(steps.values())) == 1, steps
        rate = {name: len(pairs) * args.epochs / dt for name, (dt, _) in best.items()}
        for name, (dt, m) in best.items():
            extra = ""
            if "train/seconds" in m:
                extra = (f"  (trainer.train {m['train/seconds']:.1f}s, reference pass {m['train/ref_seconds']:.1f}s, "
                         f"probe {m['train/probe_seconds']:.1f}s on {m['train/probe_pairs']} pairs, "
                         f"{m['train/tokens']} tokens trained)")
            print(f"{name:22s} {dt:7.1f}s  {rate[name]:6.2f} pairs/s  {steps[name]} steps{extra}", flush=True)
        print(f"precomputed/per-step reference: {rate['harness'] / rate['harness per-step ref']:.3f}")
        dt, m = best["harness"]
        print(f"probe share of the harness side: {m['train/probe_seconds'] / dt:.3f} "
              f"({m['train/probe_pairs']} of {len(pairs)} pairs, the gap checks included)")
        print(f"harness without its reporting probe ({m['train/probe_seconds']:.1f}s)/trl: "
              f"{best['trl'][0] / (dt - m['train/probe_seconds']):.3f}")
        dtypes = [d for d in args.dtypes.split(",") if d]
        if "bfloat16" in dtypes:
            cfg16 = make_cfg(args, tmp, "bfloat16")
            dt16, m16 = run_harness(cfg16, pairs, tmp / "bf16")
            mx, mean, scale = logprob_agreement(cfg, cfg16, pairs)
            print(f"bfloat16 harness       {dt16:7.1f}s  {len(pairs) * args.epochs / dt16:6.2f} pairs/s  "
                  f"loss {m16['train/loss']:.4f} vs float32 {best['harness'][1]['train/loss']:.4f}")
            print(f"bfloat16/float32 speed: {best['harness'][0] / dt16:.3f}; log-probs of the pairs: "
                  f"max |diff| {mx:.3f}, mean |diff| {mean:.3f} nats (mean |logp| {scale:.2f})")
        print(f"train harness/trl: {rate['harness'] / rate['trl']:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
