"""Precision and seeding of the iteration chain: a bfloat16 base keeps every update
(no merge into bf16 weights), a merge is checked against the unmerged model, float16 is
rejected, and the continue chain's first adapter follows experiment.seed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from full_forward import sequence_logprobs
from harness.models.load import load_policy
from harness.train import train_dpo
from test_train import PAIRS, make_cfg


@pytest.fixture(scope="module")
def small_init_dir(tmp_path_factory):
    """A random tiny Llama with a real model's weight scale (sd 0.02), saved in float32."""
    from transformers import LlamaForCausalLM

    from test_eval_fixtures import build_tokenizer, tiny_llama_config

    out = tmp_path_factory.mktemp("small_init")
    tok = build_tokenizer(["the quick brown fox jumps over the lazy dog 0123456789 what is plus no yes"] * 10)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tok, hidden_size=64, intermediate_size=128, initializer_range=0.02)
                     ).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _chosen(model, tok):
    return sequence_logprobs(model, tok, [p["messages"] for p in PAIRS], [p["chosen"] for p in PAIRS])


def test_bfloat16_chain_keeps_a_small_update(small_init_dir, tmp_path):
    """A small LoRA update (lr 2e-5, a few steps) on a bf16 base: the next iteration's model
    (loaded the way the loop loads it) is the trained model. Merging the delta into bf16
    weights (the old "auto" chain) rounded most of it away: the next model was close to the
    base, and this failed."""
    cfg = make_cfg(small_init_dir, tmp_path, model={"dtype": "bfloat16"},
                   training={"learning_rate": 2e-5, "batch_size": 2}, lora={"r": 8, "alpha": 16})
    assert cfg.chain == "continue"
    model, tok = load_policy(cfg, [])
    assert next(model.parameters()).dtype == torch.bfloat16
    base = _chosen(model, tok)
    metrics, trained = train_dpo(model, tok, PAIRS, cfg, 1, tmp_path / "it1")
    trained.eval()
    end = _chosen(trained, tok)
    nxt, _ = load_policy(cfg, [tmp_path / "it1" / "adapter"])
    after = _chosen(nxt, tok)
    moved = max(abs(a - b) for a, b in zip(end, base))
    assert moved > 1e-3, f"training moved the log-probs by only {moved:.3g}: the test cannot tell"
    lost = max(abs(a - b) for a, b in zip(after, end))
    assert lost < 0.05 * moved, f"the next iteration lost {lost:.3g} of an update of {moved:.3g}"


def test_merge_into_bfloat16_is_rejected_with_the_reason(small_init_dir, tmp_path):
    from harness.config.schema import ConfigError

    with pytest.raises(ConfigError, match=r"lora.chain: merge would fold .* bfloat16 weights, which rounds"):
        make_cfg(small_init_dir, tmp_path, model={"dtype": "bfloat16"}, lora={"chain": "merge"})


def test_merge_gap_is_measured_after_training(small_init_dir, tmp_path):
    """merge chain (float32): train/merge_gap compares the trained model with its adapter
    merged (peft's merge, as load_policy runs it) and unmerged; the model is restored."""
    cfg = make_cfg(small_init_dir, tmp_path)
    assert cfg.chain == "merge"
    model, tok = load_policy(cfg, [])
    metrics, trained = train_dpo(model, tok, PAIRS, cfg, 1, tmp_path / "it1")
    assert metrics["train/merge_gap"] is not None and 0 <= metrics["train/merge_gap"] < 1e-3
    assert not any(getattr(m, "merged", False) for m in trained.modules())
    nxt, _ = load_policy(cfg, [tmp_path / "it1" / "adapter"])
    trained.eval()
    assert _chosen(nxt, tok) == pytest.approx(_chosen(trained, tok), abs=1e-3)
    cont = make_cfg(small_init_dir, tmp_path / "c", lora={"chain": "continue"})
    model, tok = load_policy(cont, [])
    assert train_dpo(model, tok, PAIRS, cont, 1, tmp_path / "c1")[0]["train/merge_gap"] is None


def test_float16_is_rejected_with_the_reason(small_init_dir, tmp_path):
    from harness.config.schema import ConfigError

    with pytest.raises(ConfigError, match="model.dtype: float16 training needs loss scaling"):
        make_cfg(small_init_dir, tmp_path, model={"dtype": "float16"})


_FIRST_ADAPTER = """
import sys, torch
sys.path.insert(0, {tests!r})
import harness.judges, harness.methods  # noqa: F401,E401  (register the judges and methods)
from harness.models.load import load_policy
from harness.train.trainer import prepare_policy
from test_train import make_cfg
torch.manual_seed(int(sys.argv[2]))  # whatever the process did before must not matter
cfg = make_cfg(sys.argv[1], "/tmp", lora={{"chain": "continue"}}, experiment={{"seed": int(sys.argv[3])}})
model, _ = load_policy(cfg, [])
policy, _ = prepare_policy(model, cfg, 1)
print(sum(float(p.double().sum() * (i + 1)) for i, (n, p) in enumerate(policy.named_parameters()) if "lora_A" in n))
"""


def test_continue_chain_first_adapter_follows_the_experiment_seed(small_init_dir, tmp_path):
    """Two processes with the same experiment.seed (and different torch states before)
    create the same first adapter; another seed, another adapter."""
    import os

    script = tmp_path / "first_adapter.py"
    script.write_text(_FIRST_ADAPTER.format(tests=os.path.dirname(__file__)))

    def run(torch_seed, seed):
        out = subprocess.run([sys.executable, str(script), str(small_init_dir), str(torch_seed), str(seed)],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    a, b, c = run(1, 0), run(2, 0), run(1, 5)
    assert a == b and a != c
