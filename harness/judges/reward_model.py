"""A sequence-classification reward model (one logit) as a pointwise judge, and its kind
"reward_model" (options: the model; unbounded scores).

The (instruction, response) pair is rendered as a full two-turn chat with the
reward model's OWN chat template, without a generation prompt: that is the text
reward models are trained to score (``harness.generate.render`` renders a
prompt awaiting an answer, which is the wrong shape here).

Scores are unbounded, so ``scale`` is (-inf, inf); ``observed`` gives the range
seen so far. A non-finite reward is a failure (score None), never a number.
Not an LLM judge: no template, no samples.
"""

from __future__ import annotations

import math
from typing import Sequence

from harness.judges.base import JudgeItem, Verdict
from harness.judges.kind import JudgeKind, LocalModelOptions, model_ident, model_preflight, model_problems
from harness.registry import JUDGES

UNBOUNDED = (-math.inf, math.inf)


class RewardModelJudge:
    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int = 4096,
                 name: str = "reward_model"):
        n_labels = getattr(model.config, "num_labels", None)
        if n_labels != 1:
            raise ValueError(f"reward model must have num_labels=1 (one scalar reward), got {n_labels}")
        if model.config.pad_token_id is None:
            if tokenizer.pad_token_id is None:
                raise ValueError("reward model has no pad token id (config.pad_token_id and the tokenizer's "
                                 "pad token are both unset): batched scoring cannot find each sequence's end")
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = name
        self.scale = UNBOUNDED
        self._lo = math.inf
        self._hi = -math.inf

    @property
    def observed(self) -> tuple[float, float] | None:
        """(lowest, highest) finite reward given so far, or None before any."""
        return (self._lo, self._hi) if self._lo <= self._hi else None

    def _text(self, item: JudgeItem) -> str:
        chat = [{"role": "user", "content": item.instruction}, {"role": "assistant", "content": item.response}]
        return self.tokenizer.apply_chat_template(chat, tokenize=False)

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        import torch  # heavy: only when a reward model scores

        with torch.inference_mode():
            return self._score(items)

    def _score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        out: list[Verdict] = []
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(items), self.batch_size):
                texts = [self._text(it) for it in items[i:i + self.batch_size]]
                # Right padding keeps each sequence's positions 0..n-1; the model pools
                # its last non-pad token.
                enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", truncation=True,
                                     max_length=self.max_length, add_special_tokens=False).to(device)
                rewards = self.model(**enc).logits[:, 0].float().tolist()
                for r in rewards:
                    if math.isfinite(r):
                        self._lo, self._hi = min(self._lo, r), max(self._hi, r)
                        out.append(Verdict(score=r, raw=(repr(r),), scores=(r,)))
                    else:
                        out.append(Verdict(score=None, raw=(repr(r),), scores=(None,)))
        finally:
            self.model.train(was_training)
        return out


class RewardModel(JudgeKind):
    name = "reward_model"
    Options = LocalModelOptions

    def scale(self, options, where):
        return UNBOUNDED

    def check(self, options, where):
        return model_problems(self.name, options, where)

    def preflight(self, options, where, checks):
        model_preflight(options, where, checks)

    def build(self, section, policy, seed_key):
        from harness.models import load_model, load_tokenizer  # torch

        o = section.options
        tokenizer = load_tokenizer(o.model, o.revision)
        model = load_model(o.model, revision=o.revision, kind="sequence_classification")
        judge = RewardModelJudge(model, tokenizer, batch_size=section.batch_size, name=f"{self.name}:{o.model}")
        return judge, {**model_ident(o), "max_length": judge.max_length}


JUDGES.register(RewardModel.name)(RewardModel())
