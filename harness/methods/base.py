"""The contract between the iteration loop and a method.

A method is a small strategy object: it says which prompts to sample, how,
which candidates a judge should see, how candidates become (chosen, rejected)
pairs, and which pairs an iteration trains on. It holds no loop, no I/O, no
evaluation; ``harness/run/loop.py`` does those for every method alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from harness.models.data import DataError, Example, load_simple, read_records
from harness.engines.generate import Prompt, Sampling
from harness.config.schema import FieldError, opt
from harness.models.sources import is_built


@dataclass(frozen=True)
class Candidate:
    text: str
    source: str = "policy"            # "policy" (a sample of the current model) or "teacher"
    fixed_score: float | None = None  # set for automatic negatives: not sent to the judge;
                                      # -inf on an unbounded scale (below every real score)
    cut: bool | None = None           # a sample that hit max_new_tokens (it never ended); None:
                                      # unknown (samples of an older run), treated as ended


@dataclass
class Group:
    """One prompt's candidates and, after judging, their scores (None = no valid judgment)."""
    example: Example
    candidates: list[Candidate]
    scores: list[float | None] = field(default_factory=list)


@dataclass
class IterationContext:
    cfg: Any                                  # harness.config.experiment.Config
    iteration: int                            # 1-based training iteration
    examples: list[Example]                   # the data.train examples
    # (lowest, highest) score of the configured judge, known before any candidate is built
    # (``harness.judges.judge_scale``); (-inf, inf) for a reward model; None without a judge
    judge_scale: tuple[float, float] | None = None
    pairs_of: Callable[[int], list[dict]] = lambda k: []     # finished pairs of iteration k

    @property
    def options(self) -> Any:
        return self.cfg.options

    def scale(self) -> tuple[float, float]:
        if self.judge_scale is None:
            raise ValueError(f"method {self.cfg.method.name!r} needs the judge's score scale, but the "
                             "iteration context has none (judge.name = 'none'?)")
        return self.judge_scale


@dataclass(frozen=True)
class SelfInstruct:
    """New prompts an iteration generates few-shot before sampling (a stage of its own).

    ``requests`` go to ``model`` ("" = the current policy; else a model reference, as
    model.base) with ``sampling``; ``select`` turns the outputs {request id: record} into
    the new prompts (filtering and de-duplication)."""
    requests: list[Prompt]
    sampling: Sampling
    select: Callable[[dict], list[Example]]
    model: str = ""
    revision: str = "main"


class Method:
    """Base class of the method strategies. The hooks with a body here are optional (a method
    overrides what it needs); the ones that raise are what every method must say."""

    name: str
    Options: type              # dataclass schema of [method.<name>]
    needs_judge: bool
    turns: str = "all"         # data.turns = "auto" means this ("first" or "all", harness.models.data.select_turns)

    def check(self, cfg) -> list[FieldError]:
        """Rules across config fields (parse time)."""
        return []

    def check_inputs(self, cfg, examples: Sequence[Example]) -> list[FieldError]:
        """Problems with the data found before compute: ``examples`` are data.train's;
        the method's own files (teacher, IFT/EFT, prompts) are read here too."""
        return []

    def max_pairs(self, cfg, n_examples: int) -> int | None:
        """The most pairs iteration 1 can train on (None: unknown), for the few-steps warning."""
        return None

    def metric_refs(self, cfg) -> list[tuple[str, str]]:
        """(dotted path, metric name) of the options that name a validation metric
        ("validation/..."; ``harness validate`` checks the [eval.validation] evaluations
        produce it)."""
        return []

    def init_sft_data(self, cfg) -> list[dict] | None:
        """Examples {messages, response} for an SFT stage before iteration 0, or None."""
        return None

    def init_sft_settings(self, cfg):
        """The ``harness.config.experiment.SftSection`` of that stage (None: no stage)."""
        return None

    def self_instruct(self, ctx: IterationContext) -> SelfInstruct | None:
        """New prompts to generate before this iteration's sampling, or None. The loop runs
        them as the resumable "self_instruct" stage and appends the selected prompts to
        ``prompts(ctx)``."""
        return None

    def select_final(self, cfg, rows: Sequence[dict]) -> dict | None:
        """Which iterate is the method's final model, {iteration, metric, value}
        (None = the last)."""
        return None

    def prompts(self, ctx: IterationContext) -> list[Example]:
        """This iteration's prompts from the method's data (self-instructed ones come on top)."""
        raise NotImplementedError

    def sampling(self, cfg) -> Sampling:
        """How the policy samples this method's candidates."""
        raise NotImplementedError

    def candidates(self, ctx: IterationContext, example: Example, samples: Sequence[str]) -> list[Candidate]:
        """The answers a judge (if any) scores for one prompt: samples, plus any fixed ones.
        Its "policy" candidates are the samples, in their order (``mark_cut`` relies on it)."""
        raise NotImplementedError

    def build_pairs(self, ctx: IterationContext, groups: Sequence[Group]) -> tuple[list[dict], dict]:
        """Pairs {id, messages, chosen, rejected, ...} and statistics for the report."""
        raise NotImplementedError

    def training_set(self, ctx: IterationContext) -> list[dict]:
        """The pairs iteration ``ctx.iteration`` trains on (its own and any replayed)."""
        raise NotImplementedError


