"""Loading base models, tokenizers and the iteration chain of adapters.

Two ways to chain iterations (``Config.chain``):
- merge (full-precision bases): model_t = base with adapters 1..t merged in,
  each exactly (up to dtype rounding); iteration t+1 trains a fresh adapter on
  top, and the fresh adapter disabled is exactly model_t (the reference).
- continue (quantized and bfloat16 bases): model_t = base + adapter_t.
  Iteration t+1 starts from a copy of adapter_t; a frozen copy of adapter_t is
  loaded beside it as the reference adapter. Nothing is merged into quantized
  or bfloat16 weights, so nothing is lost.

Why bfloat16 bases continue instead of merging (``Config.chain``): a bf16 weight
is already on bf16's grid, so adding a delta below half its spacing rounds back to
the same weight. At lr ~2e-6 (weights sd 0.02, delta sd 1e-5) merging left 88% of
the entries unchanged and kept about a quarter of the update's effect on log-probs,
whether the sum ran in bf16 or in float32 and was cast back. Keeping float32 master
weights fixes the merge but then every forward runs in float32:
bench/bench_bf16_merge.py (CPU with AVX-512 BF16, hidden 512, 4 layers) measured
1.9x the weight memory, 2.4x the time of a LoRA training step and 6.8x that of a
forward against the continue chain, whose float32 adapter carries the update with
no merge gap at all (the trained model is the next iteration's model).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

from harness.models.sources import model_path, resolve_ref

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def use_tf32(device: str) -> None:
    """On CUDA, float32 matmuls and convolutions run in TF32 (torch's "high" float32 precision:
    tensor cores, a 10-bit mantissa for the products, float32 sums), for every model loaded
    there; set for the whole process. Nothing on a CPU, whose float32 stays IEEE."""
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _quant_config(quantization: str, dtype: torch.dtype):
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(name: str, revision: str = "main", chat_template: str = "", trust_remote_code: bool = False,
                   local_files_only: bool = False):
    """The tokenizer of a model reference (see ``harness.models.sources``), padding on the left.
    ``local_files_only``: a hub id's files from the local cache only (OSError when absent)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path(name), revision=revision, trust_remote_code=trust_remote_code,
                                        local_files_only=local_files_only)
    if chat_template:
        tok.chat_template = Path(resolve_ref(chat_template)).read_text()
    if tok.chat_template is None:
        raise ValueError(f"tokenizer of {name!r} has no chat template; set model.chat_template")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation; training code pads explicitly
    return tok


def load_model(name: str, *, revision: str = "main", dtype: str = "float32", quantization: str = "none",
               device: str = "auto", kind: str = "causal", trust_remote_code: bool = False):
    """A model reference (see ``harness.models.sources``) -> an eval-mode model on ``device``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    torch_dtype = DTYPES[dtype]
    device = pick_device(device)
    use_tf32(device)
    qc = _quant_config(quantization, torch_dtype)
    model = cls.from_pretrained(model_path(name), revision=revision, dtype=torch_dtype,
                                quantization_config=qc, trust_remote_code=trust_remote_code,
                                device_map={"": device} if qc is not None else None)
    if qc is None:
        model.to(device)
    elif quantization == "4bit" and device == "cpu":
        _keep_4bit_trainable_on_cpu(model)
    model.eval()
    return model


def _keep_4bit_trainable_on_cpu(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its AVX-512 BF16 CPU kernel.

    bitsandbytes (0.50) repacks a ``Linear4bit`` at its first eval-mode forward without
    gradients (generation, reference log-probs) on CPUs with AVX-512 BF16, for good; that
    kernel has no backward, so later training steps pass no gradient through the frozen 4-bit
    layers and every LoRA adapter below the top one learns from a wrong gradient, silently
    (``tests/test_train.py::test_qlora_gradients_survive_an_eval_forward``). The packed layout
    only speeds up CPU inference, so the harness keeps the trainable one."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base(cfg, base: str | None = None):
    """(model, tokenizer) for the configured base model; ``base`` overrides where it is
    loaded from (the loop resolves the base once per run, so every stage sees one build)."""
    m = cfg.model
    base = base or model_path(m.base, m.gguf_file)
    tok = load_tokenizer(base, m.revision, m.chat_template, m.trust_remote_code)
    model = load_model(base, revision=m.revision, dtype=m.dtype, quantization=m.quantization,
                       device=m.device, trust_remote_code=m.trust_remote_code)
    if m.quantization != "none":
        prepare_quantized(model, cfg.training.gradient_checkpointing)
    return model, tok


def prepare_quantized(model, gradient_checkpointing: bool):
    """peft's k-bit preparation of a quantized base (its other floating weights -- embeddings,
    norms, head -- in float32, every base weight frozen, gradient checkpointing as configured),
    applied at every quantized load: iteration 0 is evaluated with the numerics that later
    iterations' bases and training have, not with the checkpoint's dtype."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    model.eval()
    return model


def release_memory() -> None:
    """Give back the memory of models nothing refers to any more, before another model or
    engine starts: a trained model lives in reference cycles (trl and accelerate rebind its
    ``forward``), which only the garbage collector frees, and on CUDA the freed blocks stay in
    torch's cache, out of reach of a vLLM engine or another process, until emptied."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def off_gpu(model) -> Iterator[None]:
    """``model`` on the CPU while something else holds the GPU (a vLLM engine, a judge model),
    back on its device afterwards, also when the block fails. A model not on CUDA does not move
    (a cheap no-op)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        yield
        return
    model.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        model.to(device)


def offline_env() -> None:
    """No hub at run time unless the user opts in (HARNESS_ONLINE=1)."""
    if os.environ.get("HARNESS_ONLINE") != "1":
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_policy(cfg, adapters: list[Path], tokenizer=None, base: str | None = None):
    """model_t for the chain of saved adapters ``adapters`` (oldest first).

    merge: base with every adapter merged in order (a plain model);
    continue: base + the newest adapter only (it already carries the earlier
    iterations), trainable so the next iteration can continue it.
    """
    from peft import PeftModel

    model, tok = load_base(cfg, base)
    if cfg.chain == "merge":
        for path in adapters:
            model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    elif adapters:  # a quantized base comes prepared (load_base)
        model = PeftModel.from_pretrained(model, str(adapters[-1]), is_trainable=True)
    model.eval()
    return model, tokenizer or tok
