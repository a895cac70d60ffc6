"""Self-Rewarding LMs (arXiv 2401.10020): the model judges its own samples, then DPO.

Per iteration: optionally new prompts generated few-shot (self-instruction, a
stage of its own, by the policy or a fixed model as in the paper), N samples per
prompt, judged by the configured judge (the policy itself with the additive
rubric by default, scores 0-5, J samples averaged), pair = (highest, lowest
average score), ties dropped. An optional M1 stage first does SFT on instruction
data (IFT) plus judge-training data (EFT), with its own settings
(``[method.self_rewarding.sft]``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace

from harness.config.experiment import SftSection
from harness.models.data import Example, load_simple, with_system
from harness.engines.generate import Prompt, Sampling
from harness.judges.parsing import load_judge_template
from harness.methods.base import (Candidate, CutAnswers, IterationContext, Method, PromptSplit, SelfInstruct,
                                  file_problems, length_stats, pair)
from harness.config.registry import METHODS
from harness.config.schema import FieldError, opt
from harness.models.sources import SourceError, locate


@dataclass(frozen=True)
class SelfRewardingOptions(CutAnswers, PromptSplit):
    num_samples: int = opt(4, "Candidates sampled per prompt.", min=2)
    temperature: float = opt(0.7, "Candidate sampling temperature.", min=0.0)
    top_p: float = opt(0.9, "Candidate nucleus sampling.", min=0.0, max=1.0)
    ift: str = opt("", "Seed instruction-following data (prompt, response) for the M1 SFT stage; \"\" = none.")
    eft: str = opt("", "Judge-training data (judge prompt, answer ending in \"Score: N\") for the M1 SFT stage.")
    sft: SftSection = opt(factory=SftSection, doc="Settings of the M1 SFT stage (its own learning rate, epochs, batch size, ...; not [training]'s DPO settings). The values used are recorded in the init_sft stage's outputs.")
    prompts: str = opt("", "Prompt file for the iterations; \"\" = data.train.")
    self_instruct: int = opt(0, "Generate this many new prompts per iteration few-shot from the seed prompts (0 = off); a resumable stage of its own before generation.", min=0)
    self_instruct_model: str = opt("", 'Model that writes the new prompts: "" = the current policy (the harness\'s default: no second model), or a fixed model reference as model.base ("smollm2-135m-instruct", "tiny", a local directory, a hub id), as in the paper, which generated prompts with a fixed Llama-2-Chat 70B.')
    self_instruct_revision: str = opt("main", "Hub revision of self_instruct_model.")
    self_instruct_shots: int = opt(4, "Seed prompts shown per self-instruction request.", min=1)
    self_instruct_max_chars: int = opt(400, "Drop generated prompts longer than this.", min=1)
    self_instruct_min_chars: int = opt(8, "Drop generated prompts shorter than this.", min=1)


class SelfRewarding(Method):
    name = "self_rewarding"
    Options = SelfRewardingOptions
    needs_judge = True

    def check(self, cfg) -> list[FieldError]:
        errors = []
        if cfg.judge.needs_policy and cfg.judge.options.samples == 1:
            errors.append(FieldError(f"judge.{cfg.judge.name}.samples", "Self-Rewarding averages several judgments (the paper: 3); set samples >= 2 or use an external judge"))
        sft = cfg.options.sft
        if sft.prompt_limit >= sft.max_length:
            errors.append(FieldError("method.self_rewarding.sft.max_prompt_length", f"{sft.prompt_limit} leaves no room "
                                     f"for an answer within max_length {sft.max_length}; set it below"))
        o = cfg.options
        if o.self_instruct and o.self_instruct_min_chars > o.self_instruct_max_chars:  # every new prompt dropped
            errors.append(FieldError("method.self_rewarding.self_instruct_min_chars", (
                f"{o.self_instruct_min_chars} is above self_instruct_max_chars {o.self_instruct_max_chars}: every "
                "generated prompt would be dropped")))
        return errors

    def check_inputs(self, cfg, examples):
        o = cfg.options
        errors: list[FieldError] = []
        pool = examples
        if o.prompts:
            pool, errs = file_problems(o.prompts, "method.self_rewarding.prompts", ("prompt",))
            errors += errs
        if pool or not o.prompts:
            errors += o.budget("method.self_rewarding.prompts_per_iteration", len(pool), cfg.method.iterations)
        for ref, where in ((o.ift, "method.self_rewarding.ift"), (o.eft, "method.self_rewarding.eft")):
            if ref:
                rows, errs = file_problems(ref, where, ("prompt", "response"))
                errors += errs
                if where.endswith("eft") and rows:
                    errors += _eft_template_problems(rows, cfg.judge)
        if o.self_instruct and o.self_instruct_model:
            try:
                locate(o.self_instruct_model)
            except SourceError as e:
                errors.append(FieldError("method.self_rewarding.self_instruct_model", str(e)))
        return errors

    def max_pairs(self, cfg, n_examples):
        o = cfg.options
        return (o.prompts_per_iteration or n_examples) + o.self_instruct

    def init_sft_settings(self, cfg):
        o = cfg.options
        return o.sft if o.ift or o.eft else None

    def init_sft_data(self, cfg):
        o = cfg.options
        data = []
        # IFT examples train M1 in the context it samples in (after data.system_prompt, as every
        # generation prompt); EFT examples are judge prompts, which the judge sends without it
        for ref, where, system in ((o.ift, "method.self_rewarding.ift", cfg.data.system_prompt),
                                   (o.eft, "method.self_rewarding.eft", "")):
            if ref:
                data += [{"id": e.id, "messages": list(with_system(system, e.messages)), "response": e.response}
                         for e in load_simple(ref, where)]
        return data or None

    def _pool(self, ctx: IterationContext) -> list[Example]:
        o = ctx.options
        if not o.prompts:
            return ctx.examples  # data.train, already after data.system_prompt
        system = ctx.cfg.data.system_prompt
        return [replace(e, messages=with_system(system, e.messages))
                for e in load_simple(o.prompts, "method.self_rewarding.prompts")]

    def prompts(self, ctx: IterationContext) -> list[Example]:
        return ctx.options.part(self._pool(ctx), ctx.iteration)

    def self_instruct(self, ctx: IterationContext) -> SelfInstruct | None:
        """Few-shot requests for new prompts from the seed prompts (each iteration shows other
        shots); the selection keeps each output's first line, de-duplicated against the
        seeds and each other, and length-filtered."""
        o = ctx.options
        if not o.self_instruct:
            return None
        seeds = self._pool(ctx)
        requests = []
        for i in range(o.self_instruct):
            start = ((ctx.iteration - 1) * o.self_instruct + i) * o.self_instruct_shots
            shots = [seeds[(start + j) % len(seeds)].instruction for j in range(o.self_instruct_shots)]
            text = "Write one new task like these examples.\n" + "\n".join(f"Task: {s}" for s in shots) + "\nTask:"
            requests.append(Prompt(f"si-{ctx.iteration}-{i}", ({"role": "user", "content": text},)))

        system = ctx.cfg.data.system_prompt  # new prompts are sampled in the same context as the others

        def select(out: dict) -> list[Example]:
            known = {e.instruction.strip() for e in seeds}
            new = []
            for req in requests:  # request order: the same selection whatever order outputs come in
                text = out[req.id]["samples"][0]["text"].strip().split("\n")[0].strip()
                if o.self_instruct_min_chars <= len(text) <= o.self_instruct_max_chars and text not in known:
                    known.add(text)
                    new.append(Example(req.id, with_system(system, ({"role": "user", "content": text},))))
            return new

        return SelfInstruct(requests, Sampling(temperature=0.8, top_p=0.95, max_new_tokens=128), select,
                            model=o.self_instruct_model, revision=o.self_instruct_revision)

    def sampling(self, cfg) -> Sampling:
        o = cfg.options
        return Sampling(temperature=o.temperature, top_p=o.top_p, max_new_tokens=cfg.generation.max_new_tokens,
                        n=o.num_samples)

    def candidates(self, ctx, example, samples):
        return [Candidate(s) for s in samples]

    def build_pairs(self, ctx, groups):
        pairs, ties, unscored = [], 0, 0
        hist: Counter = Counter()
        for g in groups:
            scored = [(s, c) for s, c in zip(g.scores, g.candidates) if s is not None]
            hist.update(round(s) for s, _ in scored)
            if len(scored) < 2:
                unscored += 1
                continue
            # first of equals (deterministic), a candidate the cut options keep before one they drop
            o = ctx.options
            hi = max(scored, key=lambda sc: (sc[0], o.usable(sc[1], "chosen")))
            lo = min(scored, key=lambda sc: (sc[0], not o.usable(sc[1], "rejected")))
            if hi[0] == lo[0]:
                ties += 1
                continue
            pairs.append(pair(g.example, hi[1], lo[1], score_chosen=hi[0], score_rejected=lo[0],
                              iteration=ctx.iteration))
        pairs, dropped = ctx.options.keep_pairs(pairs)
        stats = {"pairs/n_prompts": len(groups), "pairs/n_candidates": sum(len(g.candidates) for g in groups),
                 "pairs/ties_dropped": ties, "pairs/too_few_scores": unscored, "pairs/n_pairs": len(pairs),
                 **dropped, **{f"pairs/score_hist_{k}": hist[k] for k in sorted(hist)}}  # flat: one number per score
        return pairs, {**stats, **length_stats(pairs)}

    def training_set(self, ctx):
        return ctx.pairs_of(ctx.iteration)


METHODS.register("self_rewarding")(SelfRewarding())


def _eft_template_problems(rows: list[Example], judge) -> list[FieldError]:
    """EFT examples teach M1 to judge: their prompts must be the judge's template filled in, or
    M1 learns a prompt format the self-judge never sends. The template's fixed text (around the
    {instruction} and {response} placeholders) must appear, in order, in every EFT prompt."""
    template = getattr(judge.options, "template", None)
    if judge.name == "none" or template is None:
        return []
    try:
        text = load_judge_template(template, f"judge.{judge.name}.template").text
    except ValueError:
        return []  # the judge's own checks report an unreadable template
    parts = [p.strip() for p in re.split(r"\{instruction\}|\{response\}", text) if p.strip()]
    for n, e in enumerate(rows):
        pos = 0
        for part in parts:
            pos = e.instruction.find(part, pos)
            if pos < 0:
                return [FieldError("method.self_rewarding.eft", (
                    f"row {n} ({e.id}) is not a prompt of the judge's template (judge.{judge.name}.template = "
                    f"{template or 'the built-in default'!r}): its text lacks {part[:60]!r}; M1 would learn to "
                    "judge prompts the self-judge never sends. Build the EFT prompts with the same template"))]
            pos += len(part)
    return []
