"""Everything about an experiment that can be known before a model loads.

``harness validate`` and the start of ``harness run`` call ``check``: files exist,
parse and have the named columns; the model resolves and its LoRA target modules
exist (the model is built from its config on the meta device: no weights load);
lm-eval tasks exist; a selection metric is one the [eval.validation] evaluations
produce (never a reported result: choosing on those would peek at them); the run
directory is a safe, writable path; the device exists; an HTTP judge has its key.
Every problem is collected, each as a ``FieldError`` with its dotted path.
Warnings (e.g. an iteration with very few optimizer steps) do not fail.

Tiny-world files are ours; when the world is not built yet their contents are
not read (building it is compute), only their names are checked.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from harness.train import tracking
from harness.config.experiment import Config, JudgeSection, judge_sections
from harness.models.data import DataError, hub_split_files, load_examples, read_records, text_column
from harness.evaluate import load_eval_prompts
from harness.evaluate.alpaca_instructions import HUB_SET, hub_instructions, load_instructions, section_instructions
from harness.evaluate.lm_eval_adapter import task_metrics, task_problems
from harness.judges import JUDGES
from harness.judges.kind import Checks
from harness.judges.judging import side_by_side
from harness.methods import METHODS
from harness.metrics import ALPACA_EVAL, INDICATORS, MT_BENCH, produced_by
from harness.config.schema import FieldError
from harness.run.selection import metric_names as validation_metric_names
from harness.models.sources import HubFileMissing, hub_online, is_built, is_tiny_ref, resolve_ref, tiny_problem
from harness.store.files import special_file
from harness.train import optimizer_steps
from harness.validate.model import _device, _model
from harness.validate.values import check_values
from harness.validate.report import HUB_MODEL, Report, hub_file_missing, hub_off, hub_ok

MIN_STEPS = 4  # fewer optimizer steps per iteration than this gets a warning
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def check(cfg: Config, *, check_endpoints: bool = False) -> Report:
    r = Report()
    method = METHODS.get(cfg.method.name)
    _paths(cfg, r)
    _guarded(r, "experiment", check_values, cfg, method, r.errors, r.warnings)
    _device(cfg, r)
    _model(cfg, r)
    examples = _guarded(r, "data.train", _data, cfg, r)
    if examples is not None:
        _guarded(r, f"method.{cfg.method.name}", _inputs, cfg, method, examples, r)
        _steps(cfg, method, len(examples), r)
    _guarded(r, "eval", _files, cfg, r)
    _evaluation(cfg, r)
    validation = _guarded(r, "eval.validation", _validation, cfg, r)
    for where, metric in method.metric_refs(cfg):
        if validation is not None and metric not in validation and not _builtin_task_metric(metric, validation):
            near = sorted(m for m in validation if not m.endswith("_stderr"))
            r.errors.append(FieldError(where, (
                f"{metric!r} is not a metric the [eval.validation] evaluations produce (an iterate is chosen on "
                f"validation data, never on the reported results); they produce: "
                f"{', '.join(near) or 'none (configure eval.validation)'}")))
    for where, judge in _judges_in_use(cfg):
        _judge(cfg, where, judge, r, check_endpoints)
    r.errors.extend(tracking.problems(cfg.tracking.report_to))  # a tracker's package is installed
    return r


def _judges_in_use(cfg: Config) -> list[tuple[str, JudgeSection]]:
    v = cfg.eval.validation
    used = {"judge": cfg.judge.name != "none", "eval.alpaca_eval.judge": bool(cfg.eval.alpaca_eval.instructions),
            "eval.validation.alpaca_eval.judge": bool(v.alpaca_eval.instructions),
            "eval.validation.judge": bool(v.prompts), "eval.mt_bench.judge": cfg.eval.mt_bench.enabled}
    return [(where, judge) for where, judge in judge_sections(cfg) if used[where]]


# ---- files and data --------------------------------------------------------------

def _guarded(r: Report, where: str, fn, *args):
    """``fn(*args)``; an unexpected exception (a bug, or a file no check foresaw) becomes one
    error at ``where`` instead of ending the validation of everything else."""
    try:
        return fn(*args)
    except DataError as e:
        r.errors.append(FieldError(*_split_where(str(e), where)))
    except Exception as e:  # noqa: BLE001 - reported, never a traceback
        r.errors.append(FieldError(where, f"could not be checked: {type(e).__name__}: {e}"))
    return None


def _inputs(cfg: Config, method, examples: list, r: Report) -> None:
    """The method's checks of its data. When it finds rows without their answer (SPIN), the
    first such row is named as FILE:LINE too."""
    errors = method.check_inputs(cfg, examples)
    r.errors += errors
    if any(e.path == "data.response_field" for e in errors):
        try:
            load_examples(cfg.data, seed=cfg.experiment.seed, require_response=True)
        except DataError as e:
            r.errors.append(FieldError(*_split_where(str(e), "data.train")))


def rows_problems(ref: str, where: str, columns: tuple[str, ...], split: str | None = None) -> list[FieldError]:
    """A local data file read as the harness reads rows (``data.read_records``): each problem
    as FILE:LINE (invalid UTF-8, a line that is not a JSON object, a required text column that
    is missing, null or not a string). Files of other types are left to their loader. With
    ``split``, ``ref`` is a hub dataset whose split's files are read (from the local cache)."""
    if split is None and Path(resolve_ref(ref)).suffix not in (".jsonl", ".json", ".parquet"):
        return []
    try:
        for n, row in enumerate(read_records(ref, where=where, split=split or "train")):
            for column in columns:
                text_column(row, column, where, n=n)
    except DataError as e:
        return [FieldError(*_split_where(str(e), where))]
    return []

