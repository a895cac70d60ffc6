"""The judge kind "hf": a local (or hub) causal LM as LLM-as-a-judge, a fixed model
apart from the policy. Options: the model and the options every LLM judge has. Not the
judging code (``harness.judges.llm.LLMJudge``)."""

from __future__ import annotations

from dataclasses import dataclass

from harness.judges.kind import (LLMKind, LLMOptions, LocalModelOptions, load_dtype, model_ident, model_preflight,
                                 model_problems)
from harness.config.registry import JUDGES


@dataclass(frozen=True)
class HfOptions(LLMOptions, LocalModelOptions):
    """[judge.hf]: the judge model first, then the options every LLM judge has."""


class HfJudge(LLMKind):
    name = "hf"
    Options = HfOptions
    generates = True
    loads_model = True

    def check(self, options, where):
        return model_problems(self.name, options, where) + super().check(options, where)

    def preflight(self, options, where, checks):
        model_preflight(options, where, checks)
        super().preflight(options, where, checks)

    def build(self, section, policy, seed_key, dtype="float32"):
        from harness.models.load import load_model, load_tokenizer  # torch

        o = section.options
        self.template(o)  # a bad template fails before a model loads
        tokenizer = load_tokenizer(o.model, o.revision)
        model = load_model(o.model, revision=o.revision, dtype=load_dtype(o, dtype))
        judge, ident = self.local_judge(model, tokenizer, section, seed_key, name=f"{self.name}:{o.model}")
        return judge, {**ident, **model_ident(o, load_dtype(o, dtype))}


JUDGES.register(HfJudge.name)(HfJudge())
