"""DPO-family training on (chosen, rejected) pairs, and SFT, with LoRA / QLoRA, via trl.

The reference of iteration t+1 is exactly the model of iteration t
(``method.reference = "previous"``):
- merge chain: the policy is base + merged earlier adapters, trl adds a fresh
  adapter (peft_config) and uses the adapter-disabled model as reference;
- continue chain: the policy is a PeftModel whose "default" adapter starts as a
  copy of adapter_t; trl adds a frozen "ref" copy of it as the reference.
With ``method.reference = "base"`` the loop passes the iteration-0 chain of
adapters (``reference``) and the reference is that model instead: merge -- a
separately loaded, frozen copy handed to trl as ``ref_model``; continue -- the
"ref" adapter is replaced by the iteration-0 adapter, or removed so that the
adapter-disabled (quantized) base is the reference.

The reference is frozen for a whole iteration, so its log-probs of the training pairs
are computed once before training (``precompute_reference``) and trl reads them from
the dataset: no step runs a reference forward. Every step and every token trained is
counted into the stage's cost (``harness.cost``).

Dropout: only the adapter being trained drops out (``lora.dropout``); the base
model's own dropout and a frozen "ref" adapter stay off, so reference log-probs
are deterministic (trl's ``disable_dropout`` would also zero ``lora.dropout``).
Guards: a non-finite loss aborts (the stage stays unfinished); training that
leaves the adapter unchanged is an error; peak memory is recorded.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from transformers import TrainerCallback

from harness import cost
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


@dataclass(frozen=True)
class StepSettings:
    """The size and schedule of one training stage: [training] with the iteration's
    learning rate for DPO, ``SftSection`` for an SFT stage."""
    learning_rate: float
    epochs: float
    batch_size: int
    gradient_accumulation_steps: int
    max_length: int
    warmup_ratio: float
    lr_scheduler: str

    @classmethod
    def dpo(cls, cfg, iteration: int) -> StepSettings:
        t = cfg.training
        return cls(cfg.learning_rate_for(iteration), t.epochs, t.batch_size, t.gradient_accumulation_steps,
                   t.max_length, t.warmup_ratio, t.lr_scheduler)

    @classmethod
    def sft(cls, section) -> StepSettings:
        return cls(section.learning_rate, section.epochs, section.batch_size, section.gradient_accumulation_steps,
                   section.max_length, section.warmup_ratio, section.lr_scheduler)


def optimizer_steps(n_items: int, training) -> int:
    """Optimizer steps an iteration of ``n_items`` examples takes (as the trainer counts them)."""
    per_epoch = max(1, math.ceil(math.ceil(n_items / training.batch_size) / training.gradient_accumulation_steps))
    return max(1, math.ceil(training.epochs * per_epoch))


def lora_config(section):
    from peft import LoraConfig

    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=list(section.target_modules), task_type="CAUSAL_LM")


def _trainer_args(cls, cfg, out_dir: Path, iteration: int, settings: StepSettings | None = None, **extra):
    t = cfg.training
    s = settings or StepSettings.dpo(cfg, iteration)
    on_cuda = torch.cuda.is_available() and cfg.model.device != "cpu"
    return cls(
        output_dir=str(out_dir / "trainer"), per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps, learning_rate=s.learning_rate,
        num_train_epochs=s.epochs, lr_scheduler_type=s.lr_scheduler,  # applied by _Schedule
        optim=t.optimizer, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, max_length=s.max_length,
        gradient_checkpointing=t.gradient_checkpointing, seed=cfg.experiment.seed + iteration,
        data_seed=cfg.experiment.seed + iteration, use_cpu=not on_cuda,
        bf16=on_cuda and cfg.model.dtype == "bfloat16", fp16=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=False, dataset_num_proc=None, **extra)


def _trainer(cls, settings: StepSettings, lora_dropout: float, **kwargs):
    """A trl trainer of class ``cls`` that uses the harness's learning-rate schedule and
    drops out only on the trained adapter."""
    trainer = type(cls.__name__, (_Schedule, cls), {})(**kwargs)
    trainer.schedule = (settings.lr_scheduler, settings.warmup_ratio)
    only_adapter_dropout(trainer.model, lora_dropout)
    return trainer


def only_adapter_dropout(model, p: float, adapter: str = "default") -> None:
    """Dropout ``p`` on the trained adapter's input (peft's ``lora_dropout[adapter]``) and
    none anywhere else: not in the base model (its nn.Dropout modules and the attention
    dropout its config may set) and not in a frozen reference adapter."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p if name.endswith(f"lora_dropout.{adapter}") else 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


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


