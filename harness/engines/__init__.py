"""Generation engines, chosen by ``[generation] engine``.

Every engine is a function with the signature and record format of
``harness.generate.generate`` (``model, tokenizer, prompts, sampling, *, seed_key,
batch_size, log, desc, min_new_tokens``): "hf" is that function itself, "vllm" serves the
same policy (``model``, merged) with vLLM in a separate environment
(``harness.engines.vllm_engine``).
"""

from __future__ import annotations

from typing import Callable

ENGINES = ("hf", "vllm")


def engine(name: str = "hf") -> Callable:
    """The generate function of engine ``name``."""
    if name == "hf":
        from harness.generate import generate

        return generate
    if name == "vllm":
        from harness.engines.vllm_engine import generate

        return generate
    raise ValueError(f"unknown generation engine {name!r} (one of {', '.join(ENGINES)})")


def generate(model, tokenizer, prompts, sampling, *, engine_name: str = "hf", **kwargs) -> dict[str, dict]:
    """``harness.generate.generate`` through engine ``engine_name``."""
    return engine(engine_name)(model, tokenizer, prompts, sampling, **kwargs)


def settings(name: str, model, tokenizer, sampling) -> dict:
    """What decides decoding under engine ``name``, as a plain dict (a stage's outputs record it):
    ``harness.generate.generation_settings`` for "hf"; for "vllm" the worker's sampling settings
    and vLLM's sampler."""
    if name == "hf":
        from harness.generate import generation_settings

        return generation_settings(model, tokenizer, sampling)
    from harness.engines.vllm_engine import generation_settings

    return generation_settings(model, tokenizer, sampling)
