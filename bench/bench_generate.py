"""Generation throughput: batched (length-sorted, left-padded) vs one prompt at a time.

Same model, same prompts, same greedy settings, measured in one run; prints
tokens/s of each and their ratio. Default model: the embedded tiny world.

    .venv/bin/python bench/bench_generate.py [--model tiny] [--prompts 128] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from harness.data import load_simple
from harness.generate import Prompt, Sampling, generate
from harness.models import load_model, load_tokenizer, offline_env


def run(model, tok, prompts, sampling, batch_size):
    t0 = time.perf_counter()
    out = generate(model, tok, prompts, sampling, seed_key=(0,), batch_size=batch_size, desc=f"batch {batch_size}")
    dt = time.perf_counter() - t0
    tokens = sum(s["n_tokens"] for r in out.values() for s in r["samples"])
    return tokens / dt, tokens, dt, out


def main() -> None:
    offline_env()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", default="tiny:eval_prompts")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    model, tok = load_model(args.model), load_tokenizer(args.model)
    exs = load_simple(args.prompts, "--prompts")[: args.n]
    prompts = [Prompt(e.id, e.messages) for e in exs]
    s = Sampling(max_new_tokens=args.max_new_tokens)
    run(model, tok, prompts[:4], s, 4)  # warm-up
    b_rate, b_tok, b_dt, b_out = run(model, tok, prompts, s, args.batch_size)
    o_rate, o_tok, o_dt, o_out = run(model, tok, prompts, s, 1)
    same = sum(b_out[p.id]["samples"][0]["text"] == o_out[p.id]["samples"][0]["text"] for p in prompts)
    print(f"device={next(model.parameters()).device} threads={torch.get_num_threads()} prompts={len(prompts)} "
          f"max_new_tokens={args.max_new_tokens}")
    print(f"batched (bs={args.batch_size}): {b_tok} tokens in {b_dt:.2f}s = {b_rate:.0f} tok/s")
    print(f"one at a time:      {o_tok} tokens in {o_dt:.2f}s = {o_rate:.0f} tok/s")
    print(f"speed-up batched / one-at-a-time: {b_rate / o_rate:.1f}x  (identical greedy outputs: {same}/{len(prompts)})")


if __name__ == "__main__":
    main()