def tiny_available(ref: str, where: str, r: Report) -> Path | None:
    """The built path of a tiny-world reference, None when unknown (an error) or not built yet."""
    problem = tiny_problem(ref)
    if problem:
        r.errors.append(FieldError(where, problem))
        return None
    return Path(resolve_ref(ref)) if is_built(ref) else None


def readable(ref: str, where: str, r: Report) -> Path | None:
    """A local file or directory reference that exists, or None (with an error, except
    for a tiny-world file that is not built yet)."""
    if is_tiny_ref(ref):
        return tiny_available(ref, where, r)
    path = Path(ref).expanduser()
    if not path.exists():
        r.errors.append(FieldError(where, f"file not found: {path}"))
        return None
    kind = special_file(path)
    if kind:  # never opened: reading a FIFO or a device would hang validate, and the run after it
        r.errors.append(FieldError(where, f"{path} is {kind}, not a regular file"))
        return None
    return path


def _data(cfg: Config, r: Report) -> list | None:
    ref = cfg.data.train
    if is_tiny_ref(ref):
        if tiny_available(ref, "data.train", r) is None:
            return None
    elif not Path(ref).expanduser().exists() and (Path(ref).suffix in (".jsonl", ".json", ".parquet")
                                                   or ref.startswith(("/", ".", "~"))):
        r.errors.append(FieldError("data.train", f"file not found: {ref}"))
        return None
    elif not Path(ref).expanduser().exists():  # a hub dataset id: checked here only from the local cache
        if not _hub_cached(cfg, r, "data.train", lambda: hub_split_files(ref, cfg.data.split, cfg.data.revision)):
            return None
    try:
        examples = load_examples(cfg.data, seed=cfg.experiment.seed)
    except DataError as e:
        r.errors.append(FieldError(*_split_where(str(e), "data.train")))
        return None
    if not examples:  # the run would fail at iteration 1's first stage, with nothing to sample from
        r.errors.append(FieldError("data.train", f"{resolve_ref(ref)} has no rows; a run needs prompts to train on"))
        return None
    if cfg.data.num_prompts > len(examples):
        r.warnings.append(FieldError("data.num_prompts", (
            f"{cfg.data.num_prompts} but {ref} has {len(examples)} prompts: all {len(examples)} are used")))
    return examples


def _split_where(message: str, default: str) -> tuple[str, str]:
    """DataError messages start with their dotted path ("data.prompt_field: ...")."""
    head, sep, rest = message.partition(": ")
    if sep and re.fullmatch(r"[a-z_]+(\.[a-z_]+)*", head):
        return head, rest
    return default, message


def _files(cfg: Config, r: Report) -> None:
    if cfg.model.chat_template and (found := readable(cfg.model.chat_template, "model.chat_template", r)) \
            and found.is_dir():
        r.errors.append(FieldError("model.chat_template", f"{found} is a directory; give a Jinja template file"))
    _instructions(cfg, r, cfg.eval.alpaca_eval, "eval.alpaca_eval.instructions")
    if cfg.eval.eval_prompts and readable(cfg.eval.eval_prompts, "eval.eval_prompts", r) is not None:
        _loads(r, "eval.eval_prompts", cfg.eval.eval_prompts, ("prompt",), lambda: load_eval_prompts(cfg.eval.eval_prompts))


def _instructions(cfg, r, ae, where: str) -> None:
    """The AlpacaEval instructions of section ``ae`` (``where``: its dotted path): the hub set
    found in the local cache, or a readable file; either loads with its columns."""
    if ae.instructions == HUB_SET:
        if _hub_cached(cfg, r, where, lambda: hub_instructions(ae.revision)):
            _loads(r, where, HUB_SET, ("instruction", "output"), lambda: section_instructions(ae))
    elif ae.instructions and readable(ae.instructions, where, r) is not None:
        _loads(r, where, ae.instructions, ("instruction", "output"), lambda: load_instructions(ae.instructions, ae.limit))


