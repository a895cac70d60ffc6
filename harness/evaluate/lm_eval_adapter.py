"""lm-evaluation-harness on the in-memory model (PeftModel included), no reload from disk.

Task specs (``eval.lm_eval_tasks``), each one of:
- a built-in lm-eval task or group name ("gsm8k"): needs the hub for its data;
- a task YAML file, or a directory of task YAML files (every task in it runs);
- "tiny:<name>": an embedded tiny-world task, resolved to a file or directory.

When every spec is local, the TaskManager indexes only the given paths
(``include_defaults=False``): ~0.04 s instead of indexing ~15k built-in tasks.

The reported number per task is its *primary* metric: the first entry of the
task's ``metric_list`` under the task's first filter (``none`` when it has no
``filter_list``). Its flat name drops the filter: ``lm_eval/<task>/<metric>``
and ``lm_eval/<task>/<metric>_stderr``; ``metrics.json`` in ``out_dir`` records
which lm-eval key (``metric,filter``) each flat name came from. Groups are
not aggregated here; their leaf tasks are reported.

Few-shot examples (``num_fewshot``): unset, every task runs at its own YAML's
``num_fewshot`` (0 when it sets none), as the ``lm_eval`` command line without
``--num_fewshot``; a number is passed on as that flag (lm-eval then overrides every
task but those whose YAML sets 0); a table sets the named tasks (a group's name: each
of its tasks) and leaves the others at their own.

Files written to ``out_dir``: ``results.json`` (lm-eval's own results dict,
numpy values made plain by ``lm_eval.utils.handle_non_serializable``, as its
command line does), ``samples_<task>.jsonl`` (per-sample logs) and
``metrics.json``: the flat metrics, their lm-eval keys and, per task, the protocol
its number was made under (``protocol``): shots actually used (lm-eval's
``n-shot``), chat template, multi-turn few-shot, system instruction, lm-eval's
version, the task's own version (lm-eval's ``versions``) and the backend
(``eval.backend``: "hf" here, "vllm" from ``harness.evaluate.lm_eval_vllm``).

``task_problems`` builds every task's configuration as lm-eval's task factory does
(YAML with its includes, the task's ``!function`` code imported, fields checked by
lm-eval's ``TaskConfig``) without loading any data, so ``harness validate`` reports a
bad YAML or a task whose code needs a package that is not installed.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

from harness.config.eval_sections import EvalSection
from harness.models.sources import resolve_ref
from harness.store.files import atomic_write_json, atomic_write_text

from .lm_eval_shots import set_shots, task_manager  # noqa: F401  (set_shots: re-exported)

_LEAF_KINDS = ("TASK", "PY_TASK")

Shots = int | dict[str, int] | None  # eval.num_fewshot: unset, every task, or per task / group


def resolve_task_specs(specs: tuple[str, ...] | list[str]) -> tuple[list[str], list[str], bool]:
    """-> (specs for TaskManager.load, include paths, whether built-in tasks are needed).

    A spec that looks like a path (has a "/" or a .yaml/.yml suffix) but does not
    exist is an error naming it; it is never sent to the hub as a task name.
    """
    from lm_eval.tasks._index import TaskIndex

    load: list[str] = []
    include: list[str] = []
    builtin = False
    for spec in specs:
        ref = resolve_ref(spec) if spec.startswith("tiny:") else spec
        path = Path(ref).expanduser()
        if path.is_dir():
            index = TaskIndex.build([path.resolve()])
            names = sorted(n for n, e in index.items() if e.kind.name in _LEAF_KINDS)
            if not names:
                raise FileNotFoundError(f"eval.lm_eval_tasks: {spec!r}: no task YAML files in directory {path}")
            include.append(str(path.resolve()))
            load.extend(names)
        elif path.is_file():
            # loaded by path (lm-eval resolves its `include:`s relative to the file)
            include.append(str(path.resolve().parent))
            load.append(str(path.resolve()))
        elif "/" in spec or spec.endswith((".yaml", ".yml")) or spec.startswith("tiny:"):
            raise FileNotFoundError(f"eval.lm_eval_tasks: task file or directory {spec!r} not found ({path})")
        else:
            builtin = True
            load.append(spec)
    return load, sorted(set(include)), builtin


def task_metrics(specs: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """(task, primary metric) of every task the specs name, read from the task YAMLs
    alone (no dataset loads), as ``flat_metrics`` will report them. A task whose YAML
    cannot be read gives metric "*". Unknown names raise KeyError, missing files
    FileNotFoundError."""
    from lm_eval.tasks._index import load_yaml

    if not specs:
        return []
    load, include, builtin = resolve_task_specs(specs)
    manager = _index_manager(tuple(include), builtin)
    _check_names(load, manager.all_tasks)
    index = manager.task_index
    out = []
    for spec in load:
        entry = next((e for e in index.values() if e.yaml_path and str(e.yaml_path) == spec), None) \
            if spec.startswith("/") else index.get(spec)
        try:
            cfg = load_yaml(entry.yaml_path, resolve_func=False) if entry and entry.yaml_path else {}
        except (OSError, ValueError):
            cfg = {}
        metric_list = cfg.get("metric_list") or []
        out.append((cfg.get("task", spec), str(metric_list[0]["metric"]) if metric_list else "*"))
    return out


def _index_manager(include: tuple[str, ...], builtin: bool):
    """A TaskManager that is only read (names and YAML paths), shared by the checks of one
    process while the included directories are unchanged (a file added or removed anywhere
    in them indexes again): indexing lm-eval's built-in tasks takes ~15 s."""
    stamp = tuple((str(d), d.stat().st_mtime_ns) for p in include
                  for d in (Path(p), *Path(p).rglob("*")) if d.is_dir())
    return _cached_manager(include, builtin, stamp)


