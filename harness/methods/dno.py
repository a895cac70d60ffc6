"""DNO, practical version (arXiv 2404.03715): large-margin pairs from a preference judge.

Per iteration: K samples per prompt from pi_t, plus a teacher answer when
configured; heavily repetitive samples are automatic negatives (lowest score,
not sent to the judge); the judge scores the rest side by side; a pair is kept
only when its positive is near the top of the scale and its negative at least
``margin`` below (``student_margin`` when the positive is a policy sample).
Each iteration takes its own part of the prompts (``prompts_per_iteration``, as
in the paper), and pairs of earlier iterations can be replayed (a seeded sample).
The final model is the best iterate on a validation metric, never on the reported
test numbers.

The judge's scale is known before candidates are built (``ctx.judge_scale``).
Bounded (an LLM judge's template, the oracle): scores are used as they are and an
automatic negative scores the bottom of the scale. Unbounded (a reward model):
rewards have no fixed top, so they are read relative to the iteration: "near the
top" means at or above the ``positive_min`` quantile of all of this iteration's
rewards, margins are in standard deviations of those rewards, and an automatic
negative scores -inf, below every real reward.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, replace

from harness.models.data import load_simple
from harness.engines.generate import Sampling
from harness.methods.base import (Candidate, CutAnswers, IterationContext, Method, PromptSplit, best_iterate,
                                  file_problems, length_stats, pair)
from harness.metrics import VALIDATION
from harness.config.registry import METHODS
from harness.config.schema import FieldError, opt


@dataclass(frozen=True)
class DnoOptions(CutAnswers, PromptSplit):
    num_samples: int = opt(5, "Samples per prompt (K).", min=1)
    temperature: float = opt(0.7, "Sampling temperature.", min=0.0)
    top_p: float = opt(0.95, "Nucleus sampling.", min=0.0, max=1.0)
    teacher: str = opt("", "File of teacher answers (id or prompt, response) added as a candidate per prompt; \"\" = none.")
    positive_min: float = opt(0.75, "A positive must score at least lo + positive_min * (hi - lo) on a bounded judge scale (the paper keeps positives near the top of its 6-point scale); on an unbounded one (reward model), at least the positive_min quantile of the iteration's rewards.", min=0.0, max=1.0)
    margin: float = opt(2.0, "Required score gap when the positive is the teacher's (the paper: 2 points on its 6-point scale); judge scale units, or standard deviations of the iteration's rewards on an unbounded scale.", min=0.0)
    student_margin: float = opt(1.0, "Required gap when the positive is a policy sample (the paper: 1 point).", min=0.0)
    repetition_n: int = opt(3, "n of the n-gram repetition detector (whitespace tokens, or characters for single-token answers).", min=1)
    repetition_max: float = opt(0.5, "Samples whose share of repeated n-grams exceeds this are automatic negatives.", min=0.0, max=1.0)
    replay: tuple[float, ...] = opt(factory=tuple, doc="Fractions of earlier iterations' pairs replayed: [from t-1, from t-2, ...] relative to this iteration's pair count (paper: up to 0.3, 0.15); which pairs is a sample seeded by (experiment seed, iteration, lag).", min=0.0, max=1.0)
    judging: str = opt("pointwise", 'How the judge scores a prompt\'s candidates (the K samples and the teacher): "group" = side by side, all in one prompt of the LLM judge\'s group template (the DNO paper\'s annotator compares them this way), one score per candidate, the whole group failing when the answer does not score each exactly once; "pointwise" = each candidate alone. Pointwise is the default: the oracle and reward-model judges score alone by nature (they have no group mode), and pointwise scores are absolute, comparable across prompts and iterations as positive_min and the margins assume, and the same as Self-Rewarding and validation judging give; choose "group" with an LLM judge (self, hf, openai) to follow the paper.', choices=("pointwise", "group"))
    select_metric: str = opt("", 'Validation metric that picks the final iterate, the best one (the paper: best iterate on validation data), e.g. "validation/judge/score_mean" or "validation/lm_eval/<task>/<metric>"; it must come from [eval.validation], never from the reported [eval] results. "" = the last iterate. The choice is written to final.json (with that iterate\'s test metrics) and marked metrics["selected"] = 1 in its results row.')


def repetition_rate(text: str, n: int) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same text (0 = none)."""
    toks = text.split()
    if len(toks) < 2 * n:       # short answers: look at characters instead
        toks = list(text.replace(" ", ""))
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


