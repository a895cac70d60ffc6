"""A causal LM as a pointwise LLM-as-a-judge (the policy itself, or a local HF model).

Each item's filled template is sent as one user message through
``harness.engines.generate.generate`` (so the chat template is applied by ``render``,
the same as everywhere else), sampled ``samples`` times, and every answer is
parsed strictly; the verdict is the mean of the parsable samples.

Seeding: the prompt id handed to ``generate`` is a hash of the filled judge
prompt, so each judgment's seed depends only on (seed_key, content, sample
index) -- never on its position in the call or on which items a cache already
answered. Re-judging the same content gives the same answer; identical items in
one call are judged once.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from harness.engines.generate import Prompt, Sampling, generate
from harness.judges.base import JudgeItem, Verdict
from harness.judges.parsing import fill_group_template, fill_template, group_verdicts, verdict_from_samples


def content_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class LLMJudge:
    """Judge protocol over an in-memory (model, tokenizer). ``lo``/``hi``: the score range the
    template declares (``parsing.load_judge_template``); answers outside it are failures.
    Each verdict records which samples were cut at ``max_new_tokens`` (``truncated``)."""

    def __init__(self, model, tokenizer, *, template: str, lo: int, hi: int, samples: int = 1,
                 temperature: float = 0.0, max_new_tokens: int = 256, batch_size: int = 16,
                 seed_key: tuple = (), name: str = "self", system_prompt: str = "",
                 group_template: str | None = None):
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.sampling = Sampling(temperature=temperature, max_new_tokens=max_new_tokens, n=samples)
        self.batch_size = batch_size
        self.seed_key = tuple(seed_key)
        self.name = name
        self.lo, self.hi = lo, hi
        self.scale = (float(lo), float(hi))
        self.system_prompt = system_prompt
        self.group_template = group_template  # {instruction}/{responses}, same scale; None = no group mode
        self.generate_fn = generate  # the engine's generate (harness.engines); build_judge may set another

    def _messages(self, text: str) -> tuple[dict, ...]:
        user = {"role": "user", "content": text}
        return ({"role": "system", "content": self.system_prompt}, user) if self.system_prompt else (user,)

    def _answers(self, texts: Sequence[str]) -> dict[str, tuple[list[str], list[bool]]]:
        """{content id: (raw answers, cut at the token limit)} of each distinct filled prompt."""
        unique = dict(zip((content_id(t) for t in texts), texts))  # duplicates judged once
        prompts = [Prompt(id=pid, messages=self._messages(t)) for pid, t in unique.items()]
        out = self.generate_fn(self.model, self.tokenizer, prompts, self.sampling, seed_key=self.seed_key,
                               batch_size=self.batch_size, desc=f"judge ({self.name})")
        return {pid: ([s["text"] for s in rec["samples"]], [s.get("finish") == "length" for s in rec["samples"]])
                for pid, rec in out.items()}

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        if not items:
            return []
        texts = [fill_template(self.template, it.instruction, it.response) for it in items]
        answers = self._answers(texts)
        verdicts = {pid: verdict_from_samples(raws, self.lo, self.hi, cut) for pid, (raws, cut) in answers.items()}
        return [verdicts[content_id(t)] for t in texts]

    def score_groups(self, groups: Sequence[Sequence[JudgeItem]]) -> list[list[Verdict]]:
        """Each group (one prompt's candidates) judged in one prompt of the group template:
        one verdict per candidate, all failed when an answer does not score every one."""
        if self.group_template is None:
            raise ValueError(f"judge {self.name!r} has no group template (group_template in its [judge.<kind>] table)")
        groups = [list(g) for g in groups]
        texts = [fill_group_template(self.group_template, g[0].instruction, [it.response for it in g])
                 for g in groups if g]
        answers = self._answers(texts) if texts else {}
        out, t = [], iter(texts)
        for g in groups:
            if not g:
                out.append([])
                continue
            raws, cut = answers[content_id(next(t))]
            out.append(group_verdicts(raws, len(g), self.lo, self.hi, cut))
        return out