@lru_cache(maxsize=4)
def _cached_manager(include: tuple[str, ...], builtin: bool, stamp: tuple):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=builtin)


def task_problems(specs: tuple[str, ...] | list[str]) -> tuple[list[tuple[int, str]], set[str]]:
    """Build the configuration of every task each spec names, without loading data.

    -> ([(index of the spec, one-line problem)], names of the tasks and groups built). A
    spec's problems: a missing file or unknown name, a YAML that does not parse, a
    ``!function`` whose module or function cannot be imported (a task extra not
    installed, e.g. ifeval's ``langdetect``), fields lm-eval's ``TaskConfig`` rejects, an
    unknown output type or filter. A task's own code can fail in any way when imported,
    so every exception of a spec is its problem; the other specs are still checked."""
    from lm_eval.tasks._index import TaskIndex

    problems: list[tuple[int, str]] = []
    names: set[str] = set()
    resolved: list[tuple[int, list[str]]] = []
    include: set[str] = set()
    builtin = False
    for i, spec in enumerate(specs):
        try:
            load, inc, needs = resolve_task_specs([spec])
        except (FileNotFoundError, ValueError, OSError) as e:
            problems.append((i, _one_line(e)))
            continue
        resolved.append((i, load))
        include |= set(inc)
        builtin |= needs
    if not resolved:
        return problems, names
    manager = _index_manager(tuple(sorted(include)), builtin)
    index = manager.task_index
    for i, load in resolved:
        try:
            _check_names(load, manager.all_tasks)
            for name in load:
                entry = TaskIndex.entry_from_path(Path(name)) if name.startswith("/") else index[name]
                if entry is None:
                    raise _TaskProblem(f"{name}: neither a task nor a group (no 'task' or 'group' key)")
                _build_config(entry, index, names, set())
        except Exception as e:  # noqa: BLE001 -- see the docstring: a task's code may raise anything
            problems.append((i, _one_line(e)))
    return sorted(problems), names


class _TaskProblem(ValueError):
    """A problem already phrased as one line naming its task."""


def _build_config(entry, index: dict, names: set[str], seen: set[str]) -> None:
    """Build ``entry``'s configuration as lm-eval's TaskFactory would, recursing into a
    group's or tag's tasks; raises ``_TaskProblem`` naming the innermost task or group at
    the first problem. ``seen`` stops cycles."""
    if entry.name in seen:
        return
    seen.add(entry.name)
    names.add(entry.name)
    try:
        _build_entry(entry, index, names, seen)
    except _TaskProblem:
        raise
    except Exception as e:  # noqa: BLE001 -- a task's code may raise anything when imported
        raise _TaskProblem(f"{entry.name}: {_one_line(e)}") from e


