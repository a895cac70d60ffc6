"""SPIN (arXiv 2401.01335): the human SFT answer is chosen, the model's own answer rejected.

With the logistic loss this is DPO's sigmoid loss with beta = lambda; the hinge
loss is the code's other choice. The reference is the model of iteration t.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.engines.generate import Sampling
from harness.methods.base import Candidate, IterationContext, Method, length_stats, pair
from harness.config.registry import METHODS
from harness.config.schema import FieldError, opt


@dataclass(frozen=True)
class SpinOptions:
    temperature: float = opt(0.0, "Sampling temperature of the opponent's answers (SPIN's code: greedy).", min=0.0)
    top_p: float = opt(1.0, "Nucleus sampling for the opponent's answers.", min=0.0, max=1.0)
    data_mix: str = opt("newest_plus_previous", "Which synthetic data an iteration trains on: the newest only, the newest plus the previous iteration's (the paper), or all so far.", choices=("newest", "newest_plus_previous", "all"))
    drop_identical: bool = opt(True, "Drop pairs whose model answer equals the human answer (they carry no gradient).")


class Spin(Method):
    name = "spin"
    Options = SpinOptions
    needs_judge = False
    turns = "first"  # SPIN's code: a conversation's first user turn and its answer

    def check(self, cfg) -> list[FieldError]:
        if cfg.judge.name != "none":
            return [FieldError("judge.name", "SPIN uses no judge (the human answer is always chosen); set \"none\"")]
        return []

    def check_inputs(self, cfg, examples):
        missing = [e.id for e in examples if not e.response]
        if missing:
            return [FieldError("data.response_field", (
                f"SPIN needs a human answer for every prompt; {len(missing)} of {len(examples)} rows of "
                f"{cfg.data.train} have none in column {cfg.data.response_field!r} (e.g. id {missing[0]!r}; "
                f"columns: {', '.join(sorted(examples[0].meta) + [cfg.data.prompt_field])})"))]
        return []

    def max_pairs(self, cfg, n_examples):
        return n_examples

    def prompts(self, ctx: IterationContext):
        missing = [e.id for e in ctx.examples if not e.response]
        if missing:
            raise ValueError(f"data.train: SPIN needs a human answer for every prompt; {len(missing)} have none "
                             f"(e.g. id {missing[0]!r}; check data.response_field)")
        return ctx.examples

    def sampling(self, cfg) -> Sampling:
        o = cfg.options
        return Sampling(temperature=o.temperature, top_p=o.top_p, max_new_tokens=cfg.generation.max_new_tokens, n=1)

    def candidates(self, ctx, example, samples):
        return [Candidate(samples[0])]

    def build_pairs(self, ctx, groups):
        pairs, identical = [], 0
        for g in groups:
            synthetic = g.candidates[0].text
            if ctx.options.drop_identical and synthetic.strip() == g.example.response.strip():
                identical += 1
                continue
            # the opponent's answer may be cut at max_new_tokens: kept, as SPIN's code keeps it,
            # and trained without an end-of-turn (its Candidate records the cut)
            pairs.append(pair(g.example, g.example.response, g.candidates[0], iteration=ctx.iteration))
        stats = {"pairs/n_prompts": len(groups), "pairs/n_pairs": len(pairs), "pairs/identical_dropped": identical}
        return pairs, {**stats, **length_stats(pairs)}

    def training_set(self, ctx):
        t = ctx.iteration
        first = {"newest": t, "newest_plus_previous": max(1, t - 1), "all": 1}[ctx.options.data_mix]
        return [p for k in range(first, t + 1) for p in ctx.pairs_of(k)]


METHODS.register("spin")(Spin())
