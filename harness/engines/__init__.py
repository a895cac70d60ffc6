"""Generation engines, chosen by ``[generation] engine``.

Every engine is a function with the signature and record format of
``harness.engines.generate.generate`` (``model, tokenizer, prompts, sampling, *, seed_key,
batch_size, log, desc, min_new_tokens``): "hf" is that function itself, "vllm" serves the
same policy (``model``, merged or as base + LoRA adapter) with vLLM in a separate environment
(``harness.engines.vllm_engine``). ``Engines`` is a run's: the loop holds one for the run and
each stage takes its engine from it (``Engines.stage``), so vLLM starts once, at the first
stage that generates through it, serves every later stage and iteration, and stops when
the run ends or fails. ``session`` is the same for one stage alone (started for it,
stopped after it).

Modules: ``generate`` (HF generation, the reference engine), ``vllm_engine`` (vLLM's
``Session`` and ``generate``), ``vllm_weights`` (the weights it serves), ``vllm_client`` and
``vllm_worker`` (its worker process, both sides), ``vllm_server`` (an OpenAI-compatible vLLM
server for a judge), ``vllm_support`` (the architectures vLLM can serve). Not here: what a stage generates
(``harness.run.stages``), loading the model (``harness.models``), judging answers
(``harness.judges``).
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
        from harness.engines.generate import generate

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


class Engines:
    """The engines of one run, owned by the run loop (``harness.run.loop.Runner``), which closes it
    when the run ends or fails. ``stage`` gives a stage its engine; for "vllm" that is the
    run's one ``vllm_engine.Session``: started by the first stage that generates through it
    and kept for every later stage and iteration (another adapter switched per request, the next
    iterate's merged copy loaded in place; a restart only for other served weights, e.g. a
    judge model, or other engine settings), parked between stages (on CUDA asleep, so training has the card; on a
    CPU it stays up). A killed run's engine dies with it (``harness.lifeline``) and a resumed
    run starts its own. Usable again after ``close``."""

    def __init__(self, lora_rank: int = 0):
        self.lora_rank = lora_rank  # the run's [lora] r: an adapter-mode engine's LoRA slots from its start
        self._vllm = None  # the vLLM session, once a stage used it
        self._settings: tuple | None = None  # (vllm_weights, vllm_max_num_seqs) it was made with

    def __enter__(self) -> "Engines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def vllm(self):
        """The run's vLLM session (None before a stage used it): its ``starts`` and ``start_s``."""
        return self._vllm

    @contextlib.contextmanager
    def stage(self, name: str = "hf", generation=None) -> Iterator[Engine]:
        """Engine ``name`` for one stage: for "vllm" the generate of the run's session (created
        with ``generation``'s vllm_weights and vllm_max_num_seqs, recreated should a stage read
        others), parked when the stage ends, however it ends; for "hf"
        ``harness.engines.generate.generate`` itself, its batches bounded by ``max_batch_tokens`` of
        ``generation`` (the run's [generation] section; read when it first generates, so a
        stage that generates nothing does not depend on it)."""
        if name != "vllm":
            yield Engine(name, engine(name) if generation is None else _token_budget(engine(name), generation))
            return
        from harness.engines.vllm_engine import Session

        # read only here, so a stage that never starts vLLM does not depend on the vllm_* fields
        settings = (generation.vllm_weights, generation.vllm_max_num_seqs) if generation else ("merged", 0)
        if self._vllm is not None and settings != self._settings:
            self.close()
        if self._vllm is None:
            self._vllm = Session(weights=settings[0], max_num_seqs=settings[1], lora_rank=self.lora_rank)
            self._settings = settings
        try:
            yield Engine(name, self._vllm.generate)
        finally:
            self._vllm.park()

    def close(self) -> None:
        """Stop the run's engines (nothing when none started)."""
        s, self._vllm, self._settings = self._vllm, None, None
        if s is not None:
            s.close()


@contextlib.contextmanager
def session(name: str = "hf", generation=None) -> Iterator[Engine]:
    """``Engines.stage`` for one stage alone: its engine started for it and stopped after it."""
    with Engines() as engines, engines.stage(name, generation) as eng:
        yield eng


def logged(eng: Engine, log) -> Engine:
    """``eng`` whose generate, called without a log of its own, keeps ``log`` (a
    ``store.JsonlLog``): each prompt's record appended as it finishes, the prompts already in
    it not generated again, so a stage that sends its whole work in one call resumes after a
    kill. Prompt ids must identify the prompt's content and the call's settings within the
    stage (a judge's content ids; a changed config starts the stage's log anew)."""
    def generate(*args, **kwargs):
        kwargs.setdefault("log", log)
        return eng.generate(*args, **kwargs)

    return Engine(eng.name, generate)


def _token_budget(generate: Callable, generation) -> Callable:
    """``generate`` with ``max_batch_tokens = generation.max_batch_tokens``."""
    def budgeted(*args, **kwargs):
        return generate(*args, max_batch_tokens=generation.max_batch_tokens, **kwargs)

    return budgeted


def settings(name: str, model, tokenizer, sampling, generation=None) -> dict:
    """What decides decoding under engine ``name``, as a plain dict (a stage's outputs record it):
    ``harness.engines.generate.generation_settings`` for "hf"; for "vllm" the worker's sampling settings,
    vLLM's sampler and the weights served (``generation``: the run's [generation] section)."""
    if name == "hf":
        from harness.engines.generate import generation_settings

        return generation_settings(model, tokenizer, sampling)
    from harness.engines.vllm_engine import generation_settings

    return generation_settings(model, tokenizer, sampling,
                               generation.vllm_weights if generation is not None else "merged")
