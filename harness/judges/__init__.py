"""Judges behind one protocol (``harness.judges.base.Judge``), built from a
``harness.config.experiment.JudgeSection``, plus coverage accounting and the policy set aside
while a judge that loads a model judges (``policy_aside``).

Each kind is a module of this package that registers a ``kind.JudgeKind`` in
``harness.config.registry.JUDGES`` (importing this package registers them all): "oracle"
(the tiny world's rule-based judge), "self" (the policy as LLM-as-a-judge), "hf" (a
local causal LM as LLM-as-a-judge), "reward_model" (a sequence-classification reward
model), "openai" (an OpenAI-compatible endpoint). A new kind is one module plus its
import below. Heavy modules are imported only when their kind is built. Also here:
``judging``, a stage's judging that heals (a per-prompt JSONL log that holds only real
judgments), and the helpers the kinds share (``base``, ``cache``, ``parsing``, ``http``).
Not here: the judge's config section (``harness.config.judge_section``), the evaluations
that use a judge (``harness.evaluate``).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator, Sequence

from harness.models.load import off_gpu, release_memory
from harness.store import cost
from harness.config.experiment import JudgeSection
from harness.judges import hf, openai, oracle, reward_model, self  # noqa: F401  (each registers its kind)
from harness.judges.base import Judge, JudgeItem, Verdict, compare, preference, score_group, score_groups
from harness.judges.cache import CachedJudge, judge_identity
from harness.judges.kind import JudgeKind
from harness.judges.parsing import load_judge_template, load_template, parse_score
from harness.config.registry import JUDGES

__all__ = ["JUDGES", "Judge", "JudgeItem", "JudgeKind", "Verdict", "compare", "preference", "score_group", "score_groups",
           "build_judge", "judge_scale", "policy_aside", "CachedJudge", "CoverageError", "coverage", "check_coverage",
           "parse_score", "load_template", "load_judge_template"]


def _kind(section: JudgeSection, where: str) -> JudgeKind:
    if section.name == "none":
        raise ValueError(f"{where}.name is 'none', but this stage needs a judge; set {where}.name to one of "
                         + ", ".join(JUDGES.names()))
    return JUDGES.get(section.name)


def judge_scale(section: JudgeSection, where: str = "judge") -> tuple[float, float]:
    """(lowest, highest) score the configured judge can give, known without loading a
    model: the oracle's 1-5 grades, an LLM judge's template declaration, or
    (-inf, inf) for a reward model. Methods get it before candidates are built
    (``IterationContext.judge_scale``); the judge stage checks the built judge agrees."""
    if section.name == "none":
        raise ValueError(f"{where}.name is 'none': no judge, so no score scale")
    return _kind(section, where).scale(section.options, f"{where}.{section.name}")


def build_judge(section: JudgeSection, *, policy=None, identity_extra: str = "",
                cache_path: Path | None = None, seed_key: tuple = (), engine=None, dtype: str = "float32") -> Judge:
    """The configured judge; wrapped in a ``CachedJudge`` when ``cache_path`` is given.

    ``policy``: (model, tokenizer) for a kind that ``needs_policy`` ("self").
    ``identity_extra``: what identifies the weights that the section does not (for
    the policy: the adapter hash / iteration -- required when caching, else one
    iteration's scores could be served for another). ``seed_key``: prefix of every
    judge sampling seed, e.g. (experiment seed, iteration, "judge"). ``engine``: the stage's
    ``harness.engines.Engine``; a judge that generates with a model on this machine ("self",
    "hf") writes its answers with it (and a judge cache then tells the engines apart).
    ``dtype``: the run's model.dtype, which a kind that ``loads_model`` loads its model in unless
    its own section sets ``dtype``.
    """
    kind = _kind(section, "judge")
    if kind.needs_policy and policy is None:
        raise ValueError(f"judge.name = {kind.name!r} judges with the policy: pass policy=(model, tokenizer) "
                         "to build_judge")
    if cache_path is not None and kind.needs_policy and not identity_extra:
        raise ValueError(f"caching the {kind.name!r} judge needs identity_extra (the policy's adapter hash / iteration)")
    judge, ident = (kind.build(section, policy, tuple(seed_key), dtype=dtype) if kind.loads_model
                    else kind.build(section, policy, tuple(seed_key)))
    if engine is not None and hasattr(judge, "generate_fn"):
        judge.generate_fn = engine.generate
        if engine.name != "hf":
            ident = {**ident, "engine": engine.name}
    judge = cost.count_judge(judge)  # answers obtained -> the stage's cost/judge_calls (cache hits excluded)
    _count_groups(judge)
    if cache_path is None:
        return judge
    identity = judge_identity(kind=section.name, extra=identity_extra, **ident)
    return CachedJudge(judge, cache_path, identity, chunk_size=max(section.batch_size, 1) * 4)


def _count_groups(judge) -> None:
    """A judge's ``score_groups`` counting its answers (one per group and sample) into the
    stage's cost/judge_calls, as ``cost.count_judge`` does for ``score``."""
    inner = getattr(judge, "score_groups", None)
    if inner is None:
        return

    def counted(groups):
        out = inner(groups)
        cost.add(judge_calls=sum(max(1, len(vs[0].raw or ())) for vs in out if vs))
        return out

    judge.score_groups = counted


@contextlib.contextmanager
def policy_aside(model, section: JudgeSection) -> Iterator[None]:
    """The block in which a judge of ``section`` is built, judges and is dropped, after the
    policy ``model`` generated its answers. When the kind ``loads_model`` ("hf",
    "reward_model"), the judge never sits beside the policy on the accelerator: a CUDA policy
    is on the CPU for the block (``off_gpu``; nothing moves elsewhere), and the judge, whose
    last reference the block must drop, is freed (``release_memory``: its reference cycles
    collected, torch's cache emptied) before the policy returns to its device. Any other kind
    (an endpoint, the oracle, "self", which is the policy): nothing is done. On an error the
    policy returns as well; a judge held by the error's traceback is freed with it."""
    if not section.loads_model:
        yield
        return
    with off_gpu(model):
        try:
            yield
        finally:
            release_memory()


# ---- coverage ---------------------------------------------------------------

class CoverageError(RuntimeError):
    """Too few items got a valid judgment; the stage must not be marked done."""


def _valid(v: Verdict) -> bool:
    return v.score is not None and math.isfinite(v.score)


def coverage(verdicts: Sequence[Verdict]) -> dict:
    """{n_total, n_scored, n_failed, coverage}; coverage is None when there is nothing.
    A NaN/inf score counts as a failure."""
    n_total = len(verdicts)
    n_scored = sum(_valid(v) for v in verdicts)
    return {"n_total": n_total, "n_scored": n_scored, "n_failed": n_total - n_scored,
            "coverage": n_scored / n_total if n_total else None}


def check_coverage(verdicts: Sequence[Verdict], min_coverage: float, what: str) -> dict:
    """``coverage(verdicts)``, or CoverageError when below ``min_coverage`` (or empty)."""
    c = coverage(verdicts)
    require_coverage(c["n_scored"], c["n_total"], min_coverage, what)
    return c


def require_coverage(n_scored: int, n_total: int, min_coverage: float, what: str) -> None:
    """CoverageError when nothing was judged or the valid share is below ``min_coverage``.
    Every caller judges through ``harness.judges.judging.judge_groups``, which never reuses a failed
    judgment: the message says that a rerun asks the judge again for exactly the failed items."""
    if n_total == 0:
        raise CoverageError(f"{what}: no items were judged (0 verdicts); nothing to compute coverage from")
    if n_scored / n_total < min_coverage:
        n_failed = n_total - n_scored
        raise CoverageError(
            f"{what}: only {n_scored} of {n_total} items got a valid judgment "
            f"(coverage {n_scored / n_total:.3f} < min_coverage {min_coverage}); {n_failed} failed "
            "(unparsable, over-long or impossible answers; their raw answers are in the judgments log). "
            f"Fix the judge, then rerun the same command: it asks the judge again for exactly these {n_failed} "
            "items and keeps every valid judgment")