def _hub_cached(cfg: Config, r: Report, where: str, fetch) -> bool:
    """Whether hub files are here to be checked: with the hub off, ``fetch()`` finds them in the
    local Hugging Face cache (``sources.hub_files``), or the missing file is named
    (``hub_file_missing``); with the hub on they are downloaded at run time, not by validate
    (False: their contents are not checked)."""
    if hub_online():
        return False
    try:
        fetch()
    except HubFileMissing as e:
        hub_file_missing(cfg, r, where, str(e))
        return False
    return True


def _loads(r: Report, where: str, ref: str, columns: tuple[str, ...], load) -> None:
    """The file's rows (``rows_problems``: FILE:LINE), then its own loader's checks."""
    problems = rows_problems(ref, where, columns)
    if problems:
        r.errors += problems
        return
    try:
        rows = load()
    except (OSError, ValueError) as e:
        r.errors.append(FieldError(*_split_where(str(e), where)))
        return
    if not rows:  # an evaluation of nothing: its stage would fail on coverage or divide by zero
        r.errors.append(FieldError(where, f"{resolve_ref(ref)} has no rows"))


def _steps(cfg: Config, method, n_examples: int, r: Report) -> None:
    """Warn when an iteration trains only a handful of optimizer steps."""
    n_pairs = method.max_pairs(cfg, n_examples)
    if n_pairs is None:
        return
    steps = optimizer_steps(n_pairs, cfg.training)
    if steps < MIN_STEPS:
        r.warnings.append(FieldError("training.batch_size", (
            f"iteration 1 trains at most {n_pairs} pairs: {steps} optimizer step(s) with batch_size "
            f"{cfg.training.batch_size} x gradient_accumulation_steps {cfg.training.gradient_accumulation_steps} "
            f"x epochs {cfg.training.epochs:g}; use more prompts or a smaller batch")))


# ---- paths, device, model --------------------------------------------------------

def _paths(cfg: Config, r: Report) -> None:
    name = cfg.experiment.name
    if not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        r.errors.append(FieldError("experiment.name", (
            f"{name!r} must be one safe path component (letters, digits, '.', '_', '-', '+'; no '/' or '..'): "
            "it names the run directory inside output_dir")))
    out = Path(cfg.experiment.output_dir).expanduser()
    probe = out
    while not os.path.exists(probe) and probe != probe.parent:  # False, not OSError, for a name too long
        probe = probe.parent
    if not probe.is_dir():
        r.errors.append(FieldError("experiment.output_dir", f"{probe} exists and is not a directory"))
    elif not os.access(probe, os.W_OK | os.X_OK):
        r.errors.append(FieldError("experiment.output_dir", f"{probe} is not writable"))


# ---- evaluation and judges ----------------------------------------------------------

def _evaluation(cfg: Config, r: Report) -> set[str] | None:
    """The flat metric names the evaluations will produce (None when unknown)."""
    produced: set[str] = set()
    specs = cfg.eval.lm_eval_tasks
    for i, spec in enumerate(specs):
        if is_tiny_ref(spec) and tiny_available(spec, f"eval.lm_eval_tasks[{i}]", r) is None:
            return None  # an unknown name (reported) or a world not built yet: metrics unknown
    if not _lm_eval_tasks(specs, cfg.eval.num_fewshot, "eval", r):
        return None
    try:
        for task, metric in task_metrics(specs):
            produced |= {f"lm_eval/{task}/{metric}", f"lm_eval/{task}/{metric}_stderr"}
    except (FileNotFoundError, KeyError) as e:
        r.errors.append(FieldError(*_split_where(str(e).strip("'\""), "eval.lm_eval_tasks")))
        return None
    if cfg.eval.alpaca_eval.instructions:
        produced |= set(produced_by(ALPACA_EVAL))  # the metrics the evaluation writes (harness.metrics)
    if cfg.eval.indicators.num_prompts:
        produced |= set(produced_by(INDICATORS))
    if cfg.eval.mt_bench.enabled:
        produced |= set(produced_by(MT_BENCH))
    return produced