def iteration_slice(items: Sequence, per_iteration: int, iteration: int, reuse: bool = False) -> list:
    """Non-overlapping part ``iteration`` (1-based) of ``items``. When they run out the
    parts wrap around only if ``reuse`` (validation reports it before a run starts)."""
    if per_iteration <= 0:
        return list(items)
    if iteration * per_iteration > len(items) and not reuse:
        raise ValueError(f"iteration {iteration} needs prompts {(iteration - 1) * per_iteration + 1}.."
                         f"{iteration * per_iteration} but only {len(items)} exist; set reuse_prompts = true")
    if per_iteration >= len(items):
        return list(items)
    start = ((iteration - 1) * per_iteration) % len(items)
    part = list(items[start:start + per_iteration])
    return part + list(items[:per_iteration - len(part)])


def mark_cut(candidates: Sequence[Candidate], cut: Sequence[bool | None]) -> list[Candidate]:
    """``candidates`` with each policy candidate marked by whether its sample was cut at
    max_new_tokens (``cut``: one flag per sample, in the samples' order, as
    ``Method.candidates`` builds them). Raises ValueError when the policy candidates are
    not one per sample."""
    policy = [i for i, c in enumerate(candidates) if c.source == "policy"]
    if len(policy) != len(cut):
        raise ValueError(f"{len(policy)} policy candidates for {len(cut)} samples: a method's candidates must be "
                         "its samples in order (plus teacher answers)")
    out = list(candidates)
    for i, flag in zip(policy, cut):
        out[i] = replace(out[i], cut=flag)
    return out


def pair(example: Example, chosen: str | Candidate, rejected: str | Candidate, **extra: Any) -> dict:
    """A training pair. A ``Candidate`` side records whether it was cut at max_new_tokens
    (``chosen_cut`` / ``rejected_cut``: True, False or None = unknown); training gives a cut
    answer no end-of-turn (``harness.train.ended``). A plain text side (a human answer)
    records nothing and trains as an ended answer."""
    sides: dict[str, Any] = {}
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(side, Candidate):
            sides.update({key: side.text, f"{key}_cut": side.cut})
        else:
            sides[key] = side
    return {"id": example.id, "messages": list(example.messages), **sides, **extra}


def length_stats(pairs: Sequence[dict]) -> dict:
    """Mean answer lengths and how many pairs train on a cut answer (``pairs/chosen_cut``,
    ``pairs/rejected_cut``; pairs that do not say count as whole)."""
    if not pairs:
        return {"pairs/chosen_mean_chars": None, "pairs/rejected_mean_chars": None,
                "pairs/chosen_cut": 0, "pairs/rejected_cut": 0}
    return {"pairs/chosen_mean_chars": sum(len(p["chosen"]) for p in pairs) / len(pairs),
            "pairs/rejected_mean_chars": sum(len(p["rejected"]) for p in pairs) / len(pairs),
            "pairs/chosen_cut": sum(p.get("chosen_cut") is True for p in pairs),
            "pairs/rejected_cut": sum(p.get("rejected_cut") is True for p in pairs)}


def best_iterate(rows: Sequence[dict], metric: str, higher_is_better: bool = True) -> dict | None:
    """The row with the best ``metric`` (ties -> the earlier iterate)."""
    scored = [r for r in rows if r["metrics"].get(metric) is not None]
    if not scored:
        return None
    sign = 1 if higher_is_better else -1
    best = max(scored, key=lambda r: (sign * r["metrics"][metric], -r["iteration"]))
    return {"iteration": best["iteration"], "metric": metric, "value": best["metrics"][metric]}


