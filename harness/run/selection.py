"""Validation evaluations for choosing an iterate (``[eval.validation]``), kept apart from
the reported results so that choosing does not peek at them.

``run_validation`` evaluates one iteration's model on what the section configures --
lm-eval tasks, an AlpacaEval-style win rate on its own instructions, and the mean
judge score of greedy answers to held-out prompts -- each in a subdirectory of
``out_dir``, and returns flat metrics under "validation/" (``validation/lm_eval/<task>/
<metric>``, ``validation/alpaca_eval/<metric>``, ``validation/judge/score_mean``).
``metric_names`` lists the names a configuration will produce, for ``harness validate``.
A method's ``select_final`` picks the best iterate on one of them; the loop writes
the choice to final.json with that iterate's reported (test) metrics.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

from harness.config.experiment import Config, JudgeSection
from harness.config.eval_sections import ValidationSection
from harness.models.data import Example, read_records, to_examples, with_system
from harness.evaluate import run_alpaca_eval, run_lm_eval_backend
from harness.evaluate.lm_eval_adapter import task_metrics
from harness.engines.generate import Prompt, Sampling, cut_metrics, generate
from harness.judges import policy_aside, require_coverage
from harness.judges.judging import judge_groups
from harness.methods.base import Candidate, Group
from harness.metrics import ALPACA_EVAL, VALIDATION, VALIDATION_JUDGE, produced_by
from harness.store.files import JsonlLog, atomic_write_json

PREFIX = VALIDATION


def metric_names(v: ValidationSection) -> set[str]:
    """The "validation/..." names ``run_validation`` produces for ``v``; lm-eval tasks whose
    YAML cannot be read yet (e.g. hub tasks) appear as ``validation/lm_eval/<task>/*``.
    Raises FileNotFoundError / KeyError for task files that do not exist."""
    names: set[str] = set()
    for task, metric in task_metrics(v.lm_eval_tasks):
        names |= {f"{PREFIX}lm_eval/{task}/{metric}", f"{PREFIX}lm_eval/{task}/{metric}_stderr"}
    if v.alpaca_eval.instructions:
        names |= {PREFIX + m for m in produced_by(ALPACA_EVAL)}
    if v.prompts:
        names |= set(produced_by(VALIDATION_JUDGE))  # "validation/judge/..."
    return names


def validation_prompts(cfg: Config) -> list[Prompt]:
    """The first ``num_prompts`` of ``eval.validation.prompts`` (a "prompt" column, as the
    methods' own files), after data.system_prompt when one is set."""
    v = cfg.eval.validation
    system = with_system(cfg.data.system_prompt)
    rows = read_records(v.prompts, split=v.split, where="eval.validation.prompts")
    exs = to_examples(rows, where="eval.validation.prompts")[:v.num_prompts or None]
    return [Prompt(e.id, system + e.messages) for e in exs]


def judged_prompts(model, tokenizer, cfg: Config, make_judge: Callable[[], object], out_dir: Path, seed_key: tuple,
                   generate_fn: Callable = generate) -> dict:
    """Mean judge score of the model's greedy answers to the validation prompts, judged through
    the same healing path as the judge stage (``harness.judges.judging``): a transport failure is
    never stored as a judgment, the stage fails naming it and a rerun asks again. ``make_judge()``
    is called once every answer is written, inside ``policy_aside`` (a judge that loads a model
    never sits beside the policy on the accelerator, and is freed before the policy returns)."""
    v = cfg.eval.validation
    prompts = validation_prompts(cfg)
    gens = generate_fn(model, tokenizer, prompts, Sampling(temperature=0.0, max_new_tokens=cfg.generation.max_new_tokens),
                       seed_key=(*seed_key, "validation"), batch_size=cfg.generation.batch_size,
                       log=JsonlLog(out_dir / "generations.jsonl"), desc="validation")
    groups = [Group(Example(p.id, p.messages), [Candidate(gens[p.id]["samples"][0]["text"])]) for p in prompts]
    with policy_aside(model, v.judge):
        judge = make_judge()
        judged = judge_groups(judge, groups, JsonlLog(out_dir / "judgments.jsonl"), batch_size=v.judge.batch_size,
                              what="validation judging")
        del judge  # its last reference: policy_aside frees it before the policy returns
    scores = [s for rec in judged.records for s in rec["scores"] if s is not None and math.isfinite(s)]
    require_coverage(len(scores), len(prompts), v.min_coverage, "validation judging")
    return {f"{PREFIX}judge/score_mean": math.fsum(scores) / len(scores), f"{PREFIX}judge/n_prompts": len(prompts),
            f"{PREFIX}judge/n_scored": len(scores), f"{PREFIX}judge/coverage": len(scores) / len(prompts),
            **cut_metrics(gens, f"{PREFIX}judge")}


def run_validation(model, tokenizer, cfg: Config, out_dir: Path, iteration: int,
                   judge_factory: Callable[[JudgeSection], object],
                   reference: dict[str, str] | None = None, generate_fn: Callable = generate) -> dict:
    """Every configured validation evaluation of one iteration's model; flat "validation/" metrics.
    ``reference``: iteration 0's validation AlpacaEval answers when
    ``eval.validation.alpaca_eval.reference`` is "iteration0" (else each iterate would be
    judged against its own answers: 50 every time). ``generate_fn``: the engine's generate
    (``harness.engines``) for the answers."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    v = cfg.eval.validation
    seed_key = (cfg.experiment.seed, iteration)
    metrics: dict = {}
    if v.lm_eval_tasks:
        section = replace(cfg.eval, lm_eval_tasks=v.lm_eval_tasks, num_fewshot=v.num_fewshot, limit=v.limit)
        # the experiment's system message and eval.backend, as in the reported lm-eval evaluation
        got = run_lm_eval_backend(model, tokenizer, cfg, section, out_dir / "lm_eval",
                                  where="eval.validation.num_fewshot")
        metrics.update({PREFIX + k: m for k, m in got.items()})
    if v.alpaca_eval.instructions:
        got = run_alpaca_eval(model, tokenizer, v.alpaca_eval, lambda: judge_factory(v.alpaca_eval.judge),
                              out_dir / "alpaca_eval", seed_key=(*seed_key, "validation"),
                              generator=f"{cfg.experiment.name}/iter_{iteration:03d}/validation",
                              batch_size=cfg.generation.batch_size,
                              system_prompt=cfg.data.system_prompt, reference=reference,
                              reference_name=f"{cfg.experiment.name}/iter_000/validation",
                              generate_fn=generate_fn)
        metrics.update({PREFIX + k: m for k, m in got.items()})
    if v.prompts:
        metrics.update(judged_prompts(model, tokenizer, cfg, lambda: judge_factory(v.judge), out_dir / "judge", seed_key,
                                      generate_fn))
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics
