"""A trl trainer as the harness runs it, for any training stage (DPO or SFT).

Builds the trainer's arguments from the experiment (``trainer_args``) and the
trainer itself with the harness's learning-rate schedule (``make_trainer``), and
runs it with its guards (``run_trainer``): a non-finite loss aborts (the stage
stays unfinished); training that leaves the adapter unchanged is an error; peak
memory, steps and every token trained (into the stage's cost, ``harness.store.cost``)
are recorded; progress goes to the stage's terminal line.

Dropout: only the adapter being trained drops out (``lora.dropout``); the base
model's own dropout and a frozen "ref" adapter stay off, so reference log-probs
are deterministic (trl's ``disable_dropout`` would also zero ``lora.dropout``).

Precision: the trained adapter is float32, also on a quantized (QLoRA) base, where trl casts it
to bfloat16 while building its trainer (``float32_adapter`` undoes that).

Not here: what a stage trains on and what its reference is (``harness.train.dpo``,
``harness.train.sft``), reference log-probs (``harness.train.reference``), the
schedule's arithmetic (``harness.train.schedule``).
"""

from __future__ import annotations

import math
import resource
import time
from functools import partial
from pathlib import Path

import torch
from transformers import TrainerCallback

from harness.store import cost
from harness.train import tracking
from harness.config.experiment import StepSettings
from harness.train.schedule import dpo_steps, lr_factor, warmup_steps


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


def lora_config(section):
    from peft import LoraConfig

    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=list(section.target_modules), task_type="CAUSAL_LM")


def trainer_args(cls, cfg, out_dir: Path, iteration: int, settings: StepSettings | None = None, **extra):
    """trl's arguments of class ``cls`` for a stage of ``settings`` (default: DPO iteration
    ``iteration``'s); the optimizer, clipping and checkpointing come from [training]."""
    t = cfg.training
    s = settings or dpo_steps(cfg, iteration)
    on_cuda = torch.cuda.is_available() and cfg.model.device != "cpu"
    return cls(
        output_dir=str(out_dir / "trainer"), per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps, learning_rate=s.learning_rate,
        num_train_epochs=s.epochs, lr_scheduler_type=s.lr_scheduler,  # applied by _Schedule
        optim=t.optimizer, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, max_length=s.max_length,
        gradient_checkpointing=t.gradient_checkpointing, seed=cfg.experiment.seed + iteration,
        data_seed=cfg.experiment.seed + iteration, use_cpu=not on_cuda,
        bf16=on_cuda and cfg.model.dtype == "bfloat16", fp16=False, save_strategy="no",
        logging_steps=1, disable_tqdm=False, dataset_num_proc=None, **_reporting(), **extra)


def _reporting() -> dict:
    """trl's reporting arguments: the running loop's trackers (``harness.train.tracking``), else none.
    Read from the tracker, not from ``cfg``: no stage records [tracking] as one of its inputs."""
    tracker = tracking.active()
    return tracker.trainer_settings() if tracker is not None else {"report_to": "none"}


def make_trainer(cls, settings: StepSettings, lora_dropout: float, **kwargs):
    """A trl trainer of class ``cls`` that uses the harness's learning-rate schedule and
    drops out only on the trained adapter."""
    kept = _float32_trainables(kwargs.get("model"))
    trainer = type(cls.__name__, (_Schedule, cls), {})(**kwargs)
    trainer.schedule = (settings.lr_scheduler, settings.warmup_ratio)
    float32_adapter(trainer.model, kept)
    only_adapter_dropout(trainer.model, lora_dropout)
    return trainer


def _float32_trainables(model) -> dict[str, torch.Tensor]:
    """Copies of the float32 trainable parameters of a quantized ``model`` (its adapter: small;
    its base weights are frozen), by name; {} for any other model (trl casts nothing there)."""
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return {}
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.dtype == torch.float32}