def _run(trainer, out_dir: Path) -> dict:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    guard = _FiniteLossGuard()
    trainer.add_callback(guard)
    trainer.remove_callback(ProgressCallback)  # reporting: harness.console's line, not tqdm / prints
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_Progress())
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
    """(chosen, rejected) log-likelihoods of ``pairs`` under ``model``, in their order. Computed
    in batches of similar length (longest first), so little of the work is padding."""
    def logps(key: str) -> list[float]:
        order = sorted(range(len(pairs)), key=lambda i: -(len(str(pairs[i]["messages"])) + len(pairs[i][key])))
        got = sequence_logprobs(model, tokenizer, [pairs[i]["messages"] for i in order],
                                [pairs[i][key] for i in order], max_length=max_length)
        out = [0.0] * len(pairs)
        for i, v in zip(order, got):
            out[i] = v
        return out

    return logps("chosen"), logps("rejected")


def _use_reference_adapter(model, reference: Sequence[Path]) -> None:
    """Continue chain: make the frozen "ref" adapter the model of the adapter chain
    ``reference`` (its newest adapter carries the earlier ones; none = the base)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        if reference:
            raise TrainingError("a reference adapter needs a PEFT policy (continue chain)")
        return  # a fresh adapter: trl's adapter-disabled reference is the base already
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    if reference:
        model.load_adapter(str(reference[-1]), adapter_name="ref", is_trainable=False)
    model.set_adapter("default")
    for name, param in model.named_parameters():
        if ".ref." in name:
            param.requires_grad_(False)


def reference_logps(trainer, n: int) -> tuple[list[float], list[float]]:
    """trl's own reference log-probs of the first ``n`` training pairs (chosen, rejected),
    computed the way its loss computes them, in eval mode."""
    model = trainer.ref_model or trainer.model
    device = next(trainer.model.parameters()).device
    was_training = trainer.model.training
    trainer.model.eval()
    chosen: list[float] = []
    rejected: list[float] = []
    step = trainer.args.per_device_train_batch_size
    try:
        for i in range(0, n, step):
            batch = trainer.data_collator([trainer.train_dataset[j] for j in range(i, min(n, i + step))])
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            c, r = trainer.compute_ref_log_probs(model, batch)
            chosen += c.float().tolist()
            rejected += r.float().tolist()
    finally:
        trainer.model.train(was_training)
    return chosen, rejected


def precompute_reference(trainer, batch_size: int | None = None) -> tuple[list[float], list[float]]:
    """The reference log-probs of every training pair, computed once per iteration (the
    reference is frozen while an iteration trains) and handed to trl as its precomputed
    columns, so no training step runs a reference forward. Returns (chosen, rejected) in
    the order of ``trainer.train_dataset``.

    The numbers are those of trl's per-step path: ``trainer.compute_ref_log_probs`` on the
    reference the trainer holds (the adapter-disabled model, the frozen "ref" adapter, or a
    ``ref_model``), in eval mode; the reference never drops out (``only_adapter_dropout``),
    so train and eval mode agree. Call it once the reference is final (after
    ``dpo_trainer``). Only the batching differs: pairs of similar length go together
    (longest first, ``batch_size`` pairs, default twice the training batch), which changes
    the values by float rounding only. trl's own ``precompute_ref_log_probs`` runs inside
    ``DPOTrainer.__init__``, before the harness can swap in a "base" reference adapter, and
    hashes the model and writes a dataset cache file, so it is not used."""
    data = trainer.train_dataset
    n = len(data)
    size = batch_size or 2 * trainer.args.per_device_train_batch_size
    cap = trainer.args.max_length or math.inf
    lengths = [min(cap, len(p) + max(len(c), len(r)))
               for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])]
    order = sorted(range(n), key=lambda i: -lengths[i])
    model = trainer.ref_model or trainer.model
    device = next(trainer.model.parameters()).device
    chosen, rejected = [0.0] * n, [0.0] * n
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        for start in range(0, n, size):
            idx = order[start:start + size]
            batch = trainer.data_collator([data[i] for i in idx])
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            c, r = trainer.compute_ref_log_probs(model, batch)
            for i, a, b in zip(idx, c.float().tolist(), r.float().tolist()):
                chosen[i], rejected[i] = a, b
    finally:
        trainer.model.train(was_training)
    data = data.remove_columns([c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in data.column_names])
    trainer.train_dataset = data.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)
    trainer.precompute_ref_logps = True
    return chosen, rejected


def dpo_trainer(model, tokenizer, pairs: Sequence[dict], cfg, iteration: int, out_dir: Path,
                reference: Sequence[Path] | None = None, base: str | None = None):
    """trl's DPOTrainer for one iteration, its reference set up for the chain in use
    (see the module doc; ``reference`` and ``base`` as in ``train_dpo``)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{"prompt": list(p["messages"]), "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    policy, peft_config = _prepare_policy(model, cfg)
    ref_model = None
    if reference is not None and cfg.chain == "merge":
        from harness.models import load_policy

        ref_model, _ = load_policy(cfg, list(reference), tokenizer=tokenizer, base=base)
        ref_model.requires_grad_(False)
    settings = StepSettings.dpo(cfg, iteration)
    args = _trainer_args(DPOConfig, cfg, out_dir, iteration, settings, beta=cfg.method.beta,
                         loss_type=[cfg.method.loss], disable_dropout=False)  # only_adapter_dropout instead
    trainer = _trainer(DPOTrainer, settings, cfg.lora.dropout, model=policy, ref_model=ref_model, args=args,
                       train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
    if reference is not None and cfg.chain == "continue":
        _use_reference_adapter(trainer.model, reference)
    return trainer


GAP_CHECK_PAIRS = 4  # pairs on which train_dpo compares the reference with the policy before training


def train_dpo(model, tokenizer, pairs: Sequence[dict], cfg, iteration: int, out_dir: Path,
              probe_size: int = 256, reference: Sequence[Path] | None = None,
              base: str | None = None, precompute: bool = True) -> tuple[dict, object]:
    """Train one iteration on pairs {messages, chosen, rejected}; save ``out_dir/adapter``.
    Returns (metrics, the trained in-memory model).

    ``reference``: None = the model passed in is the reference (model_t, "previous");
    a chain of saved adapters = the reference is that chain's model (``method.reference
    = "base"``: the iteration-0 chain), loaded from ``base`` (the resolved base path).

    Reports, on up to ``probe_size`` pairs, the log-likelihoods before and after,
    the fraction of pairs the model already preferred (logp chosen > logp
    rejected) before training, the implicit reward margin after training
    (beta * change of the chosen-minus-rejected log-ratio; reference = before),
    and trl's own reference log-probs of those pairs: ``train/ref_gap_to_start`` is
    their largest distance to the policy's before training (0 up to float rounding
    when the reference is the previous iterate).

    ``precompute``: the reference log-probs of all pairs are computed once, before
    training (``precompute_reference``), instead of by a reference forward in every
    step. When the reference is the model passed in, those log-probs are also the
    "before" values of the probe, and the policy's own are computed on its first
    ``GAP_CHECK_PAIRS`` pairs only, for ``train/ref_gap_to_start``. The "after" values
    take one forward over the probe (counted in the stage's time).
    """
    if not pairs:
        raise TrainingError("no training pairs for this iteration")
    probe = list(pairs[:probe_size])
    max_length = cfg.training.max_length
    reuse = precompute and reference is None  # the reference's log-probs double as the "before" values
    check = probe[:GAP_CHECK_PAIRS] if reuse else probe
    t0 = time.perf_counter()
    c0, r0 = pair_logps(model, tokenizer, check, max_length)
    probe_seconds = time.perf_counter() - t0
    trainer = dpo_trainer(model, tokenizer, pairs, cfg, iteration, out_dir, reference, base)
    t0 = time.perf_counter()
    aligned = False
    if precompute:
        ref_all = precompute_reference(trainer)
        aligned = len(ref_all[0]) == len(pairs)  # trl drops pairs whose prompt alone fills max_length
    t1 = time.perf_counter()
    ref_c, ref_r = ([v[:len(probe)] for v in ref_all] if aligned else reference_logps(trainer, len(probe)))
    ref_seconds, probe_seconds = t1 - t0, probe_seconds + time.perf_counter() - t1
    k = len(check)
    gap = max(abs(a - b) for a, b in zip(ref_c[:k] + ref_r[:k], c0 + r0))
    if reuse and not aligned:
        c0, r0 = pair_logps(trainer.model, tokenizer, probe, max_length)
    elif reuse:
        c0, r0 = ref_c, ref_r
    metrics = _run(trainer, out_dir)
    t0 = time.perf_counter()
    c1, r1 = pair_logps(trainer.model, tokenizer, probe, max_length)
    probe_seconds += time.perf_counter() - t0
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
        "train/ref_logp_chosen": sum(ref_c) / n, "train/ref_logp_rejected": sum(ref_r) / n,
        "train/ref_gap_to_start": gap,
        "train/ref_precomputed": int(precompute), "train/ref_seconds": ref_seconds,
        "train/probe_seconds": probe_seconds,
    })
    return metrics, trainer.model