def _validation(cfg: Config, r: Report) -> set[str] | None:
    """The "validation/..." metric names [eval.validation] will produce (None when unknown)."""
    v = cfg.eval.validation
    for i, spec in enumerate(v.lm_eval_tasks):
        if spec in cfg.eval.lm_eval_tasks:
            r.errors.append(FieldError(f"eval.validation.lm_eval_tasks[{i}]", (
                f"{spec!r} is also a reported task (eval.lm_eval_tasks): validation must be disjoint from the "
                "reported results")))
    if v.alpaca_eval.instructions and v.alpaca_eval.instructions == cfg.eval.alpaca_eval.instructions:
        r.errors.append(FieldError("eval.validation.alpaca_eval.instructions", (
            "the same instructions as eval.alpaca_eval (also a reported result): validation must be disjoint")))
    for i, spec in enumerate(v.lm_eval_tasks):
        if is_tiny_ref(spec) and tiny_available(spec, f"eval.validation.lm_eval_tasks[{i}]", r) is None:
            return None
    if not _lm_eval_tasks(v.lm_eval_tasks, v.num_fewshot, "eval.validation", r):
        return None
    if v.prompts:
        from harness.methods.base import file_problems

        local = is_tiny_ref(v.prompts) or Path(v.prompts).suffix in (".jsonl", ".json", ".parquet") \
            or v.prompts.startswith(("/", ".", "~")) or Path(v.prompts).expanduser().exists()
        if not local:  # a hub dataset id: checked here only from the local cache
            if _hub_cached(cfg, r, "eval.validation.prompts",
                           lambda: hub_split_files(v.prompts, v.split, where="eval.validation.prompts")):
                r.errors += rows_problems(v.prompts, "eval.validation.prompts", ("prompt",), split=v.split)
        elif readable(v.prompts, "eval.validation.prompts", r) is not None:
            r.errors += rows_problems(v.prompts, "eval.validation.prompts", ("prompt",)) \
                or file_problems(v.prompts, "eval.validation.prompts", ("prompt",))[1]
    _instructions(cfg, r, v.alpaca_eval, "eval.validation.alpaca_eval.instructions")
    try:
        return validation_metric_names(v)
    except (FileNotFoundError, KeyError) as e:
        r.errors.append(FieldError(*_split_where(str(e).strip("'\""), "eval.validation.lm_eval_tasks")))
        return None


def _lm_eval_tasks(specs: tuple[str, ...], shots, section: str, r: Report) -> bool:
    """Build the configuration of every lm-eval task ``specs`` names, as lm-eval does but
    without its data: each problem (a bad YAML, a task whose code needs a package that is not
    installed, ...) is an error of its spec, ``<section>.lm_eval_tasks[i]``. A per-task
    ``<section>.num_fewshot`` table must name tasks or groups that run. False when a spec failed."""
    problems, names = task_problems(specs)
    for i, problem in problems:
        r.errors.append(FieldError(f"{section}.lm_eval_tasks[{i}]", problem))
    if isinstance(shots, dict) and not problems:
        for name in sorted(set(shots) - names):
            hint = difflib.get_close_matches(name, sorted(names), n=1)
            r.errors.append(FieldError(f"{section}.num_fewshot.{name}", (
                f"not a task or group of {section}.lm_eval_tasks"
                + (f"; did you mean {hint[0]!r}?" if hint else f" ({', '.join(sorted(names)) or 'none'})"))))
    return not problems


def _builtin_task_metric(metric: str, produced: set[str]) -> bool:
    """A task whose YAML could not be read ("*"): its metric names are known once it loads."""
    return any(m.endswith("/*") and "lm_eval/" in m and metric.startswith(m[:-1]) for m in produced)


def _judge(cfg: Config, where: str, judge: JudgeSection, r: Report, check_endpoints: bool) -> None:
    """The judge kind's pre-flight checks (``JudgeKind.preflight``) into the report."""
    def hub_model(path: str, repo: str, revision: str) -> None:
        if not hub_ok(repo, revision):
            hub_off(cfg, r, path, repo, *HUB_MODEL)

    checks = Checks(check_endpoints, readable=lambda ref, path: readable(ref, path, r), hub_model=hub_model)
    kind = JUDGES.get(judge.name)
    kind.preflight(judge.options, f"{where}.{judge.name}", checks)
    if where == "judge" and side_by_side(cfg) and hasattr(kind, "group") and not judge.options.group_template:
        try:
            group = kind.group(judge.options, f"{where}.{judge.name}")
        except ValueError:
            group = ""  # reported by the template's own check
        if group is None:
            r.errors.append(FieldError(f"{where}.{judge.name}.group_template", (
                f"judging side by side (method.{cfg.method.name}.judging = \"group\") needs a group template, and "
                f"the template {judge.options.template!r} has no built-in group form; give one with "
                "{instruction} and {responses}")))
    r.errors += checks.errors
    for need, problem in checks.unmet:
        r.environment(cfg, need, problem)
