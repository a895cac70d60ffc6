"""What a judge kind declares (``JudgeKind``), what its pre-flight checks report into
(``Checks``), and the option tables several kinds share: an LLM judge's prompt and
sampling (``LLMOptions``), a local judge model (``LocalModelOptions``).

A kind is one module of this package that registers one ``JudgeKind`` object in
``harness.config.registry.JUDGES``: its options (the table ``[judge.<name>]``), its score
scale, its config checks, its pre-flight checks and its builder. Not here: the judges
themselves (``base.Judge`` and the classes in llm, http, reward_model, oracle) and
``build_judge`` (the package's ``__init__``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.judges.parsing import BUILTIN_PREFIX, JudgeTemplate, group_template_ref, load_judge_template
from harness.config.registry import JUDGES
from harness.config.schema import FieldError, opt
from harness.models.sources import SourceError, identity, locate


@dataclass(frozen=True)
class NoOptions:
    """The options of a kind that has none."""


@dataclass
class Checks:
    """What a kind's pre-flight checks (``JudgeKind.preflight``) may ask and report, filled
    by ``harness.validate.experiment`` for one judge. ``unmet`` holds problems of this machine that an
    experiment may declare in experiment.requires (then they are reported as not checked)."""
    check_endpoints: bool = False   # harness validate --check-endpoints
    # (ref, where): the path of a local file reference, None when missing (reported) or a
    # tiny-world file not built yet
    readable: Callable[[str, str], Path | None] = lambda ref, where: None
    # (where, repo, revision): reports a hub model that cannot be used here (hub off, not cached)
    hub_model: Callable[[str, str, str], None] = lambda where, repo, revision: None
    errors: list[FieldError] = field(default_factory=list)
    unmet: list[tuple[str, FieldError]] = field(default_factory=list)   # (requirement, problem)


@JUDGES.entries_of
class JudgeKind:
    """One kind of judge, registered as ``JUDGES.register(name)(Kind())``. ``where`` in the
    hooks is the dotted path of the kind's own table, e.g. "judge.openai" or
    "eval.alpaca_eval.judge.hf"; ``options`` is an instance of ``Options``."""

    name: str
    Options: type = NoOptions   # dataclass schema of [judge.<name>]
    # The judge is the policy being trained: build_judge needs policy=(model, tokenizer), a
    # cache needs identity_extra (the policy's adapters), and it may not judge the policy's
    # own evaluation outputs.
    needs_policy: bool = False
    generates: bool = False  # writes its answers with a model on this machine, through the stage's engine
    loads_model: bool = False  # loads a model of its own (``build`` then takes ``dtype``, the run's model.dtype)

    def scale(self, options: Any, where: str) -> tuple[float, float]:
        """(lowest, highest) score it can give, known without loading a model."""
        raise NotImplementedError

    def check(self, options: Any, where: str) -> list[FieldError]:
        """Rules across the kind's options (parse time)."""
        return []

    def preflight(self, options: Any, where: str, checks: Checks) -> None:
        """What ``harness validate`` can check before compute: files, models, keys, endpoints."""

    def build(self, section: Any, policy: Any, seed_key: tuple) -> tuple[Any, dict]:
        """(the judge, its identity fields): everything that determines a judgment beyond the
        kind and the item, hashed into cache keys (``cache.judge_identity``). ``section`` is
        the whole ``harness.config.experiment.JudgeSection`` (batch_size is shared by every kind). A kind
        that ``loads_model`` also takes ``dtype``, the run's model.dtype (``load_dtype``)."""
        raise NotImplementedError


# ---- LLM-as-a-judge: a template, samples, temperature, a token limit -------------------

@dataclass(frozen=True)
class LLMOptions:
    template: str = opt("", 'Judge prompt template (placeholders {instruction} and {response}): a file, "tiny:judge_template", or a built-in: "builtin:additive5" (Self-Rewarding\'s additive 5-point rubric, scores 0-5; "" = this one) or "builtin:dno6" (a DNO-style 6-point scale, 1-6, as the DNO paper\'s annotator). A template declares its score range in a front-matter block ("---" / "scale: 0-5" / "---", stripped before use); without one it is 1-5. See harness/judges/parsing.py.')
    samples: int = opt(1, "Judge each item this many times and average (Self-Rewarding uses 3).", min=1)
    temperature: float = opt(0.0, "Judge sampling temperature (0 = greedy; use > 0 with samples > 1).", min=0.0)
    group_template: str = opt("", 'Template for judging one prompt\'s candidates side by side in one prompt (DNO\'s [method.dno] judging = "group"): placeholders {instruction} and {responses} (the candidates, numbered in <answer N> tags), the same front matter and score range as template; the answer must end with one "Score N: <score>" line per candidate, and an answer that does not score every candidate exactly once fails them all. "" = the group form of a built-in template (builtin:additive5_group, builtin:dno6_group); a template from a file needs its own.')
    max_new_tokens: int = opt(256, "Tokens a model judge may write, justification and score together. The built-in rubric asks for up to 100 words before the score (about 130-150 tokens), so 256 leaves room; a judgment cut off at this limit has no score and is counted as judge/n_truncated, apart from judge/n_parse_failed.", min=1)


