"""Batched, resumable, per-request-seeded sampling with Hugging Face ``generate``.

Why a logits processor of our own: ``generate(do_sample=True)`` draws every row
from one global RNG, so a sample would depend on its batch neighbours and on
where a resumed run restarted. ``SeededSampler`` draws each row from its own
``torch.Generator`` seeded from (experiment seed, iteration, stage, prompt id,
sample index) and hands ``generate`` a one-hot choice that greedy decoding then
takes. The batch plan is also a pure function of the request list, so a resumed
run recomputes an unfinished batch with exactly the same neighbours and padding.

The same processor measures the over-optimisation indicators on the fly: the
entropy of the renormalised top-k next-token distribution and the top-k mass,
from the untempered logits, per generated token.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from harness import console
from harness.store import JsonlLog


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0     # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    n: int = 1                   # samples per prompt
    top_k_stats: int = 0         # > 0: record top-k entropy / mass per sample


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: tuple[dict, ...]   # chat messages ending with the user turn


def request_seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def render(tokenizer, messages: Sequence[dict]) -> str:
    """The one place a chat is turned into model text (generation, judging, training, eval)."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def topk_stats(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy of the renormalised top-k distribution, top-k probability mass), per row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(min(k, logp.shape[-1]), dim=-1).values
    mass = top.exp().sum(-1)
    q_log = top - torch.log(mass).unsqueeze(-1)
    entropy = -(q_log.exp() * q_log).sum(-1)
    return entropy, mass


class SeededSampler(LogitsProcessor):
    """Samples each row with its own generator; returns logits that make greedy pick it."""

    def __init__(self, generators: list[torch.Generator], sampling: Sampling):
        self.generators = generators
        self.s = sampling
        self.entropy: list[torch.Tensor] = []
        self.mass: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        if self.s.top_k_stats:
            ent, mass = topk_stats(scores, self.s.top_k_stats)
            self.entropy.append(ent.cpu())
            self.mass.append(mass.cpu())
        if self.s.temperature == 0.0:
            choice = scores.argmax(-1)
        else:
            probs = torch.softmax(scores / self.s.temperature, dim=-1)
            if self.s.top_p < 1.0:
                sorted_p, idx = probs.sort(dim=-1, descending=True)
                drop = (sorted_p.cumsum(-1) - sorted_p) > self.s.top_p  # always keeps the top token
                sorted_p = sorted_p.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
            cpu = probs.cpu()
            choice = torch.stack([torch.multinomial(cpu[i], 1, generator=g)[0]
                                  for i, g in enumerate(self.generators)]).to(scores.device)
        out = torch.full_like(scores, -math.inf)
        out.scatter_(-1, choice.unsqueeze(-1), 0.0)
        return out


def plan_batches(lengths: dict[str, int], order: Sequence[str], rows_per_prompt: int,
                 batch_size: int) -> list[list[str]]:
    """Length-sorted batches of prompt ids (longest first), a pure function of the inputs."""
    ids = sorted(order, key=lambda pid: (-lengths[pid], pid))
    per = max(1, batch_size // rows_per_prompt)
    return [ids[i:i + per] for i in range(0, len(ids), per)]


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[Prompt], sampling: Sampling, *,
             seed_key: tuple, batch_size: int = 32, log: JsonlLog | None = None,
             desc: str = "generate") -> dict[str, dict]:
    """Generate ``sampling.n`` answers per prompt. Returns {prompt id: record}.

    With ``log``, records already there are reused and each finished batch is
    appended before the next starts, so a killed process resumes where it was.
    """
    texts = {p.id: render(tokenizer, p.messages) for p in prompts}
    lengths = {pid: len(tokenizer(t, add_special_tokens=False).input_ids) for pid, t in texts.items()}
    batches = plan_batches(lengths, list(texts), sampling.n, batch_size)
    results = {pid: log.records[pid] for pid in texts if log is not None and pid in log}
    eos_ids = _eos_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bar = console.progress(total=len(texts) * sampling.n, initial=len(results) * sampling.n, desc=desc,
                           unit="samples")
    n_tokens, t0 = 0, time.perf_counter()
    try:
        for batch in batches:
            if all(pid in results for pid in batch):
                continue
            rows = [(pid, j) for pid in batch for j in range(sampling.n)]
            enc = tokenizer([texts[pid] for pid, _ in rows], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            gens = [torch.Generator().manual_seed(request_seed(*seed_key, pid, j)) for pid, j in rows]
            sampler = SeededSampler(gens, sampling)
            out = model.generate(**enc, do_sample=False, max_new_tokens=sampling.max_new_tokens,
                                 logits_processor=LogitsProcessorList([sampler]),
                                 pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None,
                                 top_k=None)
            new = out[:, enc.input_ids.shape[1]:].cpu()
            records: dict[str, dict] = {pid: {"id": pid, "samples": []} for pid in batch if pid not in results}
            for r, (pid, _) in enumerate(rows):
                toks = new[r].tolist()
                stop = next((i for i, t in enumerate(toks) if t in eos_ids), None)
                length = len(toks) if stop is None else stop + 1
                sample = {"text": tokenizer.decode(toks[:length], skip_special_tokens=True),
                          "n_tokens": length, "finish": "length" if stop is None else "eos"}
                if sampling.top_k_stats and sampler.entropy:
                    ent = torch.stack(sampler.entropy, 1)[r, :length]
                    mass = torch.stack(sampler.mass, 1)[r, :length]
                    sample["topk_entropy"] = float(ent.mean())
                    sample["topk_mass"] = float(mass.mean())
                n_tokens += length
                if pid in records:
                    records[pid]["samples"].append(sample)
            if log is not None:
                log.append(records.values())
            results.update(records)
            bar.update(len(rows))
            bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
    finally:
        bar.close()
        model.train(was_training)
    return {pid: results[pid] for pid in texts}


def _chat_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                              add_generation_prompt=add_generation_prompt)["input_ids"])


def completion_ids(tokenizer, messages: Sequence[dict], response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) exactly as trl's DPOTrainer tokenizes a
    conversational pair: the completion starts where the rendered prompt and the
    rendered prompt+answer diverge, and includes the template's end-of-turn."""
    prompt = _chat_ids(tokenizer, messages, True)
    full = _chat_ids(tokenizer, list(messages) + [{"role": "assistant", "content": response}], False)
    n = 0
    while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
        n += 1
    return prompt[:n], full[n:]


@torch.inference_mode()
def sequence_logprobs(model, tokenizer, prompts: Sequence[Sequence[dict]], responses: Sequence[str],
                      batch_size: int = 16, max_length: int = 1024) -> list[float]:
    """Sum of log p(completion tokens | prompt) per (prompt, response), tokenized as in training."""
    device = next(model.parameters()).device
    out: list[float] = []
    was_training = model.training
    model.eval()
    for i in range(0, len(responses), batch_size):
        ids, masks = [], []
        for msgs, resp in zip(prompts[i:i + batch_size], responses[i:i + batch_size]):
            p, c = completion_ids(tokenizer, msgs, resp)
            seq = (p + c)[:max_length]
            ids.append(seq)
            masks.append(([0] * len(p) + [1] * len(c))[:max_length])
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        # right padding: positions stay 0..len-1 without relying on position_ids support
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in ids], device=device)
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids], device=device)
        target = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)
        logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        out.extend((logp * target[:, 1:]).sum(-1).tolist())
    model.train(was_training)
    return out
