"""Defaults that depend on the device: model.dtype "auto" is bfloat16 where the model runs on
CUDA and float32 on a CPU, resolved once at parse time (so a CPU run's hash and recorded config
are those of an explicit float32); an explicit float32 on CUDA is a validate warning; every
model loaded on CUDA runs its float32 matmuls in TF32."""

from __future__ import annotations

import copy

import pytest
import torch
from test_validate import run_validate, spin, world  # noqa: F401  (world: the fixture)

from harness.models import load as models
from harness.config.experiment import parse

DOC = {"experiment": {"name": "x"}, "model": {"base": "tiny", "device": "cpu"}, "method": {"name": "spin"},
       "data": {"train": "tiny:sft_train"}}


def with_model(**fields) -> dict:
    doc = copy.deepcopy(DOC)
    doc["model"].update(fields)
    return doc


def test_dtype_defaults_to_bfloat16_on_cuda_and_float32_on_a_cpu(monkeypatch):
    on_cuda = parse(with_model(device="cuda"))
    assert on_cuda.model.dtype == "bfloat16" and on_cuda.to_dict()["model"]["dtype"] == "bfloat16"
    assert on_cuda.chain == "continue"  # a bfloat16 base never merges (lora.chain)
    assert parse(with_model(device="cpu")).model.dtype == "float32"
    assert parse(with_model(device="cuda", dtype="float32")).model.dtype == "float32"  # set: kept
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse(with_model(device="auto")).model.dtype == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse(with_model(device="auto")).model.dtype == "bfloat16"


def test_a_cpu_run_records_and_hashes_the_dtype_it_uses():
    """The resolved dtype is what the hash and config.json see: a CPU config without model.dtype is
    the config with float32 written out (its run directories stay reusable), never "auto"."""
    unset, explicit = parse(with_model()), parse(with_model(dtype="float32"))
    assert unset.to_dict() == explicit.to_dict() and unset.hash() == explicit.hash()
    assert unset.to_dict()["model"]["dtype"] == "float32" and unset.chain == "merge"
    assert parse(with_model(device="cuda")).hash() != parse(with_model(device="cuda", dtype="float32")).hash()


def model_dtype_warnings(err: str, path) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{path}: model.dtype: warning:")
            or line.startswith(f"{path}: --set model.dtype: warning:")]


def test_float32_on_cuda_is_a_validate_warning(world, tiny_dir, capsys):
    cuda = spin(world, tiny_dir).replace('device = "cpu"', 'device = "cuda"').replace(
        'name = "x"', 'name = "x"\nrequires = ["gpu"]')
    code, path, err = run_validate(world, cuda.replace('device = "cuda"', 'device = "cuda"\ndtype = "float32"'), capsys)
    assert code == 0, err
    (line,) = model_dtype_warnings(err, path)
    assert "twice the memory of bfloat16" in line
    code, path, err = run_validate(world, cuda, capsys)
    assert code == 0 and model_dtype_warnings(err, path) == [], err
    code, path, err = run_validate(world, cuda, capsys, "--set", "model.dtype=float32")
    assert code == 0 and len(model_dtype_warnings(err, path)) == 1 and "--set model.dtype: warning:" in err, err
    code, path, err = run_validate(world, spin(world, tiny_dir), capsys)  # float32 on a CPU: no warning
    assert code == 0 and model_dtype_warnings(err, path) == [], err


@pytest.fixture
def ieee_float32():
    """TF32 off for the test, the process's settings back after it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_is_on_for_models_on_cuda_only(tiny_dir, monkeypatch, ieee_float32):
    seen = []
    monkeypatch.setattr(models, "use_tf32", lambda device, _real=models.use_tf32: (seen.append(device), _real(device)))
    models.load_model(str(tiny_dir), device="cpu")
    assert seen == ["cpu"] and not torch.backends.cuda.matmul.allow_tf32  # a CPU load leaves float32 IEEE
    models.use_tf32("cuda")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_cuda_loads_in_bfloat16_with_tf32(tiny_dir):
    cfg = parse(with_model(base=str(tiny_dir), device="auto"))
    model, _ = models.load_base(cfg)
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).is_cuda
    assert torch.backends.cuda.matmul.allow_tf32
