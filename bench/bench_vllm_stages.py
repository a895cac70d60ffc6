"""The vLLM engine as a run uses it: engine starts, seconds spent starting engines and tokens/s
per generating stage of a 2-iteration run's worth of generation, old design against new,
measured in one process on the same policies.

The policies are a continue chain's: SmolLM2-135M-Instruct in ``--dtype`` (bfloat16) with a
random rank-8 adapter per iteration. Each iteration generates as a Self-Rewarding iteration
does, through ``harness.engines.vllm_engine.Session``: "generate" (``--prompts`` prompts x 2
sampled answers), "judge" (one greedy judgment per answer) and "evaluate" (``--prompts``
greedy answers). Designs:

- ``old``: merged float32 weights, a session (an engine) per stage, vLLM's concurrency = the HF
  batch sizes (generation 32, judge 16, the judge's work in chunks of 48 items, one call each);
- ``new``: ``[generation] vllm_weights = "auto"`` (adapter on CUDA, merged on a CPU), a session
  per stage, concurrency 256 and each stage's whole work in one call (what the loop runs now);
- ``shared``: the adapter served, one session for all stages and iterations (adapters switched
  per call on one engine): what one engine per run would give.

    .venv/bin/python bench/bench_vllm_stages.py [--prompts 16] [--max-new-tokens 24] [--designs old,new,shared]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def policies(tmp: Path, dtype: str):
    from peft import LoraConfig, PeftModel, get_peft_model

    from harness.models import load_model, load_tokenizer
    from harness.sources import locate, materialize

    path = materialize(locate("smollm2-135m-instruct"))
    out = []
    for t in (1, 2):
        torch.manual_seed(t)
        peft = get_peft_model(load_model(path, device="cpu"), LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False))
        peft.save_pretrained(tmp / f"a{t}")
        base = load_model(path, device="cpu", dtype=dtype)
        out.append(PeftModel.from_pretrained(base, str(tmp / f"a{t}")).eval())
    return out, load_tokenizer(path)


def run(design: str, models, tok, n: int, max_new: int) -> list[dict]:
    from harness.engines.vllm_engine import Session
    from harness.generate import Prompt, Sampling
    from harness.tiny.tasks import make_split

    prompts = [Prompt(ex.id, ({"role": "user", "content": ex.prompt},)) for ex in make_split("eval", n)]
    sampled = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=max_new, n=2)
    greedy = Sampling(temperature=0.0, max_new_tokens=max_new)
    shared = Session(weights="adapter", max_num_seqs=256) if design == "shared" else None
    rows = []
    try:
        for t, model in enumerate(models, 1):
            gen_out = None
            for stage in ("generate", "judge", "evaluate"):
                s = shared or (Session(weights="merged") if design == "old" else
                               Session(weights="auto", max_num_seqs=256))
                starts, start_s, t0 = s.starts, s.start_s, time.perf_counter()
                if stage == "generate":
                    gen_out = s.generate(model, tok, prompts, sampled, seed_key=(0, t, stage), batch_size=32)
                    calls = [gen_out]
                elif stage == "judge":
                    items = [Prompt(f"{pid}-{j}", ({"role": "user", "content": "Rate this answer from 1 to 5: "
                                                    + smp["text"]},))
                             for pid, rec in gen_out.items() for j, smp in enumerate(rec["samples"])]
                    step = 48 if design == "old" else len(items)  # judge_groups' chunks
                    calls = [s.generate(model, tok, items[i:i + step], greedy, seed_key=(0, t, stage), batch_size=16)
                             for i in range(0, len(items), step)]
                else:
                    calls = [s.generate(model, tok, prompts, greedy, seed_key=(0, t, stage), batch_size=32)]
                wall = time.perf_counter() - t0
                if shared is None:
                    s.close()
                tokens = sum(smp["n_tokens"] for out in calls for rec in out.values() for smp in rec["samples"])
                starts, start_s = s.starts - starts, s.start_s - start_s
                rows.append({"design": design, "iteration": t, "stage": stage, "starts": starts,
                             "start_s": start_s, "tokens": tokens, "tok_s": tokens / max(wall - start_s, 1e-9),
                             "wall_s": wall})
                print(_line(rows[-1]), flush=True)  # as it is measured: a long run shows its progress
    finally:
        if shared is not None:
            shared.close()
    return rows


def _line(r: dict) -> str:
    return (f"{r['design']:8} {r['iteration']:>4} {r['stage']:9} {r['starts']:>6} {r['start_s']:>8.1f} "
            f"{r['tokens']:>7} {r['tok_s']:>7.1f} {r['wall_s']:>7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--designs", default="old,new,shared")
    args = ap.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU)"
    with tempfile.TemporaryDirectory() as tmp:
        models, tok = policies(Path(tmp), args.dtype)
        rows = [r for d in args.designs.split(",") for r in run(d, models, tok, args.prompts, args.max_new_tokens)]
    print(f"device: {device}; SmolLM2-135M {args.dtype} + rank-8 adapters, {args.prompts} prompts, "
          f"{args.max_new_tokens} new tokens")
    print(f"{'design':8} {'iter':>4} {'stage':9} {'starts':>6} {'start_s':>8} {'tokens':>7} {'tok/s':>7} {'wall_s':>7}")
    for r in rows:
        print(_line(r))
    for d in dict.fromkeys(r["design"] for r in rows):
        mine = [r for r in rows if r["design"] == d]
        print(f"{d}: {sum(r['starts'] for r in mine)} engine starts, {sum(r['start_s'] for r in mine):.1f} s starting, "
              f"{sum(r['wall_s'] for r in mine):.1f} s in all")


if __name__ == "__main__":  # vLLM spawns worker processes that import the main module
    main()
