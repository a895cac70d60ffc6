"""The vLLM engine as a run uses it: engine starts, seconds spent starting engines and tokens/s
per generating stage of a 2-iteration run's generation, for each method, the engine per stage
against the engine per run, measured in one process on the same policies.

The policies are a continue chain's: SmolLM2-135M-Instruct in ``--dtype`` (bfloat16) with a
random rank-8 adapter per iterate (0, 1, 2). Each method's generating stages run as the loop
runs them (``harness.engines.Engines.stage``, one stage at a time, the same calls): every
iteration's "evaluate" (``--prompts`` greedy answers, iterate t), then "generate" (SPIN: one
sampled answer per prompt; Self-Rewarding and DNO: 2) and, for Self-Rewarding, "judge" (one
greedy judgment per answer, the whole stage in one call). DNO's judge is an endpoint, not the
engine. No training runs (the adapters are given), so only the engine's work is timed. Designs:

- ``stage``: an engine per stage (``Engines`` opened and closed around each stage: the loop's
  design before one engine per run), ``[generation] vllm_weights = "auto"``, concurrency 256;
- ``run``: one ``Engines`` for the run (the loop now), ``vllm_weights = "auto"`` (on a CPU
  merged weights, each next iterate's loaded into the engine in place, so one start and a load
  per later iterate; on CUDA the adapter, so one start);
- ``run-adapter``: one ``Engines`` for the run with the adapter served (``vllm_weights =
  "adapter"``: one start for the run on any device).

    .venv/bin/python bench/bench_vllm_stages.py [--prompts 8] [--max-new-tokens 16]
        [--methods spin,self_rewarding,dno] [--designs stage,run,run-adapter]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch

STAGES = {"spin": (("generate", 1),), "self_rewarding": (("generate", 2), ("judge", 0)),
          "dno": (("generate", 2),)}  # per iteration after its evaluate: (stage, samples per prompt)


def policies(tmp: Path, dtype: str):
    from peft import LoraConfig, PeftModel, get_peft_model

    from harness.models.load import load_model, load_tokenizer
    from harness.models.sources import locate, materialize

    path = materialize(locate("smollm2-135m-instruct"))
    out = []
    for t in (0, 1, 2):
        torch.manual_seed(t)
        peft = get_peft_model(load_model(path, device="cpu"), LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False))
        peft.save_pretrained(tmp / f"a{t}")
        base = load_model(path, device="cpu", dtype=dtype)
        out.append(PeftModel.from_pretrained(base, str(tmp / f"a{t}")).eval())
    return out, load_tokenizer(path)


def run(method: str, design: str, models, tok, n: int, max_new: int) -> list[dict]:
    from harness.config.experiment import GenerationSection
    from harness.engines import Engines
    from harness.engines.generate import Prompt, Sampling
    from harness.tiny.tasks import make_split

    gen = GenerationSection(engine="vllm", vllm_weights="adapter" if design == "run-adapter" else "auto",
                            vllm_max_num_seqs=256)
    prompts = [Prompt(ex.id, ({"role": "user", "content": ex.prompt},)) for ex in make_split("eval", n)]
    greedy = Sampling(temperature=0.0, max_new_tokens=max_new)
    plan = [(0, "evaluate", 0)]
    for t in (1, 2):
        plan += [(t, stage, k) for stage, k in STAGES[method]] + [(t, "evaluate", 0)]
    run_engines = Engines() if design != "stage" else None
    rows, answers = [], {}
    with contextlib.ExitStack() as stack:
        if run_engines is not None:
            stack.enter_context(run_engines)
        for t, stage, k in plan:
            policy = models[t if stage == "evaluate" else t - 1]  # iteration t generates with iterate t-1
            engines = run_engines or Engines()
            v = engines.vllm
            before = (v.starts, v.start_s, v.loads) if v else (0, 0.0, 0)
            t0 = time.perf_counter()
            with engines.stage("vllm", gen) as eng:
                if stage == "generate":
                    out = eng.generate(policy, tok, prompts, Sampling(temperature=0.7, top_p=0.9, max_new_tokens=max_new,
                                                                      n=k), seed_key=(0, t, stage), batch_size=32)
                    answers[t] = out
                elif stage == "judge":
                    items = [Prompt(f"{pid}-{j}", ({"role": "user", "content": "Rate this answer from 1 to 5: "
                                                    + smp["text"]},))
                             for pid, rec in answers[t].items() for j, smp in enumerate(rec["samples"])]
                    out = eng.generate(policy, tok, items, greedy, seed_key=(0, t, stage), batch_size=16)
                else:
                    out = eng.generate(policy, tok, prompts, greedy, seed_key=(0, t, stage), batch_size=32)
            wall = time.perf_counter() - t0
            starts, start_s = engines.vllm.starts - before[0], engines.vllm.start_s - before[1]
            loads = engines.vllm.loads - before[2]
            if run_engines is None:
                engines.close()
            tokens = sum(smp["n_tokens"] for rec in out.values() for smp in rec["samples"])
            rows.append({"method": method, "design": design, "iteration": t, "stage": stage, "starts": starts,
                         "loads": loads, "start_s": start_s, "tokens": tokens,
                         "tok_s": tokens / max(wall - start_s, 1e-9), "wall_s": wall})
            print(_line(rows[-1]), flush=True)  # as it is measured: a long run shows its progress
    return rows


HEADER = (f"{'method':14} {'design':11} {'iter':>4} {'stage':9} {'starts':>6} {'loads':>5} {'start_s':>8} "
          f"{'tokens':>7} {'tok/s':>7} {'wall_s':>7}")


def _line(r: dict) -> str:
    return (f"{r['method']:14} {r['design']:11} {r['iteration']:>4} {r['stage']:9} {r['starts']:>6} "
            f"{r['loads']:>5} {r['start_s']:>8.1f} {r['tokens']:>7} {r['tok_s']:>7.1f} {r['wall_s']:>7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--methods", default="spin,self_rewarding,dno")
    ap.add_argument("--designs", default="stage,run,run-adapter")
    args = ap.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU)"
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        models, tok = policies(Path(tmp), args.dtype)
        rows = [r for m in args.methods.split(",") for d in args.designs.split(",")
                for r in run(m, d, models, tok, args.prompts, args.max_new_tokens)]
    print(f"\ndevice: {device}; SmolLM2-135M {args.dtype} + rank-8 adapters, {args.prompts} prompts, "
          f"{args.max_new_tokens} new tokens")
    print(HEADER)
    for r in rows:
        print(_line(r))
    print()
    for key in dict.fromkeys((r["method"], r["design"]) for r in rows):
        mine = [r for r in rows if (r["method"], r["design"]) == key]
        work_s = sum(r["wall_s"] - r["start_s"] for r in mine)  # the stages' time outside engine starts
        print(f"{key[0]:14} {key[1]:11}: {sum(r['starts'] for r in mine)} engine starts, "
              f"{sum(r['loads'] for r in mine)} loads in place, {sum(r['start_s'] for r in mine):.1f} s starting, "
              f"{sum(r['wall_s'] for r in mine):.1f} s in all, "
              f"{sum(r['tokens'] for r in mine) / max(work_s, 1e-9):.1f} tok/s outside the starts")


if __name__ == "__main__":  # vLLM spawns worker processes that import the main module
    main()