class Dno(Method):
    name = "dno"
    Options = DnoOptions
    needs_judge = True

    def check(self, cfg) -> list[FieldError]:
        errors = []
        if cfg.training.epochs > 1:
            errors.append(FieldError("training.epochs", (
                f"{cfg.training.epochs:g} epochs per iteration; DNO trains at most one epoch per iteration (its "
                "batched on-policy step: each iteration's pairs are sampled from the current policy and used once, "
                "methods.md); set epochs <= 1 and add iterations instead")))
        if cfg.options.num_samples + bool(cfg.options.teacher) < 2:  # a pair needs two candidates of a prompt
            errors.append(FieldError("method.dno.num_samples", (
                "1 sample and no teacher gives each prompt one candidate, so no pair can be built and every "
                "iteration would fail with no training pairs; sample at least 2, or give a teacher file")))
        n = len(cfg.options.replay)
        if n > cfg.method.iterations - 1:
            errors.append(FieldError("method.dno.replay", f"{n} fractions, but {cfg.method.iterations} iterations can "
                                                          f"replay from at most {cfg.method.iterations - 1} earlier ones"))
        if cfg.options.judging == "group" and not hasattr(cfg.judge.kind, "group"):  # LLM judges have one
            errors.append(FieldError("method.dno.judging", (
                f"\"group\" needs an LLM judge (self, hf or openai), but judge.name is {cfg.judge.name!r}, "
                "which scores each candidate alone; use \"pointwise\"")))
        metric = cfg.options.select_metric
        if metric and not metric.startswith(VALIDATION):
            errors.append(FieldError("method.dno.select_metric", (
                f"{metric!r} is a reported result; selecting on it would peek at the test numbers. Name a "
                "validation metric (\"validation/...\") and configure [eval.validation]")))
        elif metric and not cfg.eval.validation.enabled:
            errors.append(FieldError("method.dno.select_metric", (
                "selects on a validation metric, but [eval.validation] configures no evaluation "
                "(lm_eval_tasks, alpaca_eval.instructions or prompts)")))
        return errors

    def check_inputs(self, cfg, examples):
        o = cfg.options
        errors = o.budget("method.dno.prompts_per_iteration", len(examples), cfg.method.iterations)
        if o.teacher:
            errors += file_problems(o.teacher, "method.dno.teacher", ("response",))[1]
        return errors

    def max_pairs(self, cfg, n_examples):
        o = cfg.options
        return min(o.prompts_per_iteration or n_examples, n_examples)  # iteration 1 replays nothing

    def metric_refs(self, cfg):
        return [("method.dno.select_metric", cfg.options.select_metric)] if cfg.options.select_metric else []

    def prompts(self, ctx: IterationContext):
        """This iteration's part of the prompts, each carrying its teacher answer (or None)."""
        part = ctx.options.part(ctx.examples, ctx.iteration)
        teachers = self._teachers(ctx.cfg)
        return [replace(e, response=teachers.get(e.id) or teachers.get(e.instruction)) for e in part]

    def sampling(self, cfg) -> Sampling:
        o = cfg.options
        return Sampling(temperature=o.temperature, top_p=o.top_p, max_new_tokens=cfg.generation.max_new_tokens,
                        n=o.num_samples)

    def _teachers(self, cfg) -> dict[str, str]:
        if not cfg.options.teacher:
            return {}
        rows = load_simple(cfg.options.teacher, "method.dno.teacher")
        by_key = {e.id: e.response for e in rows}
        by_key.update({e.instruction: e.response for e in rows})
        return by_key

    def candidates(self, ctx, example, samples):
        o = ctx.options
        lo = ctx.scale()[0]   # -inf on an unbounded scale: below every real score
        out = [Candidate(s, fixed_score=lo if repetition_rate(s, o.repetition_n) > o.repetition_max else None)
               for s in samples]
        if example.response:
            out.append(Candidate(example.response, source="teacher"))
        return out

    def build_pairs(self, ctx, groups):
        """(best, worst) per prompt when the best is near the top and the gap is large.

        On a tie at the top, the positive is the tied candidate whose pair passes the margin
        (a policy sample needs only ``student_margin``), then one the cut options keep (a whole
        answer before a cut one under ``cut_chosen = "drop"``), the teacher when both pass: a
        pair that passes with one of the tied candidates is never dropped because the other
        was picked. The negative, likewise, is a kept one among equally low candidates."""
        o = ctx.options
        lo, hi = ctx.scale()
        bounded = math.isfinite(lo) and math.isfinite(hi)
        if bounded:
            threshold, unit, center = lo + o.positive_min * (hi - lo), 1.0, 0.0
        else:
            threshold, unit, center = _relative_scale([s for g in groups for s, c in zip(g.scores, g.candidates)
                                                       if s is not None and c.fixed_score is None], o.positive_min)
        pairs: list[dict] = []
        reasons: Counter = Counter()
        for g in groups:
            scored = [(s, c) for s, c in zip(g.scores, g.candidates) if s is not None]
            if len(scored) < 2:
                reasons["too_few_scores"] += 1
                continue
            top = max(s for s, _ in scored)
            worst = min(scored, key=lambda sc: (sc[0], not o.usable(sc[1], "rejected")))

            def need(c: Candidate) -> float:
                return (o.margin if c.source == "teacher" else o.student_margin) * unit

            tied = [sc for sc in scored if sc[0] == top]
            best = max(tied, key=lambda sc: (top - worst[0] >= need(sc[1]), o.usable(sc[1], "chosen"),
                                             sc[1].source == "teacher"))
            if top < threshold:
                reasons["positive_below_top"] += 1
            elif top - worst[0] < need(best[1]):
                reasons["margin_too_small"] += 1
            else:
                auto = worst[1].fixed_score is not None
                pairs.append(pair(g.example, best[1], worst[1], score_chosen=best[0],
                                  score_rejected=worst[0] if math.isfinite(worst[0]) else None,
                                  chosen_source=best[1].source, rejected_auto_negative=auto,
                                  iteration=ctx.iteration))
        pairs, dropped = o.keep_pairs(pairs)
        auto_neg = sum(c.fixed_score is not None for g in groups for c in g.candidates)
        stats = {"pairs/n_prompts": len(groups), "pairs/n_candidates": sum(len(g.candidates) for g in groups),
                 "pairs/auto_negatives": auto_neg, "pairs/n_pairs": len(pairs),
                 "pairs/teacher_positives": sum(p["chosen_source"] == "teacher" for p in pairs),
                 "pairs/auto_negative_rejected": sum(p["rejected_auto_negative"] for p in pairs),
                 "pairs/positive_threshold": threshold if math.isfinite(threshold) else None,
                 "pairs/margin_unit": unit, "pairs/score_center": center,
                 **dropped, **{f"pairs/dropped_{k}": v for k, v in sorted(reasons.items())}}
        return pairs, {**stats, **length_stats(pairs)}

    def training_set(self, ctx):
        own = ctx.pairs_of(ctx.iteration)
        return own + replayed(own, ctx.options.replay, ctx.iteration, ctx.pairs_of, ctx.cfg.experiment.seed)

    def select_final(self, cfg, rows):
        metric = cfg.options.select_metric
        return best_iterate(rows, metric) if metric else None


