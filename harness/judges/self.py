"""The judge kind "self": the policy being trained judges its own candidates
(LLM-as-a-judge, Self-Rewarding), with the options every LLM judge has. Not the
judging code (``harness.judges.llm.LLMJudge``); the loop hands it the policy."""

from __future__ import annotations

from harness.judges.kind import LLMKind
from harness.config.registry import JUDGES


class SelfJudge(LLMKind):
    name = "self"
    needs_policy = True
    generates = True

    def build(self, section, policy, seed_key):
        model, tokenizer = policy
        return self.local_judge(model, tokenizer, section, seed_key, name=self.name)


JUDGES.register(SelfJudge.name)(SelfJudge())
