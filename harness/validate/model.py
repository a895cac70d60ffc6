"""Checks of the model an experiment names, known before its weights load: the source resolves
(or needs the hub), the device and bitsandbytes exist, the tokenizer has a chat template that
renders a system turn when data.system_prompt is set (and that turn leaves room for a prompt),
the lengths fit the model's positions, vLLM can serve its attention heads, and the LoRA target
modules are a non-empty list whose every name matches a module of the model (built from its
config on the meta device). Part of ``harness validate``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from harness.config.experiment import Config, judge_sections
from harness.engines import unavailable
from harness.engines.vllm_support import lm_eval_unavailable, supported_architectures
from harness.models.load import pick_device
from harness.config.schema import FieldError, closest
from harness.models.sources import ModelSource, SourceError, converted, hub_online, is_built, locate, resolve_ref
from harness.tiny.build import TinyParams
from harness.validate.report import HUB_MODEL, Report, hub_off, hub_ok


def _device(cfg: Config, r: Report) -> None:
    import torch

    if cfg.generation.engine == "vllm" and unavailable():
        r.environment(cfg, "vllm", FieldError("generation.engine", (
            f"\"vllm\" but {unavailable()}; or declare experiment.requires = [\"vllm\"]")))
    if cfg.eval.backend == "vllm" and lm_eval_unavailable():
        r.environment(cfg, "vllm", FieldError("eval.backend", (
            f"\"vllm\" but {lm_eval_unavailable()}; or declare experiment.requires = [\"vllm\"]")))

    if cfg.model.device == "cuda" and not torch.cuda.is_available():
        r.environment(cfg, "gpu", FieldError("model.device", (
            "\"cuda\" but no CUDA device is available here (torch was built without CUDA or no GPU is visible); "
            "use \"auto\" or \"cpu\", or declare experiment.requires = [\"gpu\"]")))
    if cfg.model.dtype == "float32" and pick_device(cfg.model.device) == "cuda":  # set: "auto" is bfloat16 there
        r.warnings.append(FieldError("model.dtype", (
            "float32 on CUDA takes twice the memory of bfloat16 (the default there) and its matmuls run in TF32 "
            "anyway (on for every CUDA load); remove model.dtype for bfloat16")))
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
    targets = cfg.lora.target_modules
    if not targets:  # peft refuses a LoRA config with no target
        r.errors.append(FieldError("lora.target_modules", "empty: no module would get an adapter; name the "
                                                          'modules to adapt, e.g. ["q_proj", "v_proj"]'))
    for i, target in enumerate(targets):
        if not target.strip():  # "" would match the model itself (its module name is "")
            r.errors.append(FieldError(f"lora.target_modules[{i}]", "an empty name; give a module name such as 'q_proj'"))
    try:
        src = locate(cfg.model.base, cfg.model.gguf_file)
    except SourceError as e:
        r.errors.append(FieldError("model.base", str(e)))
        return
    if src.kind == "hub" and not hub_ok(src.ref, cfg.model.revision):
        hub_off(cfg, r, "model.base", src.ref, *HUB_MODEL)
        return
    if src.kind == "local" and not any(any(Path(src.path).glob(p)) for p in WEIGHTS):
        r.errors.append(FieldError("model.base", (
            f"{src.path} has a config.json but no weights ({', '.join(WEIGHTS)}); the run would fail loading it")))
        return
    try:
        config = _model_config(src, cfg.model.revision, cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:  # a config.json that is not JSON, or names no known architecture
        r.errors.append(FieldError("model.base", f"cannot read the model's config: {' '.join(str(e).split())}"))
        return
    if config is None:
        return
    if not cfg.model.chat_template and not _has_chat_template(src):
        r.errors.append(FieldError("model.chat_template", (
            f"the tokenizer of {src.ref!r} has no chat template; set model.chat_template to a Jinja file")))
    else:
        _system_role(cfg, src, r)
    _positions(cfg, config, r)
    for where in [w for w, name in (("generation.engine", cfg.generation.engine), ("eval.backend", cfg.eval.backend))
                  if name == "vllm"]:
        _vllm_model(config, r, where)
    names = _module_names(config)
    for i, target in enumerate(cfg.lora.target_modules):
        if not target.strip():
            continue
        if not any(n == target or n.endswith("." + target) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n and not n.rsplit(".", 1)[-1].isdigit()})
            hint = closest(target, leaves)
            r.errors.append(FieldError(f"lora.target_modules[{i}]", (
                f"{target!r} matches no module of {src.ref}"
                + (f"; did you mean {hint!r}?" if hint else "") + f" (modules: {', '.join(leaves)})")))


def _positions(cfg: Config, config, r: Report) -> None:
    """Lengths that must fit the model's positions (``max_position_embeddings``): a training
    sequence (max_length) and a generated answer (generation.max_new_tokens, which the vLLM engine
    caps at the positions and the HF engine would run past what the model was trained on)."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    lengths = [("training.max_length", cfg.training.max_length)]
    sft = getattr(cfg.options, "sft", None)
    if sft is not None:
        lengths.append((f"method.{cfg.method.name}.sft.max_length", sft.max_length))
    for where, n in lengths:
        if n > limit:
            r.errors.append(FieldError(where, f"{n} is more than the {limit} positions of {cfg.model.base!r} "
                                              f"(max_position_embeddings); use at most {limit}"))
    new_tokens = [("generation.max_new_tokens", cfg.generation.max_new_tokens)]
    for where, judge in judge_sections(cfg):  # a judge that is the policy writes with the policy's positions
        if judge.needs_policy and isinstance(getattr(judge.options, "max_new_tokens", None), int):
            new_tokens.append((f"{where}.{judge.name}.max_new_tokens", judge.options.max_new_tokens))
    for where, n in new_tokens:
        if n >= limit:
            r.errors.append(FieldError(where, (
                f"{n} leaves no room for a prompt in the {limit} positions of {cfg.model.base!r} "
                f"(max_position_embeddings); use less than {limit}")))


