"""The one Judge interface shared by every judge: the policy itself, a local HF
LLM judge, a reward model, an OpenAI-compatible endpoint, the tiny world's oracle.

A judge gives pointwise scores; side-by-side scoring of a prompt's candidates and
pairwise preferences are derived from them unless a judge overrides them. A judge
that scores a prompt's candidates in one prompt (an LLM judge with a group template)
has ``score_groups(groups) -> one list of verdicts per group``.
A verdict whose ``score`` is None is a *failure* (unparseable answer, exhausted
retries): it is counted, never guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence


@dataclass(frozen=True)
class JudgeItem:
    """One response to judge. ``meta`` carries what rule-based judges need
    (e.g. the tiny world's task and answer); model judges ignore it."""
    prompt_id: str
    instruction: str
    response: str
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    score: float | None          # None = no valid judgment
    raw: tuple[str, ...] = ()    # the judge's raw outputs (one per sample), for audit
    scores: tuple[float | None, ...] = ()  # per-sample parsed scores before averaging
    truncated: tuple[bool, ...] = ()       # per sample: cut at the judge's token limit (no EOS); () = unknown

    @property
    def ok(self) -> bool:
        return self.score is not None


class Judge(Protocol):
    name: str
    scale: tuple[float, float]   # (lowest, highest) possible score

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """One verdict per item, in order."""
        ...


def possible(score: float | None, scale: Sequence[float]) -> bool:
    """Whether ``score`` is a judgment a judge on ``scale`` (lowest, highest) can give: a real,
    finite number inside the scale. NaN, infinities, non-numbers and values outside the scale
    cannot be; None (a failure already) is not possible either."""
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return False
    lo, hi = scale
    return lo <= score <= hi


def checked(v: Verdict, scale: Sequence[float]) -> Verdict:
    """``v``, or, when its score or one of its per-sample scores cannot be (``possible``), a
    failure: score None (counted as a failed judgment, asked again on a rerun, never scored)
    and each impossible per-sample score None. The raw answers are kept for audit."""
    if all(s is None or possible(s, scale) for s in (v.score, *v.scores)):
        return v
    return Verdict(score=None, raw=v.raw, scores=tuple(s if s is None or possible(s, scale) else None
                                                       for s in v.scores), truncated=v.truncated)


def score_group(judge: Judge, items: Sequence[JudgeItem]) -> list[Verdict]:
    """Side-by-side scores for one prompt's candidates (judges may override); pointwise
    scores for a judge that has no group mode."""
    return score_groups(judge, [items])[0]


def score_groups(judge: Judge, groups: Sequence[Sequence[JudgeItem]]) -> list[list[Verdict]]:
    """``score_group`` of each group: one call to a judge with ``score_groups``, else each
    group's items scored pointwise (in one ``score`` call)."""
    fn = getattr(judge, "score_groups", None)
    if fn is not None:
        return [list(v) for v in fn([list(g) for g in groups])]
    fn = getattr(judge, "score_group", None)
    if fn is not None:
        return [list(fn(list(g))) for g in groups]
    flat = judge.score([it for g in groups for it in g])
    out, i = [], 0
    for g in groups:
        out.append(list(flat[i:i + len(g)]))
        i += len(g)
    return out


def preference(a: Verdict, b: Verdict) -> float | None:
    """AlpacaEval convention: 1.0 = first wins, 2.0 = second wins, 1.5 = tie."""
    if not (a.ok and b.ok):
        return None
    if a.score == b.score:
        return 1.5
    return 1.0 if a.score > b.score else 2.0


def compare(judge: Judge, firsts: Sequence[JudgeItem], seconds: Sequence[JudgeItem]) -> list[float | None]:
    """Pairwise preferences (1..2, None = failure). Judges with a native pairwise
    mode expose ``compare(firsts, seconds)``; otherwise pointwise scores decide."""
    fn = getattr(judge, "compare", None)
    if fn is not None:
        return fn(firsts, seconds)
    verdicts = judge.score(list(firsts) + list(seconds))
    n = len(firsts)
    return [preference(verdicts[i], verdicts[n + i]) for i in range(n)]