def _build_entry(entry, index: dict, names: set[str], seen: set[str]) -> None:
    from lm_eval.api.task import ALL_OUTPUT_TYPES
    from lm_eval.config.task import TaskConfig
    from lm_eval.filters import build_filter_ensemble
    from lm_eval.tasks._index import Kind, load_yaml

    if entry.kind == Kind.TAG:
        for name in sorted(entry.tags):
            if name in index:
                _build_config(index[name], index, names, seen)
        return
    cfg = dict(load_yaml(entry.yaml_path, resolve_func=True)) if entry.yaml_path else dict(entry.cfg or {})
    if entry.kind == Kind.GROUP:
        for member in cfg.get("task") or []:
            ref = member if isinstance(member, str) else member.get("group") or member.get("task")
            if ref in index:
                _build_config(index[ref], index, names, seen)
            elif isinstance(member, dict) and "task" in member:  # an inline task
                TaskConfig(**{k: v for k, v in member.items() if k not in ("tag", "group", "task_list")})
            # an inline group, or a name lm-eval builds from the group's own fields: checked when it runs
        return
    if "class" in cfg:  # a Python task: its class imported is all that can be checked without data
        names.add(cfg.get("task", entry.name))
        return
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    config = TaskConfig(**cfg)
    names.add(config.task)
    if config.output_type is not None and config.output_type not in ALL_OUTPUT_TYPES:
        raise _TaskProblem(f"task {config.task!r}: output_type {config.output_type!r} is not one of "
                         f"{', '.join(ALL_OUTPUT_TYPES)}")
    for f in config.filter_list or []:
        build_filter_ensemble(f["name"], [[fn["function"], {k: v for k, v in fn.items() if k != "function"}]
                                          for fn in f["filter"]])


def _one_line(e: BaseException) -> str:
    """An exception as one line for a validate error (the spec's field is said by the caller)."""
    if isinstance(e, ModuleNotFoundError) and e.name:
        return (f"its code imports {e.name!r}, which is not installed (lm-eval's extra for the task installs "
                f"its packages, e.g. lm_eval[ifeval])")
    text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    text = " ".join(str(text).split()).removeprefix("eval.lm_eval_tasks: ")
    return text if isinstance(e, (_TaskProblem, KeyError, FileNotFoundError)) else f"{type(e).__name__}: {text}"


def _check_names(specs: list[str], known: list[str]) -> None:
    """Unknown task names fail here with a suggestion, before any model work."""
    import difflib

    for spec in specs:
        if not spec.startswith("/") and spec not in known:
            hint = difflib.get_close_matches(spec, known, n=3)
            raise KeyError(f"eval.lm_eval_tasks: unknown lm-eval task {spec!r}"
                           + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else ""))


def primary_key(task_config: dict) -> tuple[str, str]:
    """(metric, filter) of a task's primary metric, from its serialised config."""
    metric_list = task_config.get("metric_list") or []
    if not metric_list:
        raise KeyError(f"lm-eval task {task_config.get('task')!r} has no metric_list in its results config")
    metric = metric_list[0]["metric"]
    filters = task_config.get("filter_list") or []
    filt = filters[0]["name"] if filters else "none"
    return str(metric), str(filt)


def flat_metrics(results: dict) -> tuple[dict[str, float | None], dict[str, str]]:
    """lm-eval results -> ({flat name: value}, {flat name: lm-eval key}).

    A primary metric missing from a task's results is an error (a silent
    "absent" would look like a task that was never configured)."""
    out: dict[str, float | None] = {}
    source: dict[str, str] = {}
    for task, values in results["results"].items():
        if task not in results.get("configs", {}):
            continue  # a group's aggregate row; its leaf tasks are reported
        metric, filt = primary_key(results["configs"][task])
        key = f"{metric},{filt}"
        if key not in values:
            raise KeyError(f"lm-eval task {task!r}: primary metric {key!r} not in results (have {sorted(values)})")
        for name, k in ((metric, key), (f"{metric}_stderr", f"{metric}_stderr,{filt}")):
            v = values.get(k)
            # lm-eval writes "N/A" for a stderr it did not compute (e.g. a single sample)
            v = float(v) if isinstance(v, (int, float)) else None
            out[f"lm_eval/{task}/{name}"] = None if v is not None and math.isnan(v) else v
            source[f"lm_eval/{task}/{name}"] = k
    return out, source


