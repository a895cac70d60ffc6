"""A reward model as a pointwise judge, and its kind "reward_model" (options: the model,
its output field; unbounded scores).

The reward is read from the model's output: by default its ``logits`` (a sequence-classification
head with one label, ``num_labels = 1``); a model with its own head names the output field that
holds the reward with ``score_field`` (ArmoRM's ``score``), one number per sequence. A model that
cannot be scored that way (several labels and no field, or a field its output lacks) is a
one-line error naming its ``num_labels``: at validate time when its config.json says so (a
local directory), else when the judge is built or first scores.

The (instruction, response) pair is rendered as a full two-turn chat with the
reward model's OWN chat template, without a generation prompt: that is the text
reward models are trained to score (``harness.engines.generate.render`` renders a
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

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from harness.judges.base import JudgeItem, Verdict
from harness.judges.kind import JudgeKind, LocalModelOptions, load_dtype, model_ident, model_preflight, model_problems
from harness.config.registry import JUDGES
from harness.config.schema import FieldError, opt
from harness.models.sources import SourceError, locate

UNBOUNDED = (-math.inf, math.inf)


class RewardModelError(ValueError):
    """A reward model whose output holds no one-number-per-sequence reward where the judge reads it."""


def _no_reward(n_labels, why: str) -> RewardModelError:
    return RewardModelError(f"reward model with num_labels={n_labels}: {why}; set score_field to the output field "
                            "that holds one reward per sequence (e.g. ArmoRM's \"score\")")


class RewardModelJudge:
    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int = 4096,
                 name: str = "reward_model", score_field: str = ""):
        n_labels = getattr(model.config, "num_labels", None)
        if not score_field and n_labels != 1:
            raise _no_reward(n_labels, "its logits are not one scalar reward")
        self.score_field = score_field
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
                rewards = self._rewards(self.model(input_ids=ids.to(device), attention_mask=mask.to(device)))
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


    def _rewards(self, output):
        """One reward per sequence from the model's ``output``: its ``score_field`` (shape (batch,) or
        (batch, 1)), else its logits' only column. RewardModelError when the field is missing or
        holds more than one number per sequence."""
        n_labels = getattr(self.model.config, "num_labels", None)
        if not self.score_field:
            return output.logits[:, 0]
        fields = list(output.keys()) if hasattr(output, "keys") else []
        value = output.get(self.score_field) if hasattr(output, "get") else getattr(output, self.score_field, None)
        if value is None:
            raise _no_reward(n_labels, f"its output has no field {self.score_field!r} "
                                       f"(fields: {', '.join(fields) or 'none'})")
        if value.dim() == 2 and value.shape[1] == 1:
            value = value[:, 0]
        if value.dim() != 1:
            raise _no_reward(n_labels, f"its output field {self.score_field!r} has shape {tuple(value.shape)}, "
                                       "not one number per sequence")
        return value


@dataclass(frozen=True)
class RewardModelOptions(LocalModelOptions):
    score_field: str = opt("", 'Output field of the model that holds the reward, one number per sequence (ArmoRM: "score"); "" = the logits of a sequence-classification head with num_labels = 1.')
    trust_remote_code: bool = opt(False, "Run the model's own code (its config.json's auto_map), as models with their own reward head need (ArmoRM).")


def num_labels(config: dict) -> int:
    """The num_labels a model's config.json gives (transformers' rule: its id2label's size, else
    ``num_labels``, else 2)."""
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


class RewardModel(JudgeKind):
    name = "reward_model"
    Options = RewardModelOptions
    loads_model = True

    def scale(self, options, where):
        return UNBOUNDED

    def check(self, options, where):
        return model_problems(self.name, options, where)

    def preflight(self, options, where, checks):
        """The model resolves; a local model scored by its logits has num_labels = 1."""
        model_preflight(options, where, checks)
        if options.score_field or not options.model:
            return
        try:
            src = locate(options.model)
        except SourceError:
            return  # reported by model_preflight
        if src.kind != "local":
            return  # a hub model's config is read when the judge is built
        try:
            n = num_labels(json.loads((Path(src.path) / "config.json").read_text()))
        except (OSError, ValueError, TypeError):
            return  # an unreadable config fails where the model loads, with transformers' message
        if n != 1:
            checks.errors.append(FieldError(f"{where}.score_field", str(_no_reward(n, "its logits are not one "
                                                                                      "scalar reward"))))

    def build(self, section, policy, seed_key, dtype="float32"):
        from harness.models.load import load_model, load_tokenizer  # torch

        o = section.options
        tokenizer = load_tokenizer(o.model, o.revision, trust_remote_code=o.trust_remote_code)
        model = load_model(o.model, revision=o.revision, dtype=load_dtype(o, dtype), kind="sequence_classification",
                           trust_remote_code=o.trust_remote_code)
        judge = RewardModelJudge(model, tokenizer, batch_size=section.batch_size, name=f"{self.name}:{o.model}",
                                 score_field=o.score_field)
        # "pooling": rewards are read at each text's last real token (its own padding); earlier
        # caches of a model whose pad was its eos read another token. "score_field" only when
        # set: the cache keys of logits-scored judges stay the ones they were
        return judge, {**model_ident(o, load_dtype(o, dtype)), "max_length": judge.max_length,
                       "pooling": "last_real_token", **({"score_field": o.score_field} if o.score_field else {})}


JUDGES.register(RewardModel.name)(RewardModel())
