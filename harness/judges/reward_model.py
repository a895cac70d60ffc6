"""A sequence-classification reward model (one logit) as a pointwise judge, and its kind
"reward_model" (options: the model; unbounded scores).

The (instruction, response) pair is rendered as a full two-turn chat with the
reward model's OWN chat template, without a generation prompt: that is the text
reward models are trained to score (``harness.generate.render`` renders a
prompt awaiting an answer, which is the wrong shape here).

Pooling: a sequence-classification model reads the logit at the last token that is
not its pad id. When the tokenizer pads with eos (pad = eos, common for causal LMs),
that skips the text's own final eos token(s), so the reward would come from another
token than the one the text ends with. The judge therefore pads every batch itself
(right padding) with an id that occurs in none of the batch's real tokens and tells
the model that id is the pad: each reward is read at the sequence's last real token,
the same token an unpadded sequence alone is read at, whatever the tokenizer's pad,
padding side or missing pad token.

Scores are unbounded, so ``scale`` is (-inf, inf); ``observed`` gives the range
seen so far. A non-finite reward is a failure (score None), never a number.
Not an LLM judge: no template, no samples.
"""

from __future__ import annotations

import math
from typing import Sequence

from harness.judges.base import JudgeItem, Verdict
from harness.judges.kind import (JudgeKind, LocalModelOptions, load_dtype, model_ident, model_preflight,
                                 model_problems)
from harness.registry import JUDGES

UNBOUNDED = (-math.inf, math.inf)


class RewardModelJudge:
    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int = 4096,
                 name: str = "reward_model"):
        n_labels = getattr(model.config, "num_labels", None)
        if n_labels != 1:
            raise ValueError(f"reward model must have num_labels=1 (one scalar reward), got {n_labels}")
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

    def _batch(self, texts: list[str]):
        """(input_ids, attention_mask, pad id) of ``texts``, right-padded with an id none of
        their real tokens has (see the module doc)."""
        import torch

        seqs = self.tokenizer(texts, truncation=True, max_length=self.max_length,
                              add_special_tokens=False)["input_ids"]
        used = {t for seq in seqs for t in seq}
        n_ids = self.model.get_input_embeddings().num_embeddings
        pad = next(i for i in range(n_ids - 1, -1, -1) if i not in used)
        width = max(len(seq) for seq in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        return ids, mask, pad

    def _score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        out: list[Verdict] = []
        device = next(self.model.parameters()).device
        was_training = self.model.training
        config = self.model.config.get_text_config()
        model_pad = config.pad_token_id
        self.model.eval()
        try:
            for i in range(0, len(items), self.batch_size):
                ids, mask, config.pad_token_id = self._batch([self._text(it) for it in items[i:i + self.batch_size]])
                rewards = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0]
                for r in rewards.float().tolist():
                    if math.isfinite(r):
                        self._lo, self._hi = min(self._lo, r), max(self._hi, r)
                        out.append(Verdict(score=r, raw=(repr(r),), scores=(r,)))
                    else:
                        out.append(Verdict(score=None, raw=(repr(r),), scores=(None,)))
        finally:
            config.pad_token_id = model_pad
            self.model.train(was_training)
        return out


class RewardModel(JudgeKind):
    name = "reward_model"
    Options = LocalModelOptions
    loads_model = True

    def scale(self, options, where):
        return UNBOUNDED

    def check(self, options, where):
        return model_problems(self.name, options, where)

    def preflight(self, options, where, checks):
        model_preflight(options, where, checks)

    def build(self, section, policy, seed_key, dtype="float32"):
        from harness.models import load_model, load_tokenizer  # torch

        o = section.options
        tokenizer = load_tokenizer(o.model, o.revision)
        model = load_model(o.model, revision=o.revision, dtype=load_dtype(o, dtype), kind="sequence_classification")
        judge = RewardModelJudge(model, tokenizer, batch_size=section.batch_size, name=f"{self.name}:{o.model}")
        # "pooling": rewards are read at each text's last real token (its own padding); earlier
        # caches of a model whose pad was its eos read another token
        return judge, {**model_ident(o, load_dtype(o, dtype)), "max_length": judge.max_length,
                       "pooling": "last_real_token"}


JUDGES.register(RewardModel.name)(RewardModel())