# vLLM's CPU attention backend (vllm/v1/attention/backends/cpu_attn.py,
# CPUAttentionBackend.get_supported_head_sizes) computes these head sizes only; a model with another
# one fails while its engine starts. On CUDA, vLLM falls back from FLASH_ATTN (head size a multiple of 8,
# at most 256) to TRITON_ATTN (at least 32) and FLEX_ATTENTION (any size), so every size has a backend.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def head_size(config) -> int | None:
    """The attention head size vLLM computes with: ``head_dim`` when the config sets one, else
    hidden_size / num_attention_heads (None when neither is known)."""
    text = config.get_text_config()
    size = getattr(text, "head_dim", None)
    if isinstance(size, int) and size > 0:
        return size
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None


def _vllm_model(config, r: Report, where: str = "generation.engine") -> None:
    """What vLLM would refuse about the policy's architecture, known from its config: an
    architecture the vLLM environment does not serve (asked of it: ``vllm_support``), and on a
    CPU a head size its attention backend does not compute (the engine runs where torch sees a
    GPU, as ``harness.engines.vllm_client.Worker`` starts it). ``where``: the field that chose
    vLLM (generation.engine or eval.backend), named in the errors."""
    import torch

    field = where.rsplit(".", 1)[-1]

    archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    supported = supported_architectures() if archs else None
    if supported is not None and not any(a in supported for a in archs):
        hint = closest(archs[0], sorted(supported))
        r.errors.append(FieldError(where, (
            f"\"vllm\" cannot serve this model: its architecture {', '.join(archs)} is not one the vLLM environment "
            f"supports ({len(supported)} architectures{f'; the nearest is {hint}' if hint else ''}); "
            f"use {field} = \"hf\"")))
    size = head_size(config)
    if size is None or torch.cuda.is_available() or size in VLLM_CPU_HEAD_SIZES:
        return
    r.errors.append(FieldError(where, (
        f"\"vllm\" cannot serve this model on a CPU: its attention head size is {size}, and vLLM's CPU attention "
        f"computes head sizes {', '.join(map(str, VLLM_CPU_HEAD_SIZES))} only; use {field} = \"hf\"")))


