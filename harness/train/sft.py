"""Supervised LoRA fine-tuning on {messages, response}, via trl: Self-Rewarding's M1 stage
(with its own ``SftSection`` settings) and the SFT control of the SPIN benchmark (with
[training]'s). The loss is on the answer only. Prompts (EFT's judge prompts too) are fitted to the
stage's lengths first, as a DPO iteration's (``harness.train.truncate``); an answer that
still does not fit is cut at its end by trl (keep_start), and counted. Not here: the trainer's guards and
reporting (``harness.train.trainer``), DPO (``harness.train.dpo``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from harness.train.schedule import dpo_steps
from harness.train.trainer import TrainingError, make_trainer, prepare_policy, run_trainer, trainer_args
from harness.train.truncate import check_share, fit


def train_sft(model, tokenizer, examples: Sequence[dict], cfg, iteration: int, out_dir: Path,
              max_steps: int = -1, settings=None) -> dict:
    """Supervised LoRA fine-tuning on {messages, response}; save ``out_dir/adapter`` and return
    the metrics. ``max_steps`` > 0 overrides epochs. ``settings``: a ``harness.config.experiment.SftSection``
    (the M1 stage's own settings); None = the DPO settings of training iteration ``iteration``
    (the SFT control of a DPO run)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if not examples:
        raise TrainingError("no SFT examples")
    steps = dpo_steps(cfg, iteration) if settings is None else settings
    fitted = fit(tokenizer, examples, ("response",), steps.max_length, steps.prompt_limit)
    check_share(fitted, len(examples), steps, "training" if settings is None else "method.self_rewarding.sft",
                "examples")
    data = Dataset.from_list([{"prompt": list(e["messages"]), "completion": [{"role": "assistant", "content": e["response"]}]}
                              for e in fitted.items])
    policy, peft_config = prepare_policy(model, cfg, iteration)
    args = trainer_args(SFTConfig, cfg, out_dir, iteration, steps, completion_only_loss=True, packing=False,
                        max_steps=max_steps)
    trainer = make_trainer(SFTTrainer, steps, cfg.lora.dropout, model=policy, args=args, train_dataset=data,
                           processing_class=tokenizer, peft_config=peft_config)
    return {**run_trainer(trainer, out_dir), **fitted.metrics()}
