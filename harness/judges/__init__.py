"""Judges behind one protocol (``harness.judges.base.Judge``), built from a
``JudgeSection``, plus coverage accounting.

Kinds: "oracle" (the tiny world's rule-based judge), "self" (the policy as
LLM-as-a-judge), "hf" (a local causal LM as LLM-as-a-judge), "reward_model"
(a sequence-classification reward model), "openai" (an OpenAI-compatible
endpoint). Heavy modules are imported only when their kind is built.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

from harness import cost
from harness.config import JUDGES, JudgeSection
from harness.judges.base import Judge, JudgeItem, Verdict, compare, preference, score_group
from harness.judges.cache import CachedJudge, judge_identity
from harness.judges.oracle import OracleJudge, source_hash
from harness.sources import identity, locate
from harness.judges.parsing import JudgeTemplate, load_judge_template, load_template, parse_score

__all__ = ["Judge", "JudgeItem", "Verdict", "compare", "preference", "score_group", "build_judge",
           "judge_scale", "CachedJudge", "CoverageError", "coverage", "check_coverage", "parse_score",
           "load_template", "load_judge_template"]

ORACLE_SCALE = (1.0, 5.0)   # the tiny world's rule-based grades
UNBOUNDED = (-math.inf, math.inf)


def judge_scale(section: JudgeSection, where: str = "judge") -> tuple[float, float]:
    """(lowest, highest) score the configured judge can give, known without loading a
    model: the oracle's 1-5 grades, an LLM judge's template declaration, or
    (-inf, inf) for a reward model. Methods get it before candidates are built
    (``IterationContext.judge_scale``); the judge stage checks the built judge agrees."""
    if section.name == "oracle":
        return ORACLE_SCALE
    if section.name == "reward_model":
        return UNBOUNDED
    if section.name in ("self", "hf", "openai"):
        return load_judge_template(section.template, f"{where}.template").scale
    raise ValueError(f"{where}.name is {section.name!r}: no judge, so no score scale")


def _template(s: JudgeSection) -> tuple[JudgeTemplate, dict]:
    tpl = load_judge_template(s.template)
    ident = {"template": tpl.text, "scale": [tpl.lo, tpl.hi], "samples": s.samples, "temperature": s.temperature,
             "max_new_tokens": s.max_new_tokens}
    return tpl, ident


def _seed_ident(s: JudgeSection, seed_key: tuple) -> dict:
    # A greedy judge's answer does not depend on the seed: leave it out, so that a
    # fixed external judge's cache is reused across iterations.
    return {"seed": list(seed_key)} if s.temperature > 0 else {}


def _oracle(s, policy, seed_key):
    return OracleJudge(), {"oracle": f"{OracleJudge.__module__}.{OracleJudge.__qualname__}", "source": source_hash()}


def _self(s, policy, seed_key):
    if policy is None:
        raise ValueError("judge.name = 'self' judges with the policy: pass policy=(model, tokenizer) to build_judge")
    from harness.judges.llm import LLMJudge

    model, tokenizer = policy
    tpl, ident = _template(s)
    judge = LLMJudge(model, tokenizer, template=tpl.text, lo=tpl.lo, hi=tpl.hi, samples=s.samples,
                     temperature=s.temperature, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                     seed_key=seed_key, name="self")
    return judge, {**ident, **_seed_ident(s, seed_key)}


def _local_ident(s: JudgeSection) -> dict:
    return {"model": s.model, "revision": s.revision, "weights": identity(locate(s.model), s.revision)}


def _hf(s, policy, seed_key):
    from harness.judges.llm import LLMJudge
    from harness.models import load_model, load_tokenizer

    tpl, ident = _template(s)
    tokenizer = load_tokenizer(s.model, s.revision)
    model = load_model(s.model, revision=s.revision)
    judge = LLMJudge(model, tokenizer, template=tpl.text, lo=tpl.lo, hi=tpl.hi, samples=s.samples,
                     temperature=s.temperature, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                     seed_key=seed_key, name=f"hf:{s.model}")
    return judge, {**ident, **_seed_ident(s, seed_key), **_local_ident(s)}


def _reward_model(s, policy, seed_key):
    from harness.judges.reward_model import RewardModelJudge
    from harness.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(s.model, s.revision)
    model = load_model(s.model, revision=s.revision, kind="sequence_classification")
    judge = RewardModelJudge(model, tokenizer, batch_size=s.batch_size, name=f"reward_model:{s.model}")
    return judge, {**_local_ident(s), "max_length": judge.max_length}


def _openai(s, policy, seed_key):
    from harness.judges.http import OpenAIJudge

    tpl, ident = _template(s)
    judge = OpenAIJudge(s.base_url, s.model, template=tpl.text, lo=tpl.lo, hi=tpl.hi, api_key_env=s.api_key_env,
                        samples=s.samples, temperature=s.temperature, max_new_tokens=s.max_new_tokens,
                        timeout_s=s.timeout_s, max_retries=s.max_retries, concurrency=s.batch_size,
                        seed_key=seed_key, name=f"openai:{s.model}")
    return judge, {**ident, **_seed_ident(s, seed_key), "base_url": s.base_url, "model": s.model}


_BUILDERS: dict[str, Callable] = {"oracle": _oracle, "self": _self, "hf": _hf,
                                  "reward_model": _reward_model, "openai": _openai}


def build_judge(section: JudgeSection, *, policy=None, identity_extra: str = "",
                cache_path: Path | None = None, seed_key: tuple = ()) -> Judge:
    """The configured judge; wrapped in a ``CachedJudge`` when ``cache_path`` is given.

    ``policy``: (model, tokenizer) for the "self" judge. ``identity_extra``:
    what identifies the weights that the section does not (for "self": the
    adapter hash / iteration -- required when caching, else one iteration's
    scores could be served for another). ``seed_key``: prefix of every judge
    sampling seed, e.g. (experiment seed, iteration, "judge").
    """
    if section.name == "none":
        raise ValueError("judge.name is 'none', but this stage needs a judge; set judge.name to one of "
                         + ", ".join(n for n in JUDGES if n != "none"))
    builder = _BUILDERS.get(section.name)
    if builder is None:
        raise ValueError(f"judge.name: unknown judge {section.name!r}; known: {', '.join(_BUILDERS)}")
    if cache_path is not None and section.name == "self" and not identity_extra:
        raise ValueError("caching the 'self' judge needs identity_extra (the policy's adapter hash / iteration)")
    judge, ident = builder(section, policy, tuple(seed_key))
    judge = cost.count_judge(judge)  # answers obtained -> the stage's cost/judge_calls (cache hits excluded)
    if cache_path is None:
        return judge
    identity = judge_identity(kind=section.name, extra=identity_extra, **ident)
    return CachedJudge(judge, cache_path, identity, chunk_size=max(section.batch_size, 1) * 4)


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
    """CoverageError when nothing was judged or the valid share is below ``min_coverage``."""
    if n_total == 0:
        raise CoverageError(f"{what}: no items were judged (0 verdicts); nothing to compute coverage from")
    if n_scored / n_total < min_coverage:
        raise CoverageError(
            f"{what}: only {n_scored} of {n_total} items got a valid judgment "
            f"(coverage {n_scored / n_total:.3f} < min_coverage {min_coverage}); {n_total - n_scored} failed "
            "(unparsable answers or judge errors; see the raw outputs in the judge cache/log)")
