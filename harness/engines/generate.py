"""Batched, resumable, per-request-seeded sampling with Hugging Face ``generate``.

Why a logits processor of our own: ``generate(do_sample=True)`` draws every row
from one global RNG, so a sample would depend on its batch neighbours and on
where a resumed run restarted. ``SeededSampler`` gives each row its own 63-bit
seed from (experiment seed, iteration, stage, prompt id, sample index) and
draws with the Gumbel-max trick: the chosen token is
argmax(logits / T + g) over the top-p nucleus, where the Gumbel noise g of
(row seed, decoding step, token id) comes from a counter-based integer hash
(splitmix64) computed on the model's device. A draw therefore depends only on
that request's own logits and counters, never on the batch composition, the
batch size or a resume point, and decoding has no per-step host copy or sync
of its own. The processor hands ``generate`` a one-hot choice that greedy
decoding then takes. The batch plan is also a pure function of the request
list, so a resumed run recomputes an unfinished batch with exactly the same
neighbours and padding.

``generate`` always receives an explicit ``GenerationConfig`` built from the
experiment's settings alone (``generation_settings``), and the checkpoint's own
``generation_config`` is set aside for the call, so a model that ships, say,
``repetition_penalty`` or ``top_k`` cannot change sampling, greedy decoding or
the indicators' logits.

The same processor measures the over-optimisation indicators on the fly: the
entropy of the renormalised top-k next-token distribution and the top-k mass,
from the untempered logits, per generated token (kept on the device and moved
to the host once per batch).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from harness.console import terminal as console
from harness.store.files import JsonlLog

SAMPLER = "gumbel-max/splitmix64/v1"  # recorded with the settings: names the noise stream


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


# ----- counter-based noise (int64 torch ops wrap modulo 2**64; ``>>`` is arithmetic) ----------
_U64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    x &= _U64
    return x - (1 << 64) if x >> 63 else x


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_M1 = _i64(0xBF58476D1CE4E5B9)
_M2 = _i64(0x94D049BB133111EB)


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser, elementwise on int64 tensors (bit-exact on any device)."""
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    return x ^ _srl(x, 31)


