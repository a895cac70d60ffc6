"""From-scratch supervised warm-up of the tiny model, and greedy exact-match scoring.

A plain torch loop instead of trl: the warm-up is a pretraining from random
weights (high learning rate, a curriculum over pools of examples; no reference
model, no adapters), it must finish in under two minutes on two cores, and its
bytes must be identical for the same seed. A loop this small has no hidden
data-loader workers, mixed precision or logging callbacks that could break either.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch

IGNORE = -100
Row = tuple[list[int], list[int]]  # (input ids, labels); label IGNORE = no loss


def encode(tok, prompt: str, response: str | None = None) -> Row:
    """A chat-formatted prompt (+ response and eos); only the response and eos are trained."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    labels = [IGNORE] * len(ids)
    if response is not None:
        r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, labels = ids + r, labels + r
    return ids, labels


def _batch(rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    # right padding for training: every sequence starts at position 0
    n = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train(model, tok, pools: Sequence[Sequence[Row]], weights: Sequence[float], *, steps: int,
          batch_size: int, lr: float, seed: int, starts: Sequence[int] | None = None,
          warmup_steps: int = 20, weight_decay: float = 0.0) -> list[float]:
    """AdamW with linear warm-up and cosine decay to 10% of ``lr`` over ``steps``.

    Each batch comes from one pool of encoded rows (pools of similar lengths pad
    little), chosen with probability proportional to ``weights`` among the pools
    whose ``starts`` step has been reached (a curriculum). Pools and rows are
    drawn with a seeded rng. Returns the per-step losses.
    """
    rng = random.Random(seed)
    starts = list(starts or [0] * len(pools))
    pools_rows = [list(pool) for pool in pools]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, steps - warmup_steps)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    losses = []
    for step in range(steps):
        live = [i for i, st in enumerate(starts) if step >= st]
        rows = pools_rows[rng.choices(live, [weights[i] for i in live])[0]]
        batch = _batch([rows[rng.randrange(len(rows))] for _ in range(batch_size)], tok.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite warm-up loss at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def generate(model, tok, prompts: Sequence[str], max_new_tokens: int = 24, batch_size: int = 64,
             **sampling) -> list[str]:
    """Answers through the chat template, left-padded batches; greedy unless
    ``sampling`` says otherwise (e.g. do_sample=True, temperature=0.7)."""
    model.eval()
    sampling = {"do_sample": False, **sampling}
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=False) for p in prompts[i: i + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, **sampling)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out
