"""Per-iteration evaluation: lm-eval tasks, AlpacaEval-style win rate, MT-Bench, over-optimisation
indicators.

``evaluate_iteration`` runs the parts the config enables, each in its own
subdirectory of ``out_dir`` (lm_eval/, alpaca_eval/, mt_bench/, indicators/), and returns one
flat metrics dict (names in the project's flat scheme). Failures propagate: a
coverage failure raises ``CoverageError``; nothing is reported half-done.

Seeds: AlpacaEval's position coin and the indicator samples derive from
(experiment seed, iteration). lm-eval keeps its own default seeds, identical in
every iteration, so iterations are compared on the same few-shot examples and
the numbers equal an ``lm_eval`` command-line run.

Modules: ``lm_eval_adapter`` / ``lm_eval_vllm`` (lm-eval on the in-memory model or through
vLLM), ``alpaca`` with ``alpaca_instructions``, ``alpaca_metrics``, ``annotators`` and
``published`` (AlpacaEval), ``mt_bench`` with ``mt_bench_prompts`` (MT-Bench), ``indicators``,
``outcomes`` (per-item results and paired statistics), ``crosscheck`` (alpaca_eval's and
FastChat's own code against the same endpoint). Not here: the judges themselves
(``harness.judges``), choosing an iterate (``harness.run.selection``), the leaderboard
(``harness.report``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

from harness.console import terminal as console
from harness.config.experiment import Config, JudgeSection
from harness.models.data import with_system
from harness.engines.generate import Prompt, generate
from harness.models.sources import resolve_ref
from harness.store.files import atomic_write_json

from .alpaca import CoverageError, run_alpaca_eval  # noqa: F401  (re-exported)
from .alpaca_instructions import load_instructions, section_instructions  # noqa: F401  (re-exported)
from .indicators import check_thresholds, run_indicators  # noqa: F401
from .lm_eval_adapter import run_lm_eval
from .lm_eval_vllm import run_lm_eval_vllm
from .mt_bench import run_mt_bench

log = logging.getLogger(__name__)

__all__ = ["evaluate_iteration", "load_eval_prompts", "CoverageError", "check_thresholds",
           "run_lm_eval", "run_lm_eval_backend", "run_alpaca_eval", "run_indicators", "run_mt_bench"]


def run_lm_eval_backend(model, tokenizer, cfg: Config, section, out_dir: Path,
                        where: str = "eval.num_fewshot") -> dict[str, float | None]:
    """lm-eval on ``section``'s tasks (cfg.eval, or the validation evaluation's copy of it) with
    its ``backend``: "hf" (``run_lm_eval``) or "vllm" (``run_lm_eval_vllm``, serving the policy as
    cfg.generation's vllm_weights and vllm_max_num_seqs say); the experiment's system prompt."""
    if section.backend == "vllm":
        return run_lm_eval_vllm(model, tokenizer, section, out_dir, weights=cfg.generation.vllm_weights,
                                max_num_seqs=cfg.generation.vllm_max_num_seqs,
                                system_prompt=cfg.data.system_prompt, where=where)
    return run_lm_eval(model, tokenizer, section, out_dir, system_prompt=cfg.data.system_prompt, where=where)


def load_eval_prompts(ref: str) -> list[tuple[str, str]]:
    """[(id, prompt)] from a .jsonl (or .json list) with a ``prompt`` field and an optional ``id``
    (missing: a hash of the prompt text)."""
    path = Path(resolve_ref(ref) if ref.startswith("tiny:") else ref)
    try:
        text = path.read_text()
    except OSError as e:
        raise FileNotFoundError(f"eval.eval_prompts: cannot read {path}: {e.strerror}") from None
    try:
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"eval.eval_prompts: {path} is not valid JSON/JSONL: {e}") from None
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"eval.eval_prompts: {path} row {i} has no string field 'prompt'")
        pid = str(row.get("id") or hashlib.sha256(row["prompt"].encode()).hexdigest()[:16])
        out.append((pid, row["prompt"]))
    if len({pid for pid, _ in out}) != len(out):
        raise ValueError(f"eval.eval_prompts: {path} has duplicate ids")
    return out


def iteration0_answers(path: Path) -> tuple[dict[str, str], str]:
    """({instruction id: answer}, content hash) of a run's iteration-0 AlpacaEval answers
    (``RunDir.alpaca_generations(0)``)."""
    from harness.store.files import file_hash, read_jsonl

    return {r["id"]: r["samples"][0]["text"] for r in read_jsonl(path)}, file_hash(path)


def _indicator_prompts(cfg: Config) -> list[Prompt] | None:
    system = with_system(cfg.data.system_prompt)
    if cfg.eval.eval_prompts:
        pairs = load_eval_prompts(cfg.eval.eval_prompts)
    elif cfg.eval.alpaca_eval.instructions:
        pairs = [(r["id"], r["instruction"]) for r in section_instructions(cfg.eval.alpaca_eval, limit=0)]
    else:
        return None
    return [Prompt(pid, system + ({"role": "user", "content": text},)) for pid, text in pairs]


def evaluate_iteration(model, tokenizer, cfg: Config, out_dir: Path, iteration: int,
                       judge_factory: Callable[[JudgeSection], object],
                       reference: dict[str, str] | None = None,
                       generate_fn: Callable = generate) -> dict[str, float | int | None]:
    """Run every configured evaluation of one iteration's model; returns flat metrics.
    ``reference``: the iteration-0 AlpacaEval answers when ``eval.alpaca_eval.reference``
    is "iteration0" (see ``iteration0_answers``). ``generate_fn``: the engine's generate
    (``harness.engines``) for the AlpacaEval answers and the indicator samples; lm-eval
    runs with its own model class of eval.backend (``run_lm_eval_backend``).

    ``judge_factory`` builds the AlpacaEval judge from ``cfg.eval.alpaca_eval.judge``; it is
    called only under the harness_rubric protocol, after every AlpacaEval answer is written,
    and a judge that loads a model is freed, the policy off the GPU meanwhile, before MT-Bench
    and the indicators run (``run_alpaca_eval``, ``harness.judges.policy_aside``). Indicator
    threshold warnings are logged and written to indicators/metrics.json; a loop honouring
    ``eval.indicators.action = "stop"`` calls ``check_thresholds`` on the result.
    """
    out_dir = Path(out_dir)
    ev = cfg.eval
    seed_key = (cfg.experiment.seed, iteration)
    metrics: dict[str, float | int | None] = {}
    if ev.lm_eval_tasks:
        console.phase("lm-eval")
        metrics.update(run_lm_eval_backend(model, tokenizer, cfg, ev, out_dir / "lm_eval"))
    if ev.alpaca_eval.instructions:
        console.phase("alpaca_eval")
        metrics.update(run_alpaca_eval(
            model, tokenizer, ev.alpaca_eval, lambda: judge_factory(ev.alpaca_eval.judge), out_dir / "alpaca_eval",
            seed_key=seed_key, generator=f"{cfg.experiment.name}/iter_{iteration:03d}",
            batch_size=cfg.generation.batch_size, system_prompt=cfg.data.system_prompt, reference=reference,
            reference_name=f"{cfg.experiment.name}/iter_000", generate_fn=generate_fn))
    if ev.mt_bench.enabled:
        console.phase("mt_bench")
        metrics.update(run_mt_bench(
            model, tokenizer, ev.mt_bench, out_dir / "mt_bench", seed_key=seed_key,
            model_id=f"{cfg.experiment.name}/iter_{iteration:03d}", batch_size=cfg.generation.batch_size,
            system_prompt=cfg.data.system_prompt, generate_fn=generate_fn))
    if ev.indicators.num_prompts > 0:
        prompts = _indicator_prompts(cfg)
        if prompts is None:
            log.warning("eval.indicators.num_prompts > 0 but neither eval.eval_prompts nor "
                        "eval.alpaca_eval.instructions is set: indicators skipped")
        else:
            console.phase("indicators")
            metrics.update(run_indicators(
                model, tokenizer, prompts, ev.indicators, seed_key=seed_key,
                max_new_tokens=cfg.generation.max_new_tokens, batch_size=cfg.generation.batch_size,
                out_dir=out_dir / "indicators", generate_fn=generate_fn))
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics
