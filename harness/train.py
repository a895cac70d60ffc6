"""DPO-family training on (chosen, rejected) pairs, and SFT, with LoRA / QLoRA, via trl.

The reference of iteration t+1 is exactly the model of iteration t:
- merge chain: the policy is base + merged earlier adapters, trl adds a fresh
  adapter (peft_config) and uses the adapter-disabled model as reference;
- continue chain: the policy is a PeftModel whose "default" adapter starts as a
  copy of adapter_t; trl adds a frozen "ref" copy of it as the reference.
Guards: a non-finite loss aborts (the stage stays unfinished); training that
leaves the adapter unchanged is an error; peak memory is recorded.
"""

from __future__ import annotations

import math
import resource
import time
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from transformers import TrainerCallback

from harness.generate import sequence_logprobs


class TrainingError(RuntimeError):
    pass


class _FiniteLossGuard(TrainerCallback):
    def __init__(self):
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            if not math.isfinite(logs["loss"]):
                raise TrainingError(f"non-finite training loss {logs['loss']} at step {state.global_step}; "
                                    "the stage is left unfinished (lower the learning rate or check the data)")
            self.history.append({k: v for k, v in logs.items() if isinstance(v, (int, float))})


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


class _Schedule:
    """Mixin for trl trainers: the learning-rate schedule of ``lr_factor``."""
    schedule = ("linear", 0.0)  # (name, warmup ratio)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            name, ratio = self.schedule
            warmup = warmup_steps(ratio, num_training_steps)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, partial(lr_factor, name, warmup, num_training_steps))
            self._created_lr_scheduler = True
        return self.lr_scheduler


def optimizer_steps(n_items: int, training) -> int:
    """Optimizer steps an iteration of ``n_items`` examples takes (as the trainer counts them)."""
    per_epoch = max(1, math.ceil(math.ceil(n_items / training.batch_size) / training.gradient_accumulation_steps))
    return max(1, math.ceil(training.epochs * per_epoch))


def lora_config(section):
    from peft import LoraConfig

    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=list(section.target_modules), task_type="CAUSAL_LM")


def _trainer_args(cls, cfg, out_dir: Path, iteration: int, **extra):
    t = cfg.training
    on_cuda = torch.cuda.is_available() and cfg.model.device != "cpu"
    return cls(
        output_dir=str(out_dir / "trainer"), per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=cfg.learning_rate_for(iteration),
        num_train_epochs=t.epochs, lr_scheduler_type=t.lr_scheduler,  # applied by _Schedule
        optim=t.optimizer, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, max_length=t.max_length,
        gradient_checkpointing=t.gradient_checkpointing, seed=cfg.experiment.seed + iteration,
        data_seed=cfg.experiment.seed + iteration, use_cpu=not on_cuda,
        bf16=on_cuda and cfg.model.dtype == "bfloat16", fp16=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=False, dataset_num_proc=None, **extra)


def _trainer(cls, cfg, **kwargs):
    """A trl trainer of class ``cls`` that uses the harness's learning-rate schedule."""
    trainer = type(cls.__name__, (_Schedule, cls), {})(**kwargs)
    trainer.schedule = (cfg.training.lr_scheduler, cfg.training.warmup_ratio)
    return trainer


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()
            if "lora_" in n and ".ref." not in n}


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Progress(TrainerCallback):
    """Optimizer steps (and the latest loss) as a progress bar in the stage's terminal line,
    in place of the Trainer's own tqdm bar and printed log dicts."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        from harness import console

        self.bar = console.progress(total=state.max_steps, initial=state.global_step, desc="train", unit="steps")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and isinstance(logs.get("loss"), (int, float)):
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run(trainer, out_dir: Path) -> dict:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    guard = _FiniteLossGuard()
    trainer.add_callback(guard)
    trainer.remove_callback(ProgressCallback)  # reporting: harness.console's line, not tqdm / prints
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_Progress())
    before = _adapter_state(trainer.model)
    t0 = time.perf_counter()
    trainer.train()
    after = _adapter_state(trainer.model)
    if not any(not torch.equal(before[k], after[k]) for k in before):
        raise TrainingError("training left the adapter unchanged (zero learning rate or no trainable pairs?)")
    model = trainer.model
    names = ["default"] if "default" in getattr(model, "peft_config", {}) else None
    model.save_pretrained(str(out_dir / "adapter"), selected_adapters=names)
    losses = [h["loss"] for h in guard.history if "loss" in h]
    return {"train/loss": losses[-1] if losses else None, "train/loss_first": losses[0] if losses else None,
            "train/steps": trainer.state.global_step, "train/seconds": time.perf_counter() - t0,
            "train/peak_memory_mb": _peak_memory_mb(), "log_history": guard.history}


def _prepare_policy(model, cfg):
    """Arguments for trl: (model, peft_config) for the chain in use."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if isinstance(model, PeftModel):      # continue chain with an existing adapter
        return model, None
    if cfg.chain == "continue":           # continue chain, first adapter
        if cfg.model.quantization != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)
        return get_peft_model(model, lora_config(cfg.lora)), None
    return model, lora_config(cfg.lora)   # merge chain: trl adds a fresh adapter


