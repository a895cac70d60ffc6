"""The ``[eval]`` sections of an experiment file: lm-eval tasks, the AlpacaEval win rate,
MT-Bench, the over-optimisation indicators and the validation evaluations that choose an
iterate. Declarations and their own checks only; the experiment's top level and the checks
across sections are ``harness.config.experiment``.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.config.annotator_configs import ANSWER_TOKENS, RUBRIC, config_problems, resolve_protocol
from harness.config.judge_section import JudgeSection
from harness.config.schema import FieldError, opt


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
