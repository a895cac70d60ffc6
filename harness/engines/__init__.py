"""Generation engines, chosen by ``[generation] engine``.

Every engine is a function with the signature and record format of
``harness.generate.generate`` (``model, tokenizer, prompts, sampling, *, seed_key,
batch_size, log, desc, min_new_tokens``): "hf" is that function itself, "vllm" serves the
same policy (``model``, merged or as base + LoRA adapter) with vLLM in a separate environment
(``harness.engines.vllm_engine``). ``session`` gives a stage one such function whose engine
is started once and kept for all of the stage's generation (its AlpacaEval answers,
indicator samples, a model judge's answers), then stopped.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

ENGINES = ("hf", "vllm")
REPO = Path(__file__).resolve().parents[2]


def venv_python() -> Path:
    """The vLLM environment's Python: ``$HARNESS_VLLM_PYTHON`` or ``.venv-vllm`` of the checkout."""
    return Path(os.environ.get("HARNESS_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")


def unavailable() -> str | None:
    """Why the vLLM engine cannot run here, or None."""
    py = venv_python()
    if not py.exists():
        return f"no vLLM environment ({py} is missing; ./install.sh --vllm creates .venv-vllm)"
    return None


def engine(name: str = "hf") -> Callable:
    """The generate function of engine ``name``."""
    if name == "hf":
        from harness.generate import generate

        return generate
    if name == "vllm":
        from harness.engines.vllm_engine import generate

        return generate
    raise ValueError(f"unknown generation engine {name!r} (one of {', '.join(ENGINES)})")


@dataclass(frozen=True)
class Engine:
    """An engine in use by a stage: its name and its generate function."""
    name: str
    generate: Callable


@contextlib.contextmanager
def session(name: str = "hf", generation=None) -> Iterator[Engine]:
    """Engine ``name`` for one stage: for "vllm" the generate of a ``vllm_engine.Session``
    (one engine start for the stage's calls, stopped on exit), for "hf"
    ``harness.generate.generate`` itself, its batches bounded by ``max_batch_tokens`` of
    ``generation`` (the run's [generation] section; read when it first generates, so a stage
    that generates nothing does not depend on it)."""
    if name != "vllm":
        yield Engine(name, engine(name) if generation is None else _token_budget(engine(name), generation))
        return
    from harness.engines.vllm_engine import Session

    # read only here, so a stage that never starts vLLM does not depend on the vllm_* fields
    s = Session(weights=generation.vllm_weights, max_num_seqs=generation.vllm_max_num_seqs) if generation \
        else Session()
    try:
        yield Engine(name, s.generate)
    finally:
        s.close()


def _token_budget(generate: Callable, generation) -> Callable:
    """``generate`` with ``max_batch_tokens = generation.max_batch_tokens``."""
    def budgeted(*args, **kwargs):
        return generate(*args, max_batch_tokens=generation.max_batch_tokens, **kwargs)

    return budgeted


def settings(name: str, model, tokenizer, sampling, generation=None) -> dict:
    """What decides decoding under engine ``name``, as a plain dict (a stage's outputs record it):
    ``harness.generate.generation_settings`` for "hf"; for "vllm" the worker's sampling settings,
    vLLM's sampler and the weights served (``generation``: the run's [generation] section)."""
    if name == "hf":
        from harness.generate import generation_settings

        return generation_settings(model, tokenizer, sampling)
    from harness.engines.vllm_engine import generation_settings

    return generation_settings(model, tokenizer, sampling,
                               generation.vllm_weights if generation is not None else "merged")