def _relative_scale(rewards: list[float], positive_min: float) -> tuple[float, float, float]:
    """(positive threshold, margin unit, mean) for an unbounded scale: the ``positive_min``
    quantile of this iteration's real rewards (nearest rank below), their standard
    deviation (1 when they do not vary) and their mean."""
    if not rewards:
        return math.inf, 1.0, 0.0
    ordered = sorted(rewards)
    mean = math.fsum(ordered) / len(ordered)
    sd = math.sqrt(math.fsum((r - mean) ** 2 for r in ordered) / len(ordered))
    return ordered[math.floor(positive_min * (len(ordered) - 1))], sd if sd > 0 else 1.0, mean


def replayed(own: list[dict], fractions, iteration: int, pairs_of, seed: int) -> list[dict]:
    """round(f_k * len(own)) pairs from iteration t-k (at most all of them): a sample
    without replacement seeded by (seed, t, k), kept in that iteration's file order."""
    out = []
    for k, frac in enumerate(fractions, start=1):
        if iteration - k < 1:
            break
        earlier = pairs_of(iteration - k)
        n = min(len(earlier), round(frac * len(own)))
        picked = sorted(random.Random(f"dno-replay:{seed}:{iteration}:{k}").sample(range(len(earlier)), n))
        out += [earlier[i] for i in picked]
    return out


METHODS.register("dno")(Dno())
