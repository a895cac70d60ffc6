"""How long a training stage runs and at what learning rate, step by step.

Pure arithmetic on the ``harness.config.experiment.StepSettings`` of a stage (no torch, no trl):
the optimizer steps an iteration takes, its warmup, the multiplier of the peak
rate at each step, and the settings of a DPO iteration. Not the trainer that
applies them (``harness.train.trainer``).
"""

from __future__ import annotations

import math
from dataclasses import fields

from harness.config.experiment import StepSettings


def warmup_steps(ratio: float, total: int) -> int:
    """Warmup steps: rounded down, so an iteration of a few steps gets none."""
    return int(math.floor(ratio * total))


def lr_factor(schedule: str, warmup: int, total: int, step: int) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Unlike transformers' schedules, no step gets a zero rate: warmup ramps
    1/(w+1) .. w/(w+1) (transformers starts at 0, which wastes a step and gives a
    one-step iteration no update at all), and the decay ends one step before
    reaching 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress  # linear


def optimizer_steps(n_items: int, training: StepSettings) -> int:
    """Optimizer steps an iteration of ``n_items`` examples takes (as the trainer counts them)."""
    per_epoch = max(1, math.ceil(math.ceil(n_items / training.batch_size) / training.gradient_accumulation_steps))
    return max(1, math.ceil(training.epochs * per_epoch))


def dpo_steps(cfg, iteration: int) -> StepSettings:
    """The size and schedule of DPO iteration ``iteration``: [training] with that iteration's
    learning rate (``Config.learning_rate_for``). An SFT stage brings its own (``SftSection``)."""
    values = {f.name: getattr(cfg.training, f.name) for f in fields(StepSettings)}
    return StepSettings(**{**values, "learning_rate": cfg.learning_rate_for(iteration)})
