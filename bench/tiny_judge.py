"""How well the tiny model judges (Self-Rewarding's LLM-as-a-judge) against the oracle.

Measures the warmed-up model (M0) and M0 after a LoRA SFT on the world's IFT +
EFT files (Self-Rewarding's M1: r=16 on q/k/v/o), on held-out eval instructions:

- synthetic: one candidate per oracle score 1..5 for every instruction;
- samples:   N=4 answers per instruction sampled from the model itself (T=0.7,
  top_p=0.9), as Self-Rewarding does; "pair accuracy" is how often the pair a
  Self-Rewarding iteration would build (highest vs lowest judge score, ties
  dropped) is ordered the same way by the oracle (oracle ties count half).

Prints one JSON object. Usage: python bench/tiny_judge.py [--seed 0] [--m1-steps 300]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import random
import time
from pathlib import Path

import torch

from harness.judges.parsing import parse_score  # the strict parser the harness itself uses
from harness.store.files import read_jsonl
from harness.tiny import tasks, warmup
from harness.tiny.build import ensure_tiny
from harness.tiny.oracle import grade, response_with_score

def agreement(groups: list[list[tuple[int, int | None]]]) -> dict:
    """groups: per instruction, (oracle score, judge score or None) for each candidate."""
    flat = [x for g in groups for x in g]
    n = len(flat)
    ok = [(o, p) for o, p in flat if p is not None]
    pair_total = pair_agree = 0.0
    for g in groups:
        for (o1, p1), (o2, p2) in itertools.combinations(g, 2):
            if o1 == o2:
                continue
            pair_total += 1
            if p1 is None or p2 is None or p1 == p2:
                pair_agree += 0.5
            elif (p1 > p2) == (o1 > o2):
                pair_agree += 1
    rank = {}
    if len(ok) > 2:
        o, p = torch.tensor([x for x, _ in ok], dtype=torch.float), torch.tensor([y for _, y in ok], dtype=torch.float)
        if o.std() > 0 and p.std() > 0:
            rank["pearson"] = round(torch.corrcoef(torch.stack([o, p]))[0, 1].item(), 3)
    return {"n": n, "parse_rate": round(len(ok) / max(1, n), 3),
            "exact": round(sum(o == p for o, p in ok) / max(1, n), 3),
            "pairwise": round(pair_agree / max(1, pair_total), 3), "pairs": int(pair_total),
            "judge_dist": dict(sorted(collections.Counter(p for _, p in flat if p is not None).items())),
            **rank}


def self_rewarding_pairs(groups: list[list[tuple[int, int | None]]]) -> dict:
    """Pair = (highest, lowest judge score) per instruction, ties dropped."""
    n = agree = 0.0
    for g in groups:
        scored = [(o, p) for o, p in g if p is not None]
        if len(scored) < 2:
            continue
        hi, lo = max(scored, key=lambda x: x[1]), min(scored, key=lambda x: x[1])
        if hi[1] == lo[1]:
            continue
        n += 1
        agree += 1.0 if hi[0] > lo[0] else 0.5 if hi[0] == lo[0] else 0.0
    return {"sr_pairs": int(n), "sr_pair_accuracy": round(agree / max(1, n), 3)}


def judge(model, tok, instruction_answers: list[list[tuple[str, str]]], examples) -> list[list[tuple[int, int | None]]]:
    prompts, meta = [], []
    for ex, cands in zip(examples, instruction_answers):
        for c in cands:
            prompts.append(tasks.judge_prompt(ex.prompt, c))
            meta.append(grade(ex.task, ex.answer, c)[0])
    outs = warmup.generate(model, tok, prompts, max_new_tokens=16)
    scores = [parse_score(o) for o in outs]
    groups, i = [], 0
    for cands in instruction_answers:
        groups.append(list(zip(meta[i: i + len(cands)], scores[i: i + len(cands)])))
        i += len(cands)
    return groups


def measure(model, tok, ev, seed: int) -> dict:
    greedy = warmup.generate(model, tok, [ex.prompt for ex in ev])
    em = sum(tasks.check(ex, o) for ex, o in zip(ev, greedy)) / len(ev)
    rng = random.Random(f"bench:{seed}")
    synthetic = [[c for s in range(1, 6) if (c := response_with_score(ex, s, rng)) is not None] for ex in ev]
    torch.manual_seed(seed)
    flat = warmup.generate(model, tok, [ex.prompt for ex in ev for _ in range(4)],
                           do_sample=True, temperature=0.7, top_p=0.9)
    samples = [flat[4 * i: 4 * i + 4] for i in range(len(ev))]
    sample_groups = judge(model, tok, samples, ev)
    return {"exact_match": round(em, 3),
            "synthetic": agreement(judge(model, tok, synthetic, ev)),
            "samples": {**agreement(sample_groups), **self_rewarding_pairs(sample_groups),
                        "oracle_dist": dict(sorted(collections.Counter(o for g in sample_groups for o, _ in g).items()))}}


def m1(model, tok, world, steps: int, lr: float, seed: int):
    from peft import LoraConfig, get_peft_model

    rows = read_jsonl(world / "ift.jsonl") + read_jsonl(world / "eft.jsonl")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    warmup.train(peft_model, tok, [[warmup.encode(tok, r["prompt"], r["response"]) for r in rows]], [1.0],
                 steps=steps, batch_size=16, lr=lr, seed=seed, warmup_steps=10)
    return peft_model


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--m1-steps", type=int, default=300)
    ap.add_argument("--m1-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--world", default="", help="a built world directory (default: ensure_tiny(seed))")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    world = Path(args.world) if args.world else ensure_tiny(args.seed)
    model = AutoModelForCausalLM.from_pretrained(world / "model")
    tok = AutoTokenizer.from_pretrained(world / "model")
    ev = tasks.make_split("eval", 150, args.seed)
    report = {"world": str(world), "M0": measure(model, tok, ev, args.seed)}
    t0 = time.time()
    model = m1(model, tok, world, args.m1_steps, args.m1_lr, args.seed)
    report["M1_seconds"] = round(time.time() - t0, 1)
    report["M1"] = measure(model, tok, ev, args.seed)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