def train_sft(model, tokenizer, examples: Sequence[dict], cfg, iteration: int, out_dir: Path,
              max_steps: int = -1, settings=None) -> dict:
    """Supervised LoRA fine-tuning on {messages, response} (Self-Rewarding's M1 stage; the SFT
    control of the SPIN benchmark). Loss on the answer only. ``max_steps`` > 0 overrides epochs.
    ``settings``: a ``harness.config.SftSection`` (the M1 stage's own settings); None = the
    DPO settings of training iteration ``iteration`` (the SFT control of a DPO run)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if not examples:
        raise TrainingError("no SFT examples")
    data = Dataset.from_list([{"prompt": list(e["messages"]), "completion": [{"role": "assistant", "content": e["response"]}]}
                              for e in examples])
    policy, peft_config = _prepare_policy(model, cfg)
    steps = StepSettings.dpo(cfg, iteration) if settings is None else StepSettings.sft(settings)
    args = _trainer_args(SFTConfig, cfg, out_dir, iteration, steps, completion_only_loss=True, packing=False,
                         max_steps=max_steps)
    trainer = _trainer(SFTTrainer, steps, cfg.lora.dropout, model=policy, args=args, train_dataset=data,
                       processing_class=tokenizer, peft_config=peft_config)
    return _run(trainer, out_dir)