class LLMKind(JudgeKind):
    """A kind that prompts a model with a template and parses "Score: N" from its answers.
    ``greedy_repeats``: several greedy samples give the same answer (a local model does;
    an endpoint need not)."""

    Options = LLMOptions
    greedy_repeats = True

    def scale(self, options: LLMOptions, where: str) -> tuple[float, float]:
        return load_judge_template(options.template, f"{where}.template").scale

    def check(self, options: LLMOptions, where: str) -> list[FieldError]:
        if self.greedy_repeats and options.samples > 1 and options.temperature == 0.0:
            return [FieldError(f"{where}.samples", "several samples of a greedy judge are identical; "
                                                   "set temperature > 0")]
        return []

    def preflight(self, options: LLMOptions, where: str, checks: Checks) -> None:
        ref, path = options.template, f"{where}.template"
        if ref and (ref.startswith(BUILTIN_PREFIX) or checks.readable(ref, path) is not None):
            try:
                load_judge_template(ref, path)
            except ValueError as e:
                checks.errors.append(FieldError(path, str(e).removeprefix(f"{path}: ")))
        ref, path = options.group_template, f"{where}.group_template"
        if ref and (ref.startswith(BUILTIN_PREFIX) or checks.readable(ref, path) is not None):
            try:
                self.group(options, where)
            except ValueError as e:
                checks.errors.append(FieldError(path, str(e).removeprefix(f"{path}: ")))

    def group(self, options: LLMOptions, where: str = "") -> str | None:
        """The text of the group template (``LLMOptions.group_template``), None when there is
        none (a file template without one: group judging then fails naming the option).
        ValueError when it does not load or declares another score range than ``template``."""
        where = where or f"judge.{self.name}"
        path = f"{where}.group_template"
        try:
            ref = group_template_ref(options.template, options.group_template)
        except ValueError:
            return None
        tpl = load_judge_template(ref, path, group=True)
        lo, hi = load_judge_template(options.template, f"{where}.template").scale
        if tpl.scale != (lo, hi):
            raise ValueError(f"{path}: the group template scores {tpl.lo}-{tpl.hi}, but template scores "
                             f"{lo:g}-{hi:g}: both must declare the same range")
        return tpl.text

    def template(self, options: LLMOptions) -> tuple[JudgeTemplate, dict]:
        """The loaded template and the identity fields of the prompt and its sampling."""
        tpl = load_judge_template(options.template, f"judge.{self.name}.template")
        ident = {"template": tpl.text, "scale": [tpl.lo, tpl.hi], "samples": options.samples,
                 "temperature": options.temperature, "max_new_tokens": options.max_new_tokens}
        return tpl, ident

    def local_judge(self, model: Any, tokenizer: Any, section: Any, seed_key: tuple, name: str) -> tuple[Any, dict]:
        """An in-memory (model, tokenizer) as the judge (``llm.LLMJudge``) and its identity
        fields of the prompt and sampling (the caller adds what identifies the weights)."""
        from harness.judges.llm import LLMJudge  # generation: torch

        o = section.options
        tpl, ident = self.template(o)
        judge = LLMJudge(model, tokenizer, template=tpl.text, lo=tpl.lo, hi=tpl.hi, samples=o.samples,
                         temperature=o.temperature, max_new_tokens=o.max_new_tokens, batch_size=section.batch_size,
                         seed_key=seed_key, name=name, group_template=self.group(o))
        return judge, {**ident, **self.seed_ident(o, seed_key)}

    @staticmethod
    def seed_ident(options: LLMOptions, seed_key: tuple) -> dict:
        # a greedy judge's answer does not depend on the seed: leave it out, so that a fixed
        # external judge's cache is reused across iterations
        return {"seed": list(seed_key)} if options.temperature > 0 else {}


# ---- a judge model on this machine (a hub id or a local directory) -------------------

@dataclass(frozen=True)
class LocalModelOptions:
    model: str = opt("", "Hub id or local path of the judge model.")
    revision: str = opt("main", "Hub revision of the judge model.")
    dtype: str = opt("", 'dtype the judge model loads in: "float32", "bfloat16" or "float16"; "" = the run\'s model.dtype.', choices=("", "float32", "bfloat16", "float16"))


def model_problems(kind: str, options: LocalModelOptions, where: str) -> list[FieldError]:
    return [] if options.model else [FieldError(f"{where}.model", f"judge {kind!r} needs a model")]


def model_preflight(options: LocalModelOptions, where: str, checks: Checks) -> None:
    """The judge model resolves; a hub id is usable here (online, or cached)."""
    if not options.model:
        return
    try:
        src = locate(options.model)
    except SourceError as e:
        checks.errors.append(FieldError(f"{where}.model", str(e)))
        return
    if src.kind == "hub":
        checks.hub_model(f"{where}.model", src.ref, options.revision)


def model_ident(options: LocalModelOptions, dtype: str) -> dict:
    """The judge model's identity fields; ``dtype``: the one it loads in (``load_dtype``)."""
    return {"model": options.model, "revision": options.revision,
            "weights": identity(locate(options.model), options.revision), "dtype": dtype}


def load_dtype(options: LocalModelOptions, run_dtype: str) -> str:
    """The dtype a judge model loads in: its section's ``dtype``, else the run's model.dtype."""
    return options.dtype or run_dtype
