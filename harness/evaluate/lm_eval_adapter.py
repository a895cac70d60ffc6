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

Files written to ``out_dir``: ``results.json`` (lm-eval's own results dict,
numpy values made plain by ``lm_eval.utils.handle_non_serializable``, as its
command line does), ``samples_<task>.jsonl`` (per-sample logs) and
``metrics.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from harness.config import EvalSection
from harness.sources import resolve_ref
from harness.store import atomic_write_json, atomic_write_text

_LEAF_KINDS = ("TASK", "PY_TASK")


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
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import load_yaml

    if not specs:
        return []
    load, include, builtin = resolve_task_specs(specs)
    manager = TaskManager(include_path=include or None, include_defaults=builtin)
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


def run_lm_eval(model, tokenizer, section: EvalSection, out_dir: Path, *,
                device: str | None = None, seed: int | None = None,
                system_prompt: str = "") -> dict[str, float | None]:
    """Evaluate ``model`` on ``section.lm_eval_tasks``; returns flat primary metrics.

    ``system_prompt``: data.system_prompt, sent as lm-eval's system instruction.
    ``seed`` (optional) replaces lm-eval's default seeds (0, 1234, 1234, 1234);
    leave it None to get numbers comparable with an ``lm_eval`` command line run.
    The model's train/eval mode is restored afterwards (HFLM switches to eval).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    if not section.lm_eval_tasks:
        return {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs, include, builtin = resolve_task_specs(section.lm_eval_tasks)
    manager = TaskManager(include_path=include or None, include_defaults=builtin)
    _check_names(specs, manager.all_tasks)
    was_training = model.training
    device = device or str(next(model.parameters()).device)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=section.batch_size)
        seeds = {} if seed is None else dict(random_seed=seed, numpy_random_seed=seed,
                                             torch_random_seed=seed, fewshot_random_seed=seed)
        results = simple_evaluate(
            model=lm, tasks=specs, task_manager=manager,
            num_fewshot=section.num_fewshot,
            limit=section.limit or None,
            batch_size=section.batch_size,
            device=device,
            log_samples=True,
            apply_chat_template=section.apply_chat_template,
            # the lm_eval command line turns multi-turn few-shot on with a chat template
            fewshot_as_multiturn=section.apply_chat_template,
            # the experiment's system message (data.system_prompt), as in generation and training
            system_instruction=system_prompt or None,
            **seeds)
    finally:
        model.train(was_training)
    samples = results.pop("samples", {})
    atomic_write_text(out_dir / "results.json",
                      json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    for task, rows in samples.items():
        atomic_write_text(out_dir / f"samples_{task}.jsonl", "".join(
            json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows))
    metrics, source = flat_metrics(results)
    atomic_write_json(out_dir / "metrics.json", {"metrics": metrics, "lm_eval_keys": source})
    return metrics
