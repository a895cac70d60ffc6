"""Checks of the model an experiment names, known before its weights load: the source resolves
(or needs the hub), the device and bitsandbytes exist, the tokenizer has a chat template that
renders a system turn when data.system_prompt is set, and every LoRA target module matches a
module of the model (built from its config on the meta device). Part of ``harness validate``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from harness.config import Config
from harness.engines import unavailable
from harness.schema import FieldError, closest
from harness.sources import ModelSource, SourceError, converted, is_built, locate, resolve_ref
from harness.validate_report import HUB_MODEL, Report, hub_off, hub_ok


def _device(cfg: Config, r: Report) -> None:
    import torch

    if cfg.generation.engine == "vllm" and unavailable():
        r.environment(cfg, "vllm", FieldError("generation.engine", (
            f"\"vllm\" but {unavailable()}; or declare experiment.requires = [\"vllm\"]")))

    if cfg.model.device == "cuda" and not torch.cuda.is_available():
        r.environment(cfg, "gpu", FieldError("model.device", (
            "\"cuda\" but no CUDA device is available here (torch was built without CUDA or no GPU is visible); "
            "use \"auto\" or \"cpu\", or declare experiment.requires = [\"gpu\"]")))
    if cfg.model.quantization != "none":
        if importlib.util.find_spec("bitsandbytes") is None:
            r.errors.append(FieldError("model.quantization", f"{cfg.model.quantization} needs bitsandbytes, "
                                                             "which is not installed"))
        elif not _bnb_supports(cfg.model.device):
            r.errors.append(FieldError("model.quantization", (
                f"bitsandbytes cannot run {cfg.model.quantization} on this platform "
                f"({os.uname().machine}, device {cfg.model.device})")))


def _bnb_supports(device: str) -> bool:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return True
    # bitsandbytes' CPU backend exists for x86-64 and aarch64 Linux
    return os.uname().sysname == "Linux" and os.uname().machine in ("x86_64", "aarch64")


def _model(cfg: Config, r: Report) -> None:
    try:
        src = locate(cfg.model.base, cfg.model.gguf_file)
    except SourceError as e:
        r.errors.append(FieldError("model.base", str(e)))
        return
    if src.kind == "hub" and not hub_ok(src.ref, cfg.model.revision):
        hub_off(cfg, r, "model.base", src.ref, *HUB_MODEL)
        return
    config = _model_config(src, cfg.model.revision, cfg.model.trust_remote_code)
    if config is None:
        return
    if not cfg.model.chat_template and not _has_chat_template(src):
        r.errors.append(FieldError("model.chat_template", (
            f"the tokenizer of {src.ref!r} has no chat template; set model.chat_template to a Jinja file")))
    elif cfg.data.system_prompt:
        _system_role(cfg, src, r)
    names = _module_names(config)
    for i, target in enumerate(cfg.lora.target_modules):
        if not any(n == target or n.endswith("." + target) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n and not n.rsplit(".", 1)[-1].isdigit()})
            hint = closest(target, leaves)
            r.errors.append(FieldError(f"lora.target_modules[{i}]", (
                f"{target!r} matches no module of {src.ref}"
                + (f"; did you mean {hint!r}?" if hint else "") + f" (modules: {', '.join(leaves)})")))


def _model_config(src: ModelSource, revision: str, trust_remote_code: bool):
    """The model's transformers config, read without weights (None: not available yet)."""
    from transformers import AutoConfig, LlamaConfig

    if src.kind == "tiny":  # the tiny model is a Llama
        return AutoConfig.from_pretrained(resolve_ref("tiny")) if is_built("tiny") else LlamaConfig()
    if src.kind in ("builtin", "gguf"):
        done = converted(src)  # reading the GGUF header takes seconds; the converted copy's config does not
        return AutoConfig.from_pretrained(str(done)) if done else AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
    return AutoConfig.from_pretrained(src.path, revision=revision, trust_remote_code=trust_remote_code)


def _module_names(config) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [n for n, _ in model.named_modules()]


def _system_role(cfg: Config, src: ModelSource, r: Report) -> None:
    """data.system_prompt puts a system message before every prompt; some chat templates
    have no system role and raise on one (Gemma-2's), which would end the run at its first
    generation. Render a system + user probe with the template the run will use (a local or
    built tiny model's tokenizer; the others are not read here)."""
    if src.kind not in ("local", "tiny") or (src.kind == "tiny" and not is_built("tiny")):
        return
    if cfg.model.chat_template and not Path(resolve_ref(cfg.model.chat_template)).is_file():
        return  # reported as model.chat_template already
    from harness.models import load_tokenizer

    probe = [{"role": "system", "content": cfg.data.system_prompt}, {"role": "user", "content": "Hi"}]
    try:
        tok = load_tokenizer(resolve_ref("tiny") if src.kind == "tiny" else src.path, cfg.model.revision,
                             cfg.model.chat_template, cfg.model.trust_remote_code)
        tok.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template raises whatever its author wrote
        which = f"model.chat_template ({cfg.model.chat_template})" if cfg.model.chat_template else \
            f"the chat template of {src.ref!r}"
        r.errors.append(FieldError("data.system_prompt", (
            f"{which} cannot render a system message ({type(e).__name__}: {e}); clear data.system_prompt or set "
            "model.chat_template to a template with a system role")))


def _has_chat_template(src: ModelSource) -> bool:
    if src.kind in ("builtin", "gguf"):
        return True  # read from the GGUF metadata (a missing one fails at load with the same message)
    if src.kind == "hub" or (src.kind == "tiny" and not is_built("tiny")):
        return True
    path = Path(resolve_ref("tiny") if src.kind == "tiny" else src.path)
    if (path / "chat_template.jinja").is_file():
        return True
    tc = path / "tokenizer_config.json"
    return tc.is_file() and bool(json.loads(tc.read_text()).get("chat_template"))
