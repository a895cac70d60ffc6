"""Likelihood over-optimisation indicators (arXiv 2410.11677) on the model's own samples.

Measured on one sampled answer per held-out prompt:
- ``indicators/topk_entropy``: entropy (nats) of the next-token distribution
  restricted to its k most likely tokens and *renormalised* over them, from the
  untempered logits (``harness.engines.generate.topk_stats``), averaged over each
  answer's generated tokens, then over answers (every answer weighs the same);
- ``indicators/topk_mass``: the summed probability of those k tokens, averaged
  the same way;
- ``indicators/distinct_1`` / ``distinct_2``: distinct n-grams / total n-grams,
  pooled across all answers, on *whitespace* tokens (model-independent, so
  iterations and models compare); n-grams do not cross answer boundaries;
- ``indicators/mean_length``: mean answer length in model tokens (the eos
  token counts when generated);
- ``indicators/n_cut`` / ``cut_share``: answers that hit ``max_new_tokens`` (their
  length is the cap's, not the answer's).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

from harness.config.eval_sections import IndicatorSection
from harness.engines.generate import Prompt, Sampling, cut_metrics, generate
from harness.store.files import JsonlLog, atomic_write_json

log = logging.getLogger(__name__)


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Distinct n-grams / total n-grams over whitespace tokens; None when no text has n tokens."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def indicator_metrics(samples: Sequence[dict]) -> dict[str, float | None]:
    """Flat ``indicators/*`` metrics from generate()'s sample records."""
    texts = [s["text"] for s in samples]
    return {
        "indicators/topk_entropy": _mean([s["topk_entropy"] for s in samples if "topk_entropy" in s]),
        "indicators/topk_mass": _mean([s["topk_mass"] for s in samples if "topk_mass" in s]),
        "indicators/distinct_1": distinct_n(texts, 1),
        "indicators/distinct_2": distinct_n(texts, 2),
        "indicators/mean_length": _mean([s["n_tokens"] for s in samples]),
        **cut_metrics([{"samples": samples}], "indicators"),
    }


def check_thresholds(metrics: dict, section: IndicatorSection) -> list[str]:
    """Early-warning messages; a threshold of 0 is off, a missing value never warns."""
    warnings = []
    ent, mass = metrics.get("indicators/topk_entropy"), metrics.get("indicators/topk_mass")
    if section.entropy_min > 0 and ent is not None and ent < section.entropy_min:
        warnings.append(f"top-{section.top_k} entropy {ent:.4f} fell below eval.indicators.entropy_min "
                        f"{section.entropy_min}: likelihood over-optimisation (outputs collapsing)")
    if section.mass_min > 0 and mass is not None and mass < section.mass_min:
        warnings.append(f"top-{section.top_k} probability mass {mass:.4f} fell below eval.indicators.mass_min "
                        f"{section.mass_min}: the distribution is flattening (noisy outputs)")
    return warnings


def run_indicators(model, tokenizer, prompts: Sequence[Prompt], section: IndicatorSection, seed_key: tuple,
                   max_new_tokens: int, batch_size: int, out_dir: Path,
                   generate_fn: Callable = generate) -> dict[str, float | None]:
    """Sample one answer for each of the first ``section.num_prompts`` prompts and measure.

    Samples are appended to ``out_dir/samples.jsonl`` per batch (a rerun resumes);
    ``metrics.json`` holds the metrics and threshold warnings, which are also logged.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = list(prompts)[:section.num_prompts]
    sampling = Sampling(temperature=section.temperature, top_p=1.0, max_new_tokens=max_new_tokens, n=1,
                        top_k_stats=section.top_k)
    records = generate_fn(model, tokenizer, chosen, sampling, seed_key=(*seed_key, "indicators"),
                          batch_size=batch_size, log=JsonlLog(out_dir / "samples.jsonl"), desc="indicators")
    metrics = indicator_metrics([rec["samples"][0] for rec in records.values()])
    warnings = check_thresholds(metrics, section)
    for w in warnings:
        log.warning(w)
    atomic_write_json(out_dir / "metrics.json", {
        "metrics": metrics, "warnings": warnings, "n_prompts": len(chosen), "top_k": section.top_k,
        "temperature": section.temperature,
        "definitions": "top-k renormalised entropy (nats) and top-k mass from untempered logits, mean over "
                       "tokens then answers; distinct-n over whitespace tokens pooled across answers"})
    return metrics
