"""Values checked against what the code that uses them accepts. A value inside its field's
schema bounds can still be one its consumer rejects minutes into a run: numpy's seed range
(through transformers' ``set_seed``), vLLM's sampling limits, a training stage of 0 epochs, the
threads torch can start, the lengths a file system allows for the run directory. Part of
``harness validate``; each problem is one ``FieldError`` at the field to change (a warning where
only the run can tell, e.g. answers longer than a training pair holds). Nothing here reads a
file or loads a model.
"""

from __future__ import annotations

import os
from pathlib import Path

from harness.config.schema import FieldError

SEED_LIMIT = 2**32        # numpy's seeds are below 2**32; training seeds numpy with experiment.seed + iteration
VLLM_MAX_LOGPROBS = 20    # vLLM's default max_logprobs: the most log-probs per token a request may ask for
RUN_DIR_DEPTH = 256       # bytes kept free below a run directory for the deepest path a run writes there
MAX_THREADS = 1024        # model.cpu_threads above this is an error (see _threads)
NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits, used where pathconf cannot tell


def check_values(cfg, method, errors: list[FieldError], warnings: list[FieldError]) -> None:
    """Every check of this module, into ``errors`` (and ``warnings``)."""
    for i, seed in [(None, cfg.experiment.seed), *enumerate(cfg.experiment.seeds)]:
        problem = seed_problem(seed, cfg.method.iterations)
        if problem:
            errors.append(FieldError("experiment.seed" if i is None else f"experiment.seeds[{i}]", problem))
    _sampling(cfg, method, errors)
    _threads(cfg, errors, warnings)
    _epochs(cfg, errors)
    _answer_room(cfg, warnings)
    name = cfg.experiment.name.encode()
    if len(name) > NAME_MAX:
        errors.append(FieldError("experiment.name", (
            f"{len(name)} bytes long; it names the run directory, and a file name has at most {NAME_MAX} bytes")))
        return
    for run in cfg.for_seeds():
        problem = path_problem(run.run_dir, RUN_DIR_DEPTH)
        if problem:
            errors.append(FieldError("experiment.output_dir", problem))
            break


def seed_problem(seed: int, iterations: int) -> str | None:
    """Why ``seed`` cannot seed a run of ``iterations`` iterations, or None: iteration t's
    training calls ``set_seed(seed + t)`` (t up to ``iterations``), and numpy refuses seeds of
    2**32 and above."""
    if seed + iterations >= SEED_LIMIT:
        return (f"{seed} is too large: training seeds numpy with experiment.seed + iteration (up to "
                f"{seed + iterations}), and numpy's seeds are below 2**32; use at most {SEED_LIMIT - 1 - iterations}")
    return None


def _sampling(cfg, method, errors: list[FieldError]) -> None:
    """top_p = 0 keeps no token by the nucleus rule: vLLM rejects it (top_p must be in (0, 1]),
    and the HF engine would quietly decode greedily. vLLM returns at most ``VLLM_MAX_LOGPROBS``
    log-probs per token, which the indicators' top-k statistics ask for."""
    sampling = method.sampling(cfg)
    if sampling is not None and sampling.top_p <= 0.0:
        errors.append(FieldError(f"method.{cfg.method.name}.top_p", (
            "0 keeps no token (nucleus sampling needs top_p in (0, 1]; vLLM rejects 0); for greedy answers "
            "set temperature = 0")))
    top_k = cfg.eval.indicators.top_k
    if cfg.generation.engine == "vllm" and cfg.eval.indicators.num_prompts and top_k > VLLM_MAX_LOGPROBS:
        errors.append(FieldError("eval.indicators.top_k", (
            f"{top_k} with engine = \"vllm\": vLLM returns at most {VLLM_MAX_LOGPROBS} log-probs per token "
            f"(its max_logprobs), so the indicator samples would fail; use at most {VLLM_MAX_LOGPROBS}, or "
            "engine = \"hf\"")))