def float32_adapter(model, kept: dict[str, torch.Tensor]) -> None:
    """Every trainable parameter of ``model`` in float32 again after trl built its trainer.

    trl (1.16) casts a quantized model's trainable parameters to bfloat16 in its trainers'
    ``__init__``. At DPO learning rates an Adam step (~lr) is below half of bfloat16's spacing
    at typical lora_A values (6.1e-5 near 0.013), so lora_A would never move, and a continued
    adapter would lose what earlier iterations taught it below that spacing. The cast is
    undone after construction, not prevented: trl keys it on the model's
    ``is_loaded_in_4bit`` / ``8bit``, which transformers' Trainer reads too, and the optimizer
    is built only in ``train()``, so it sees float32 parameters. A parameter that was float32
    before (``kept``) gets back its exact values, not the bfloat16 rounding; others are cast.
    On a model whose trainable parameters are float32 already this changes nothing."""
    for name, param in model.named_parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            before = kept.get(name)
            param.data = before.to(param.device) if before is not None else param.data.float()


def only_adapter_dropout(model, p: float, adapter: str = "default") -> None:
    """Dropout ``p`` on the trained adapter's input (peft's ``lora_dropout[adapter]``) and
    none anywhere else: not in the base model (its nn.Dropout modules and the attention
    dropout its config may set) and not in a frozen reference adapter."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p if name.endswith(f"lora_dropout.{adapter}") else 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def prepare_policy(model, cfg, iteration: int):
    """Arguments for trl: (model, peft_config) for the chain in use. A first adapter created
    here (continue chain) is initialised under the seed trl uses for the stage
    (experiment.seed + iteration), as trl's own adapter of the merge chain is."""
    from peft import PeftModel, get_peft_model
    from transformers import set_seed

    if isinstance(model, PeftModel):      # continue chain with an existing adapter
        return model, None
    if cfg.chain == "continue":           # continue chain, first adapter (on a quantized base
        set_seed(cfg.experiment.seed + iteration)  # prepared at load: harness.models.load.load_base)
        return get_peft_model(model, lora_config(cfg.lora)), None
    return model, lora_config(cfg.lora)   # merge chain: trl adds a fresh adapter


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
        from harness.console import terminal as console

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


class _TokenCount:
    """A trainer's collator that counts the tokens of every batch it builds (non-padding:
    prompt + completion, both sequences of a DPO pair) into ``tokens`` and the stage's cost."""

    def __init__(self, collate):
        self.collate = collate
        self.tokens = 0

    def __call__(self, examples):
        batch = self.collate(examples)
        mask = batch.get("attention_mask")
        n = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        self.tokens += n
        cost.add(train_tokens=n)
        return batch


def run_trainer(trainer, out_dir: Path) -> dict:
    """Train, save ``out_dir/adapter`` (the trained adapter only) and return the metrics
    ("train/..." and the ``log_history``)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    guard = _FiniteLossGuard()
    trainer.add_callback(guard)
    trainer.remove_callback(ProgressCallback)  # reporting: harness.console.terminal's line, not tqdm / prints
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_Progress())
    tracker = tracking.active()
    for callback in tracker.callbacks(out_dir) if tracker is not None else []:
        trainer.add_callback(callback)  # TensorBoard's per-step curves, in the run's tracking directory
    before = _adapter_state(trainer.model)
    t0 = time.perf_counter()
    counter = trainer.data_collator = _TokenCount(trainer.data_collator)
    try:
        trainer.train()
    finally:
        trainer.data_collator = counter.collate
    after = _adapter_state(trainer.model)
    if not any(not torch.equal(before[k], after[k]) for k in before):
        raise TrainingError("training left the adapter unchanged (zero learning rate or no trainable pairs?)")
    model = trainer.model
    names = ["default"] if "default" in getattr(model, "peft_config", {}) else None
    model.save_pretrained(str(out_dir / "adapter"), selected_adapters=names)
    losses = [h["loss"] for h in guard.history if "loss" in h]
    return {"train/loss": losses[-1] if losses else None, "train/loss_first": losses[0] if losses else None,
            "train/steps": trainer.state.global_step, "train/seconds": time.perf_counter() - t0,
            "train/tokens": counter.tokens,
            "train/peak_memory_mb": _peak_memory_mb(), "log_history": guard.history}