def prompt_budget(where: str, n_available: int, per_iteration: int, iterations: int,
                  reuse: bool) -> list[FieldError]:
    """An error when non-overlapping parts of ``per_iteration`` prompts run out."""
    need = per_iteration * iterations
    if per_iteration and need > n_available and not reuse:
        return [FieldError(where, f"{per_iteration} x {iterations} iterations = {need} prompts, but only "
                                  f"{n_available} are available; lower it, add prompts, or set reuse_prompts = true "
                                  "(later iterations then reuse earlier prompts)")]
    return []


@dataclass(frozen=True)
class CutAnswers:
    """Options (a base of a method's ``Options``) of a method whose chosen answer can be a
    policy sample cut at ``generation.max_new_tokens``. A kept cut answer trains without an
    end-of-turn (``harness.train.ended``), so it never teaches the model to stop there."""
    cut_chosen: str = opt("drop", 'A pair whose chosen answer is a sample cut at generation.max_new_tokens: "drop" it (counted as pairs/cut_chosen_dropped), or "keep" it (trained without an end-of-turn, so the model learns the text, not to stop mid-answer).', choices=("drop", "keep"))
    cut_rejected: str = opt("keep", 'A pair whose rejected answer is a cut sample: "keep" it (the default: the judge scored exactly that text, so it is still the worse answer, and it trains without an end-of-turn, lowering the likelihood of the text rather than of stopping there; dropping such pairs would keep mostly short rejected answers, a length bias), or "drop" it (pairs/cut_rejected_dropped).', choices=("keep", "drop"))

    def usable(self, candidate: Candidate, side: str) -> bool:
        """Whether ``candidate`` as the ``side`` ("chosen" / "rejected") of a pair leaves the
        pair kept; methods prefer usable candidates among equally scored ones, so a pair is
        not dropped for a cut answer when an equal whole one was there."""
        how = self.cut_chosen if side == "chosen" else self.cut_rejected
        return not (how == "drop" and candidate.cut is True)

    def keep_pairs(self, pairs: Sequence[dict]) -> tuple[list[dict], dict]:
        """The pairs these options keep, and the counts of those dropped (a count per side set
        to "drop"; a pair with both sides cut counts for its chosen). A side whose cut is
        unknown (None) counts as whole."""
        drop = [k for k, how in (("chosen", self.cut_chosen), ("rejected", self.cut_rejected)) if how == "drop"]
        kept, dropped = [], {f"pairs/cut_{k}_dropped": 0 for k in drop}
        for p in pairs:
            hit = next((k for k in drop if p.get(f"{k}_cut") is True), None)
            if hit is None:
                kept.append(p)
            else:
                dropped[f"pairs/cut_{hit}_dropped"] += 1
        return kept, dropped


@dataclass(frozen=True)
class PromptSplit:
    """Options (a base of a method's ``Options``) of a method whose iterations each take their
    own part of the prompts."""
    prompts_per_iteration: int = opt(0, "Split the prompts into non-overlapping parts of this size, one fresh part per iteration; 0 = all every iteration.", min=0)
    reuse_prompts: bool = opt(False, "Allow prompts_per_iteration x iterations to exceed the prompts available: the parts then wrap around and later iterations reuse prompts.")

    def part(self, items: Sequence, iteration: int) -> list:
        """Iteration ``iteration``'s part of ``items`` (``iteration_slice``)."""
        return iteration_slice(items, self.prompts_per_iteration, iteration, self.reuse_prompts)

    def budget(self, where: str, n_available: int, iterations: int) -> list[FieldError]:
        """An error when the parts run out (``prompt_budget``)."""
        return prompt_budget(where, n_available, self.prompts_per_iteration, iterations, self.reuse_prompts)


def file_problems(ref: str, where: str, columns: Sequence[str] = ("prompt",)) -> tuple[list[Example], list[FieldError]]:
    """Load a method's own data file as the run will, checking ``columns`` exist in
    every row. A tiny-world file not built yet is not read (it is ours)."""
    if not is_built(ref):
        return [], []
    try:
        rows = read_records(ref, where=where)
    except DataError as e:
        return [], [FieldError(where, str(e).removeprefix(f"{where}: "))]
    for n, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            return [], [FieldError(where, f"{ref}: row {n} has no column(s) {', '.join(map(repr, missing))} "
                                          f"(columns: {', '.join(sorted(row))})")]
    if not rows:
        return [], [FieldError(where, f"{ref}: no rows")]
    try:
        return load_simple(ref, where), []
    except DataError as e:
        return [], [FieldError(where, str(e).removeprefix(f"{where}: "))]