def gumbel_noise(row_keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise, float32, for each (row key, token id): element [r, i] is a pure
    function of (row_keys[r], token_ids[r, i]), from z = mix64(key + id * golden) (the
    splitmix64 stream of that key). Its top 23 bits, read as a signed number s = z >> 41 in
    [-2**22, 2**22), give u = (s + 2**22 + 1/2) / 2**23 in (0, 1), exact in float32.
    mix64's last xor-shift (x >>> 31) leaves bits 33..63 unchanged, so it is skipped here."""
    x = row_keys.unsqueeze(-1) + token_ids * _GOLDEN
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    # x >> 41 (arithmetic) is the top 23 bits as a signed value in [-2**22, 2**22)
    u = (x >> 41).float().add_(2.0 ** 22 + 0.5).mul_(2.0 ** -23)
    return u.log_().neg_().log_().neg_()


class SeededSampler(LogitsProcessor):
    """Samples row r from its own seed ``seeds[r]``; returns logits that make greedy pick it.

    Step t of the decoding (the t-th generated token, counted by this processor;
    generation is synchronous, so it is the same for every row of a batch) draws
    with the noise of key mix64(mix64(seed) + (t + 1) * golden). Everything stays on
    the scores' device; the keys of all steps are computed once per batch.
    """

    def __init__(self, seeds: Sequence[int], sampling: Sampling, device: torch.device | str = "cpu"):
        self.s = sampling
        self.step = 0
        self.seed_keys = mix64(torch.tensor(list(seeds), dtype=torch.int64, device=device))
        self._keys = self._step_keys(0, max(1, sampling.max_new_tokens))
        self.entropy: list[torch.Tensor] = []
        self.mass: list[torch.Tensor] = []
        self._token_ids: torch.Tensor | None = None

    def _step_keys(self, start: int, count: int) -> torch.Tensor:
        steps = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=self.seed_keys.device)
        return mix64(self.seed_keys.unsqueeze(-1) + steps * _GOLDEN)

    def keys(self, device: torch.device) -> torch.Tensor:
        """The noise key of each row at the current step."""
        if self.step >= self._keys.shape[-1]:  # more steps than planned: extend
            self._keys = torch.cat([self._keys, self._step_keys(self._keys.shape[-1], self._keys.shape[-1])], -1)
        if self._keys.device != device:
            self._keys = self._keys.to(device)
        return self._keys[:, self.step]

    def _all_tokens(self, scores: torch.Tensor) -> torch.Tensor:
        if self._token_ids is None or self._token_ids.shape[-1] != scores.shape[-1]:
            self._token_ids = torch.arange(scores.shape[-1], dtype=torch.int64, device=scores.device)
        return self._token_ids

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """The token of each row at this step (does not advance the step)."""
        if self.s.temperature == 0.0:
            return scores.argmax(-1)
        keys = self.keys(scores.device)
        logits = scores / self.s.temperature if self.s.temperature != 1.0 else scores
        if self.s.top_p < 1.0:
            # the nucleus, in descending order; the top token is always kept
            sorted_l, idx = logits.sort(dim=-1, descending=True, stable=True)
            p = torch.softmax(sorted_l, dim=-1)
            drop = (p.cumsum(-1) - p) > self.s.top_p
            pick = gumbel_noise(keys, idx).add_(sorted_l).masked_fill_(drop, -math.inf).argmax(-1)
            return idx.gather(-1, pick.unsqueeze(-1)).squeeze(-1)
        return gumbel_noise(keys, self._all_tokens(scores)).add_(logits).argmax(-1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        if self.s.top_k_stats:
            ent, mass = topk_stats(scores, self.s.top_k_stats)
            self.entropy.append(ent)
            self.mass.append(mass)
        choice = self.choose(scores)
        self.step += 1
        out = torch.full_like(scores, -math.inf)
        out.scatter_(-1, choice.unsqueeze(-1), 0.0)
        return out

    def stats(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(entropy, mass) as [rows, steps] CPU tensors: one host copy per batch."""
        if not self.entropy:
            return None
        both = torch.stack([torch.stack(self.entropy, 1), torch.stack(self.mass, 1)]).cpu()
        return both[0], both[1]


def plan_batches(lengths: dict[str, int], order: Sequence[str], rows_per_prompt: int,
                 batch_size: int, max_tokens: int = 0) -> list[list[str]]:
    """Length-sorted batches of prompt ids (longest first), a pure function of the inputs: at
    most ``batch_size`` rows (``rows_per_prompt`` per prompt) and, with ``max_tokens`` > 0, at
    most that many padded prompt tokens (rows x the batch's longest prompt, what the prefill
    holds at once). A prompt whose rows alone exceed the budget is a batch of its own."""
    ids = sorted(order, key=lambda pid: (-lengths[pid], pid))
    per = max(1, batch_size // rows_per_prompt)
    batches, i = [], 0
    while i < len(ids):
        n = per  # ids[i] is the batch's longest prompt
        if max_tokens > 0:
            n = max(1, min(per, max_tokens // (rows_per_prompt * max(1, lengths[ids[i]]))))
        batches.append(ids[i:i + n])
        i += n
    return batches


CUT = "length"  # a sample's "finish" when it hit max_new_tokens ("eos": it stopped by itself)


def is_cut(sample: dict) -> bool | None:
    """Whether a generated sample hit ``max_new_tokens`` before it ended; None (unknown) for
    a sample written without a "finish" field."""
    finish = sample.get("finish")
    return None if finish is None else finish == CUT


def cut_metrics(records, prefix: str) -> dict:
    """``<prefix>/n_cut`` (samples of ``records``, generate()'s {id: record} or a list of
    records, that hit max_new_tokens) and ``<prefix>/cut_share`` (of the samples whose
    finish is known); both None when no sample's finish is known."""
    recs = records.values() if isinstance(records, dict) else records
    known = [c for rec in recs for c in map(is_cut, rec["samples"]) if c is not None]
    return {f"{prefix}/n_cut": sum(known) if known else None,
            f"{prefix}/cut_share": sum(known) / len(known) if known else None}


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def generation_settings(model, tokenizer, sampling: Sampling, *, min_new_tokens: int = 0) -> dict:
    """What decides decoding, as a plain dict: ``hf`` is the complete ``GenerationConfig``
    handed to ``generate`` (from the experiment's settings, plus pad / eos ids from the
    tokenizer and model), ``sampler`` what ``SeededSampler`` does with the logits.

    Every logits-changing option of ``generate`` is pinned to "off": nothing of a
    checkpoint's own ``generation_config`` takes part (see ``_decoding_config``).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hf = {"max_new_tokens": sampling.max_new_tokens, "min_new_tokens": min_new_tokens,
          "do_sample": False, "num_beams": 1, "num_return_sequences": 1,
          "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
          "encoder_no_repeat_ngram_size": 0, "length_penalty": 1.0, "renormalize_logits": False,
          "remove_invalid_values": False, "use_cache": True,
          "pad_token_id": pad, "eos_token_id": sorted(_eos_ids(model, tokenizer))}
    sampler = {"name": SAMPLER, "temperature": sampling.temperature, "top_p": sampling.top_p,
               "top_k_stats": sampling.top_k_stats, "n": sampling.n}
    return {"hf": hf, "sampler": sampler}


def generation_config(model, tokenizer, sampling: Sampling, *, min_new_tokens: int = 0) -> GenerationConfig:
    return GenerationConfig(**generation_settings(model, tokenizer, sampling, min_new_tokens=min_new_tokens)["hf"])


@contextlib.contextmanager
def _decoding_config(model, config: GenerationConfig) -> Iterator[None]:
    """Set the checkpoint's ``generation_config`` aside while ``generate`` runs.

    ``generate`` fills every option left ``None`` in the config it is given from the
    model's own ``generation_config`` (suppress_tokens, forced ids, bad words, sequence
    bias, ...: options whose "off" is ``None``). With ``config`` in its place, nothing
    from the checkpoint can join. A PeftModel copies its base model's config back onto
    it, so the swap is done on the innermost model and undone afterwards.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config
    inner.generation_config = copy.deepcopy(config)
    try:
        yield
    finally:
        inner.generation_config = saved


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[Prompt], sampling: Sampling, *,
             seed_key: tuple, batch_size: int = 32, log: JsonlLog | None = None,
             desc: str = "generate", min_new_tokens: int = 0, max_batch_tokens: int = 0) -> dict[str, dict]:
    """Generate ``sampling.n`` answers per prompt. Returns {prompt id: record}; a record's
    samples hold ``text``, ``n_tokens`` (an eos counts) and ``finish``: "eos" when an eos id
    ended the answer, ``CUT`` when it hit ``max_new_tokens`` first (``is_cut``).
    A batch holds at most ``batch_size`` rows and, with ``max_batch_tokens`` > 0
    (``generation.max_batch_tokens``), at most that many padded prompt tokens (``plan_batches``).

    With ``log``, records already there are reused and each finished batch is
    appended before the next starts, so a killed process resumes where it was.
    ``min_new_tokens`` (benchmarks) forbids eos before that many tokens.
    """
    texts = {p.id: render(tokenizer, p.messages) for p in prompts}
    lengths = {pid: len(tokenizer(t, add_special_tokens=False).input_ids) for pid, t in texts.items()}
    batches = plan_batches(lengths, list(texts), sampling.n, batch_size, max_batch_tokens)
    results = {pid: log.records[pid] for pid in texts if log is not None and pid in log}
    eos_ids = _eos_ids(model, tokenizer)
    config = generation_config(model, tokenizer, sampling, min_new_tokens=min_new_tokens)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bar = console.progress(total=len(texts) * sampling.n, initial=len(results) * sampling.n, desc=desc,
                           unit="samples")
    n_tokens, t0 = 0, time.perf_counter()
    restore = contextlib.ExitStack()
    try:
        restore.enter_context(_decoding_config(model, config))
        for batch in batches:
            if all(pid in results for pid in batch):
                continue
            rows = [(pid, j) for pid in batch for j in range(sampling.n)]
            enc = tokenizer([texts[pid] for pid, _ in rows], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            sampler = SeededSampler([request_seed(*seed_key, pid, j) for pid, j in rows], sampling, device)
            # greedy without indicators needs no processor: generate's own argmax is the same choice
            procs = [sampler] if sampling.temperature > 0 or sampling.top_k_stats else []
            out = model.generate(**enc, generation_config=config, logits_processor=LogitsProcessorList(procs))
            new = out[:, enc.input_ids.shape[1]:].cpu()
            stats = sampler.stats() if sampling.top_k_stats else None
            records: dict[str, dict] = {pid: {"id": pid, "samples": []} for pid in batch if pid not in results}
            for r, (pid, _) in enumerate(rows):
                toks = new[r].tolist()
                stop = next((i for i, t in enumerate(toks) if t in eos_ids), None)
                length = len(toks) if stop is None else stop + 1
                sample = {"text": tokenizer.decode(toks[:length], skip_special_tokens=True),
                          "n_tokens": length, "finish": CUT if stop is None else "eos"}
                if stats is not None:
                    sample["topk_entropy"] = float(stats[0][r, :length].mean())
                    sample["topk_mass"] = float(stats[1][r, :length].mean())
                n_tokens += length
                if pid in records:
                    records[pid]["samples"].append(sample)
            if log is not None:
                log.append(records.values())
            results.update(records)
            bar.update(len(rows))
            bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
    finally:
        restore.close()
        bar.close()
        model.train(was_training)
    return {pid: results[pid] for pid in texts}


def chat_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool,
             continue_final_message: bool = False) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template, as trl tokenizes them;
    ``continue_final_message``: the last (assistant) message left open, its text the end of
    the rendering (no end-of-turn after it)."""
    return list(tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                              add_generation_prompt=add_generation_prompt,
                                              continue_final_message=continue_final_message)["input_ids"])


def completion_ids(tokenizer, messages: Sequence[dict], response: str,
                   end_turn: bool = True) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) exactly as trl's DPOTrainer tokenizes a
    conversational pair: the completion starts where the rendered prompt and the
    rendered prompt+answer diverge, and includes the template's end-of-turn, or, with
    ``end_turn`` false (an answer cut at ``max_new_tokens``: it never ended), ends with
    the answer's own text."""
    prompt = chat_ids(tokenizer, messages, True)
    full = chat_ids(tokenizer, list(messages) + [{"role": "assistant", "content": response}], False,
                    continue_final_message=not end_turn)
    n = 0
    while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
        n += 1
    return prompt[:n], full[n:]
