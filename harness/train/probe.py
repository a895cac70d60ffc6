"""The policy's log-likelihoods of training pairs, and which pairs the post-training probe measures.

``pair_logps`` is the forward pass of the probe (before and after training) and of the
integrity checks in ``harness.train.dpo``: a chosen and a rejected answer share their
prompt, so each batch runs the prompts once (left-padded, their KV cache repeated for
the two answers) and then only the answers, with logits at the answer positions alone.
On SmolLM2 pairs with 39-token prompts and 5- and 22-token answers this takes 0.8 of the
time of two full sequences, 0.55-0.6 with three earlier turns in each prompt. In float32
the values equal a full forward of prompt + answer to 3e-4 nats (answers of 25 nats); in
bfloat16 they differ by 0.16-0.18 nats on average, as much as bfloat16 itself differs
from float32 (other kernel shapes, other roundings).

``probe_sample`` keeps the probe's cost a bounded share of its stage: a seeded random
sample of the pairs, sized by tokens (``PROBE_FORWARDS`` forwards of each: before and after
training) against the stage's own forward work. Not here:
the reference's log-probs (``harness.train.reference``) or what the probe reports
(``harness.train.dpo``).
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch

from harness.train.ended import answer_ids

PROBE_MIN = 4        # pairs the probe measures at least (all of them when there are fewer)
PROBE_MAX = 256      # and at most
LOGIT_BUDGET = 2 ** 28  # most logits one pair_logps batch holds (1 GiB in float32)
TRAIN_FORWARDS = 2   # forward-pass equivalents of one LoRA training pass (forward + backward)
PROBE_FORWARDS = 2   # pair_logps runs over each probed pair: before and after training


def _sides(tokenizer, pair: dict, max_length: int) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """(shared prompt ids, [(rest ids, scored mask)] for chosen and rejected), each side
    cut to ``max_length`` as in training; the shared part holds no scored token."""
    full = []
    for key in ("chosen", "rejected"):
        prompt, answer = answer_ids(tokenizer, pair["messages"], pair, key)  # a cut answer: no end-of-turn
        ids = (prompt + answer)[:max_length]
        full.append((ids, ([0] * len(prompt) + [1] * len(answer))[:len(ids)], len(prompt)))
    (a, _, pa), (b, _, pb) = full
    k = 0
    while k < min(pa, pb, len(a), len(b)) and a[k] == b[k]:
        k += 1
    if k == 0:
        raise ValueError("a pair's two sides share no prompt token")
    return a[:k], [(ids[k:], mask[k:]) for ids, mask, _ in full]


@torch.inference_mode()
def pair_logps(model, tokenizer, pairs: Sequence[dict], max_length: int,
               batch_size: int = 8) -> tuple[list[float], list[float]]:
    """(chosen, rejected) log-likelihoods of ``pairs`` {messages, chosen, rejected} under
    ``model``, in their order: the sums of log p(answer token | prompt, earlier tokens),
    tokenized as trl tokenizes them. Up to ``batch_size`` pairs per forward, similar lengths
    together (longest first), fewer where their answers' logits would pass ``LOGIT_BUDGET``
    (with a 152k-token vocabulary and 256-token answers: 3 pairs)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sides = [_sides(tokenizer, p, max_length) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -(len(sides[i][0]) + sum(len(r) for r, _ in sides[i][1])))
    chosen, rejected = [0.0] * len(pairs), [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        for idx in _batches(order, [max(1, *(len(r) for r, _ in sides[i][1])) for i in range(len(pairs))],
                            batch_size, LOGIT_BUDGET // _vocab_size(model)):
            prompts = [sides[i][0] for i in idx]
            rests = [side for i in idx for side in sides[i][1]]  # chosen, rejected, chosen, ...
            wp, wr = max(map(len, prompts)), max(1, max(len(r) for r, _ in rests))
            ids = torch.tensor([[pad] * (wp - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (wp - len(p)) + [1] * len(p) for p in prompts], device=device)
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            cache.batch_repeat_interleave(2)
            rest_ids = torch.tensor([r + [pad] * (wr - len(r)) for r, _ in rests], device=device)
            rest_mask = torch.tensor([[1] * len(r) + [0] * (wr - len(r)) for r, _ in rests], device=device)
            scored = torch.tensor([m + [0] * (wr - len(m)) for _, m in rests], device=device)
            start = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(2)
            logits = model(input_ids=rest_ids, attention_mask=torch.cat([mask.repeat_interleave(2, 0), rest_mask], 1),
                           position_ids=start[:, None] + torch.arange(wr, device=device)[None],
                           past_key_values=cache, use_cache=False).logits
            # the prompt's last position predicts the first token after it
            logits = torch.cat([out.logits[:, -1:].repeat_interleave(2, 0), logits[:, :-1]], 1).float()
            logp = logits.gather(-1, rest_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
            got = (logp * scored).sum(-1).tolist()
            for j, i in enumerate(idx):
                chosen[i], rejected[i] = got[2 * j], got[2 * j + 1]
    finally:
        model.train(was_training)
    return chosen, rejected


def _vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _batches(order: Sequence[int], widths: Sequence[int], most: int, positions: int) -> list[list[int]]:
    """``order`` cut into consecutive batches of at most ``most`` pairs whose two answer rows of
    the batch's widest answer (``widths``) fit in ``positions`` logit positions; one pair at least."""
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < most and 2 * (len(out[-1]) + 1) * max(widths[j] for j in out[-1] + [i]) <= positions:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def probe_tokens(lengths: tuple[int, int, int]) -> int:
    """Tokens ``pair_logps`` runs for a pair of (prompt, chosen, rejected) token counts."""
    prompt, chosen, rejected = lengths
    return prompt + chosen + rejected


def stage_work(lengths: Sequence[tuple[int, int, int]], epochs: float, precomputed: bool,
               checkpointing: bool) -> float:
    """The train stage's forward work in tokens: every pair's two sequences (prompt + answer)
    ``TRAIN_FORWARDS`` times per epoch (one more with gradient checkpointing), plus the
    reference's forward once (precomputed) or in every epoch."""
    tokens = sum(2 * p + c + r for p, c, r in lengths)
    return tokens * (epochs * (TRAIN_FORWARDS + checkpointing) + (1 if precomputed else epochs))


def probe_sample(lengths: Sequence[tuple[int, int, int]], work: float, share: float, key: str,
                 spent: float = 0.0, cap: int = PROBE_MAX) -> list[int]:
    """Positions (into ``lengths``) of the pairs the probe measures, in order: a random
    sample seeded by ``key``, drawn until its tokens (``PROBE_FORWARDS`` x ``probe_tokens``,
    plus ``spent`` on checks) would pass ``share`` of the stage's total (``work`` + the
    probe), at most ``cap`` pairs and at least ``PROBE_MIN``. Drawing stops at the first pair
    that does not fit, so the sample is not biased towards short pairs. ``share`` >= 1: no
    limit but ``cap``."""
    budget = math.inf if share >= 1 else share / (1 - share) * work - spent
    order = list(range(len(lengths)))
    random.Random(key).shuffle(order)
    taken: list[int] = []
    used = 0
    for i in order[:cap]:
        cost = PROBE_FORWARDS * probe_tokens(lengths[i])
        if used + cost > budget and len(taken) >= PROBE_MIN:
            break
        taken.append(i)
        used += cost
    return sorted(taken)