def pair_logps(model, tokenizer, pairs: Sequence[dict], max_length: int) -> tuple[list[float], list[float]]:
    prompts = [p["messages"] for p in pairs]
    return (sequence_logprobs(model, tokenizer, prompts, [p["chosen"] for p in pairs], max_length=max_length),
            sequence_logprobs(model, tokenizer, prompts, [p["rejected"] for p in pairs], max_length=max_length))


def train_dpo(model, tokenizer, pairs: Sequence[dict], cfg, iteration: int, out_dir: Path,
              probe_size: int = 256) -> tuple[dict, object]:
    """Train one iteration on pairs {messages, chosen, rejected}; save ``out_dir/adapter``.
    Returns (metrics, the trained in-memory model).

    Reports, on up to ``probe_size`` pairs, the log-likelihoods before and after,
    the fraction of pairs the model already preferred (logp chosen > logp
    rejected) before training, and the implicit reward margin after training
    (beta * change of the chosen-minus-rejected log-ratio; reference = before).
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise TrainingError("no training pairs for this iteration")
    probe = list(pairs[:probe_size])
    c0, r0 = pair_logps(model, tokenizer, probe, cfg.training.max_length)
    data = Dataset.from_list([{"prompt": list(p["messages"]), "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    policy, peft_config = _prepare_policy(model, cfg)
    args = _trainer_args(DPOConfig, cfg, out_dir, iteration, beta=cfg.method.beta, loss_type=[cfg.method.loss])
    trainer = _trainer(DPOTrainer, cfg, model=policy, args=args, train_dataset=data, processing_class=tokenizer,
                       peft_config=peft_config)
    metrics = _run(trainer, out_dir)
    c1, r1 = pair_logps(trainer.model, tokenizer, probe, cfg.training.max_length)
    n = len(probe)
    beta = cfg.method.beta
    margins = [beta * ((c1[i] - c0[i]) - (r1[i] - r0[i])) for i in range(n)]
    metrics.update({
        "train/n_pairs": len(pairs),
        "train/prefers_chosen_before": sum(c0[i] > r0[i] for i in range(n)) / n,
        "train/prefers_chosen_after": sum(c1[i] > r1[i] for i in range(n)) / n,
        "train/logp_chosen_before": sum(c0) / n, "train/logp_rejected_before": sum(r0) / n,
        "train/logp_chosen": sum(c1) / n, "train/logp_rejected": sum(r1) / n,
        "train/reward_margin": sum(margins) / n,
        "train/reward_accuracy": sum(m > 0 for m in margins) / n,
    })
    return metrics, trainer.model


def train_sft(model, tokenizer, examples: Sequence[dict], cfg, iteration: int, out_dir: Path,
              max_steps: int = -1) -> dict:
    """Supervised LoRA fine-tuning on {messages, response} (Self-Rewarding's M1 stage; the SFT
    control of the SPIN benchmark). Loss on the answer only. ``max_steps`` > 0 overrides epochs."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if not examples:
        raise TrainingError("no SFT examples")
    data = Dataset.from_list([{"prompt": list(e["messages"]), "completion": [{"role": "assistant", "content": e["response"]}]}
                              for e in examples])
    policy, peft_config = _prepare_policy(model, cfg)
    args = _trainer_args(SFTConfig, cfg, out_dir, iteration, completion_only_loss=True, packing=False,
                         max_steps=max_steps)
    trainer = _trainer(SFTTrainer, cfg, model=policy, args=args, train_dataset=data, processing_class=tokenizer,
                       peft_config=peft_config)
    return _run(trainer, out_dir)