def _epochs(cfg, errors: list[FieldError]) -> None:
    """epochs = 0 trains nothing: the trainer takes no step, and the iteration's model would be
    the one it started from (a self-improvement run that never improves). An SFT stage is
    checked only when it runs (it has IFT or EFT data)."""
    stages = [("training.epochs", cfg.training)]
    sft = getattr(cfg.options, "sft", None)
    if sft is not None and (getattr(cfg.options, "ift", "") or getattr(cfg.options, "eft", "")):
        stages.append((f"method.{cfg.method.name}.sft.epochs", sft))
    for where, steps in stages:
        if steps.epochs <= 0:
            errors.append(FieldError(where, "0 trains nothing: the stage would take no optimizer step; give the "
                                            "epochs to train (a fraction such as 0.5 trains on part of the data)"))


def _answer_room(cfg, warnings: list[FieldError]) -> None:
    """Every method trains on answers the policy wrote, up to generation.max_new_tokens long; a
    pair whose answer does not fit max_length after its prompt is cut, and past
    max_truncated_share of cut pairs the training stage fails. Whether answers get that long is
    known only once they are written: a warning."""
    t = cfg.training
    room = t.max_length - t.prompt_limit
    if cfg.generation.max_new_tokens > room and t.max_truncated_share < 1.0:
        warnings.append(FieldError("generation.max_new_tokens", (
            f"{cfg.generation.max_new_tokens} but a training pair has room for {room} answer tokens (training.max_length "
            f"{t.max_length} - a prompt of up to {t.prompt_limit}): if more than {t.max_truncated_share:g} of the "
            "answers run that long, training fails on truncation; raise training.max_length or lower max_new_tokens")))


def _threads(cfg, errors: list[FieldError], warnings: list[FieldError]) -> None:
    """torch starts model.cpu_threads threads for every operation. More than this process may
    use only adds contention (a warning: the file may be meant for a bigger machine); past
    ``MAX_THREADS`` it is an error, never useful anywhere (once, on a busy 2-core machine: 2048
    threads ran small matrix products about 5x slower than 2, and 100000 did not finish one in a
    minute)."""
    n = cfg.model.cpu_threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n > MAX_THREADS:
        errors.append(FieldError("model.cpu_threads", (
            f"{n} threads: past {MAX_THREADS} torch spends its time switching between them (and tens of "
            f"thousands do not start); use at most the CPU count ({cpus} here), or 0 for torch's default")))
    elif n > cpus:
        warnings.append(FieldError("model.cpu_threads", (
            f"{n} but this process may use {cpus} CPUs: threads beyond them only slow torch down")))


def path_problem(path: Path | str, depth: int = 0) -> str | None:
    """Why the file system cannot hold ``path`` (with ``depth`` more bytes of paths below it),
    or None: a component longer than the file system's name limit, or the whole absolute path
    longer than its path limit. Limits come from the nearest existing ancestor's file system."""
    full = Path(os.path.abspath(Path(path).expanduser()))
    probe = full
    while not os.path.exists(probe) and probe != probe.parent:  # False, not OSError, for a name too long
        probe = probe.parent
    name_max = _pathconf(probe, "PC_NAME_MAX", NAME_MAX)
    path_max = _pathconf(probe, "PC_PATH_MAX", PATH_MAX)
    for part in full.parts:
        if len(part.encode()) > name_max:
            return (f"the path component {part[:40]!r}... is {len(part.encode())} bytes; the file system allows "
                    f"{name_max} per component")
    size = len(str(full).encode()) + depth
    if size >= path_max:
        return (f"the run directory {str(full)[:60]!r}... is {len(str(full).encode())} bytes, and with the "
                f"{depth} bytes of paths a run writes below it passes the file system's path limit of "
                f"{path_max}; use a shorter output_dir or name")
    return None


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default