def protocol(results: dict, *, apply_chat_template: bool, fewshot_as_multiturn: bool,
             system_instruction: str, backend: str = "hf") -> dict[str, dict]:
    """{task: how its number was made}, for each task ``flat_metrics`` reports: the shots
    lm-eval used (its ``n-shot``), the chat-template settings and system instruction it was
    given ("" when none), lm-eval's version, the task's version (its ``versions``) and the
    lm-eval model class that computed it (``backend``: eval.backend, "hf" or "vllm")."""
    return {task: {"num_fewshot": int(results["n-shot"][task]),
                   "apply_chat_template": bool(apply_chat_template),
                   "fewshot_as_multiturn": bool(fewshot_as_multiturn),
                   "system_instruction": system_instruction or "",
                   "lm_eval_version": str(results.get("lm_eval_version", "")),
                   "task_version": results.get("versions", {}).get(task),
                   "backend": backend}
            for task in results["results"] if task in results.get("configs", {})}


def write_results(results: dict, out_dir: Path, *, apply_chat_template: bool, fewshot_as_multiturn: bool,
                  system_instruction: str, backend: str = "hf") -> dict[str, float | None]:
    """Write one evaluation's files (see the module docstring) from ``simple_evaluate``'s
    results (its ``samples`` taken out of the dict) and return the flat primary metrics."""
    from lm_eval.utils import handle_non_serializable

    samples = results.pop("samples", {})
    atomic_write_text(out_dir / "results.json",
                      json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    for task, rows in samples.items():
        atomic_write_text(out_dir / f"samples_{task}.jsonl", "".join(
            json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows))
    metrics, source = flat_metrics(results)
    atomic_write_json(out_dir / "metrics.json", {
        "metrics": metrics, "lm_eval_keys": source,
        "protocol": protocol(results, apply_chat_template=apply_chat_template,
                             fewshot_as_multiturn=fewshot_as_multiturn, system_instruction=system_instruction,
                             backend=backend)})
    return metrics


def run_lm_eval(model, tokenizer, section: EvalSection, out_dir: Path, *,
                device: str | None = None, seed: int | None = None,
                system_prompt: str = "", where: str = "eval.num_fewshot") -> dict[str, float | None]:
    """Evaluate ``model`` on ``section.lm_eval_tasks``; returns flat primary metrics.

    ``section.num_fewshot``: see the module docstring; ``where`` names that field in errors
    (the validation evaluation passes its own).
    ``system_prompt``: data.system_prompt, sent as lm-eval's system instruction.
    ``seed`` (optional) replaces lm-eval's default seeds (0, 1234, 1234, 1234);
    leave it None to get numbers comparable with an ``lm_eval`` command line run.
    The model's train/eval mode is restored afterwards (HFLM switches to eval).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if not section.lm_eval_tasks:
        return {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs, include, builtin = resolve_task_specs(section.lm_eval_tasks)
    shots = section.num_fewshot
    manager = task_manager(include, builtin, shots, where)
    _check_names(specs, manager.all_tasks)
    # the lm_eval command line turns multi-turn few-shot on with a chat template
    multiturn = section.apply_chat_template
    was_training = model.training
    device = device or str(next(model.parameters()).device)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=section.batch_size)
        seeds = {} if seed is None else dict(random_seed=seed, numpy_random_seed=seed,
                                             torch_random_seed=seed, fewshot_random_seed=seed)
        results = simple_evaluate(
            model=lm, tasks=specs, task_manager=manager,
            # None: each task at its own YAML's count (a table was set as the tasks loaded)
            num_fewshot=None if isinstance(shots, dict) else shots,
            limit=section.limit or None,
            batch_size=section.batch_size,
            device=device,
            log_samples=True,
            apply_chat_template=section.apply_chat_template,
            fewshot_as_multiturn=multiturn,
            # the experiment's system message (data.system_prompt), as in generation and training
            system_instruction=system_prompt or None,
            **seeds)
    finally:
        model.train(was_training)
    return write_results(results, out_dir, apply_chat_template=section.apply_chat_template,
                         fewshot_as_multiturn=multiturn, system_instruction=system_prompt)