# the weight files transformers' from_pretrained loads from a local directory (single or sharded)
WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def _model_config(src: ModelSource, revision: str, trust_remote_code: bool):
    """The model's transformers config, read without weights (None: not available yet)."""
    from transformers import AutoConfig, LlamaConfig

    if src.kind == "tiny":  # the tiny model is a Llama of TinyParams' shape (built or not)
        if is_built("tiny"):
            return AutoConfig.from_pretrained(resolve_ref("tiny"))
        p = TinyParams()
        return LlamaConfig(vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                           num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads,
                           num_key_value_heads=p.num_heads, max_position_embeddings=p.max_positions)
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
    generation (Mistral-7B-Instruct-v0.2's after its weights load). Render a system + user probe
    with the template the run will use: a local or built tiny model's tokenizer, or a hub
    model's when the hub is on or its tokenizer is in the local cache (read with
    local_files_only while the hub is off); the others are not read here. A user-only probe is
    rendered first, with or without a system prompt: a template that cannot render one (a Jinja
    syntax error) is a model.chat_template error, not one at the run's first generation."""
    if src.kind not in ("local", "tiny", "hub") or (src.kind == "tiny" and not is_built("tiny")):
        return
    if src.kind == "hub" and not hub_ok(src.ref, cfg.model.revision, "tokenizer_config.json"):
        return  # the hub is off and its tokenizer is not in the local cache: not checked
    if cfg.model.chat_template and not Path(resolve_ref(cfg.model.chat_template)).is_file():
        return  # reported as model.chat_template already
    from harness.models.load import load_tokenizer

    probe = [{"role": "system", "content": cfg.data.system_prompt}, {"role": "user", "content": "Hi"}]
    tok, text, step = None, None, "user"
    try:
        tok = load_tokenizer(resolve_ref("tiny") if src.kind == "tiny" else src.path, cfg.model.revision,
                             cfg.model.chat_template, cfg.model.trust_remote_code,
                             local_files_only=src.kind == "hub" and not hub_online())
        tok.apply_chat_template(probe[1:], add_generation_prompt=True, tokenize=False)
        step = "system"
        if cfg.data.system_prompt:
            text = tok.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template raises whatever its author wrote
        if tok is None and src.kind == "hub" and isinstance(e, OSError):
            return  # the hub is on but did not answer: not checked
        which = f"model.chat_template ({cfg.model.chat_template})" if cfg.model.chat_template else \
            f"the chat template of {src.ref!r}"
        if step == "user":
            r.errors.append(FieldError("model.chat_template", (
                f"{which} cannot render a chat ({type(e).__name__}: {e}); fix the template or set "
                "model.chat_template to one that renders")))
            return
        r.errors.append(FieldError("data.system_prompt", (
            f"{which} cannot render a system message ({type(e).__name__}: {e}); clear data.system_prompt or set "
            "model.chat_template to a template with a system role")))
        return
    if text is None:
        return
    # a prompt longer than the limit is cut from the left, but the system message stays whole; one that
    # does not fit even with a one-word question drops every pair, and the stage fails on truncation
    n, limit = len(tok(text, add_special_tokens=False, verbose=False).input_ids), cfg.training.prompt_limit
    if n > limit:
        r.errors.append(FieldError("data.system_prompt", (
            f"with a one-word question it renders to {n} tokens, more than the {limit} a training prompt may have "
            "(training.max_prompt_length, or half of max_length): every pair would be dropped; shorten it or "
            "raise training.max_length")))


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
