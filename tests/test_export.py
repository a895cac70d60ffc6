"""``harness export``: an iterate of a tiny SPIN run (2 iterations, merge chain) as a Hugging
Face directory that transformers loads and that gives the harness's own log-probs for that
iterate, its model card with the run's numbers and their protocols, the directory as the base
of a new experiment, the chain as one peft adapter, and one-line refusals. A 4-bit continue
chain is checked on its own, without a run.

Tolerances (nats per sequence, sums over an answer's tokens): float32, 1e-4 (measured: up to
3e-6 between the exported model and the harness's merged policy, both float32, and 8e-6 for
the combined adapter; a forward's summation order is all that differs); a 4-bit base, 1e-3
(measured 8e-6 with float32 compute on this CPU; the exported model computes with the 4-bit
layers' dequantized weights in float32, and 4-bit kernels that compute in bfloat16 would add
their rounding). Keeping the original weights instead moves the 4-bit case by 2.7e-2.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from harness import fmt
from harness.console import terminal as console
from harness.store import files as store
from harness.cli import main
from harness.config.experiment import parse
from harness.export import EXPORT_FILE, ExportError, adapter_chain, find_iterate, full_precision_policy, write_adapter
from harness.models.load import load_model, load_policy
from harness.report.protocol import label, record, scope_of
from harness.store.rundir import RunDir
from harness.train import pair_logps
from test_train import qlora_dir  # noqa: F401  (the 4-bit-able tiny model fixture)

pytestmark = pytest.mark.slow

F32_TOL = 1e-4
Q4_TOL = 1e-3


def spin_doc(out: Path) -> dict:
    return {"experiment": {"name": "exp-spin", "seed": 0, "output_dir": str(out)},
            "model": {"base": "tiny", "device": "cpu", "cpu_threads": 1},
            "lora": {"r": 4, "alpha": 8},
            "method": {"name": "spin", "iterations": 2, "beta": 0.1, "spin": {"data_mix": "newest"}},
            "data": {"train": "tiny:sft_train", "num_prompts": 16},
            "generation": {"max_new_tokens": 12, "batch_size": 16},
            # probe_share 1: the probe's "after" log-probs cover every pair an iteration trained on
            "training": {"learning_rate": 5e-3, "epochs": 1, "batch_size": 8, "max_length": 96,
                         "warmup_ratio": 0.0, "probe_share": 1.0},
            "eval": {"lm_eval_tasks": ["tiny:lm_eval"], "limit": 8, "batch_size": 32,
                     "alpaca_eval": {"instructions": "tiny:alpaca_eval", "limit": 8, "max_new_tokens": 12,
                                     "judge": {"name": "oracle"}},
                     "indicators": {"num_prompts": 0}}}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny SPIN run with 2 iterations (merge chain: 2 adapters)."""
    from harness.run.loop import run_experiment

    console.reset()
    try:
        run_dir, _ = run_experiment(parse(spin_doc(tmp_path_factory.mktemp("runs")), "spin.toml"))
    finally:
        console.reset()
    return run_dir


def export(*args) -> int:
    code = main(["export", *map(str, args)])
    console.reset()
    return code


def logps(model, tok, pairs) -> list[float]:
    chosen, rejected = pair_logps(model, tok, pairs, 96)
    return chosen + rejected


def test_the_exported_model_is_the_final_iterate(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model"
    assert export(run, "--out", out) == 0
    it = find_iterate(run)
    assert it.iteration == 2 and it.cfg.chain == "merge" and len(it.adapters) == 2
    # the chain as the loop recorded it: iteration 2 trained against model_1's adapters
    recorded = store.read_json(RunDir(run).manifest(2, "train"))["outputs"]["reference"]["adapters"]
    assert [str(p) for p in adapter_chain(RunDir(run), "merge", 1)] == recorded
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.float32
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    policy, ptok = load_policy(it.cfg, it.adapters, base=it.base)
    assert tok.chat_template == ptok.chat_template and tok.pad_token_id == ptok.pad_token_id
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ptok.eos_token_id and gen["pad_token_id"] == ptok.pad_token_id
    pairs = store.read_jsonl(RunDir(run).pairs(2))
    got, want = logps(model, tok, pairs), logps(policy, ptok, pairs)
    gap = max(abs(a - b) for a, b in zip(got, want))
    print(f"|exported - harness policy| per sequence, max over {len(got)}: {gap:.1e} nats")
    assert gap < F32_TOL
    base = logps(load_model(it.base, device="cpu"), ptok, pairs)
    assert max(abs(a - b) for a, b in zip(got, base)) > 100 * F32_TOL  # the chain matters
    # independently of how the chain is rebuilt: the run's own probe after iteration 2's training
    m = store.read_json(RunDir(run).manifest(2, "train"))["outputs"]["metrics"]
    assert m["train/probe_pairs"] == len(pairs) == m["train/n_pairs"]
    chosen = got[:len(pairs)]
    assert sum(chosen) / len(chosen) == pytest.approx(m["train/logp_chosen"], abs=F32_TOL)
    assert abs(m["train/logp_chosen"] - m["train/logp_chosen_before"]) > 100 * F32_TOL


def test_the_model_card_has_the_runs_numbers_with_their_protocols(run, tmp_path):
    out = tmp_path / "model"
    assert export(run, "--out", out, "--iteration", 1) == 0
    card = (out / "README.md").read_text()
    row = next(r for r in store.read_jsonl(RunDir(run).results) if r["iteration"] == 1)
    cfg = store.read_json(RunDir(run).config)
    base = store.read_json(RunDir(run).provenance)["models"]["base"]
    assert "# exp-spin: spin, iteration 1" in card and "--iteration 1" in card
    assert f"`{cfg['hash']}`" in card and f"weights fingerprint `{base['fingerprint']}`" in card
    assert "revision `main`" in card
    lines = {line.split("`")[1]: line for line in card.splitlines() if line.startswith("| ") and "`" in line}
    evaluated = [k for k in row["metrics"] if k.startswith(("lm_eval/", "alpaca_eval/")) and "stderr" not in k
                 and k != "alpaca_eval/standard_error"]
    assert "lm_eval/tiny_gen/exact_match" in evaluated and "alpaca_eval/win_rate" in evaluated
    for key in evaluated:
        cells = [c.strip() for c in lines[key].split("|")[1:-1]]
        assert cells[1].split(" ± ")[0] == fmt.number(row["metrics"][key], grouped=False), key
        assert cells[3] == label(record(row, scope_of(key)), scope=scope_of(key)), key
    assert "harness rubric: oracle vs tiny_reference, answers capped at 12 tokens" in lines["alpaca_eval/win_rate"]
    assert "0-shot, chat template" in lines["lm_eval/tiny_gen/exact_match"]
    assert lines["train/loss"].split("|")[2].strip() == fmt.number(row["metrics"]["train/loss"], grouped=False)
    saved = json.loads((out / EXPORT_FILE).read_text())
    assert saved["results_row"] == row and saved["iteration"] == 1 and saved["config_hash"] == cfg["hash"]
    assert [a["path"] for a in saved["adapters"]] == ["iter_001/train/adapter"]


def test_the_export_is_the_base_of_a_new_experiment(run, tmp_path):
    """It validates as model.base, and a run from it measures at its iteration 0 what the
    exporting run measured at the exported iteration (the same evaluations of the same model)."""
    out = tmp_path / "model"
    assert export(run, "--out", out) == 0
    doc = spin_doc(tmp_path / "runs")
    doc["experiment"]["name"] = "next"
    doc["model"]["base"] = str(out)
    doc["method"]["iterations"] = 1
    (tmp_path / "next.toml").write_text(toml(doc))
    assert main(["validate", str(tmp_path / "next.toml")]) == 0
    console.reset()
    assert main(["run", str(tmp_path / "next.toml"), "-q"]) == 0
    console.reset()
    then = next(r for r in store.read_jsonl(RunDir(run).results) if r["iteration"] == 2)["metrics"]
    now = store.read_jsonl(RunDir(tmp_path / "runs" / "next").results)[0]["metrics"]
    evaluated = [k for k in then if k.startswith(("lm_eval/", "alpaca_eval/"))]
    assert "alpaca_eval/win_rate" in evaluated and "lm_eval/tiny_gen/exact_match" in evaluated
    assert {k: now[k] for k in evaluated} == {k: then[k] for k in evaluated}


def toml(doc: dict, prefix: str = "") -> str:
    """A TOML document of nested dicts of strings, numbers and lists of strings."""
    scalars = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    text = f"[{prefix}]\n" if prefix and scalars else ""
    text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in scalars.items())
    for k, v in doc.items():
        if isinstance(v, dict):
            text += toml(v, f"{prefix}.{k}" if prefix else k)
    return text


def test_adapter_only_is_the_chain_as_one_peft_adapter(run, tmp_path):
    from peft import PeftModel

    out = tmp_path / "adapter"
    assert export(run, "--out", out, "--adapter-only") == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 8  # two rank-4 adapters side by side, scaling 1
    assert not (out / "model.safetensors").exists() and "library_name: peft" in (out / "README.md").read_text()
    it = find_iterate(run)
    policy, tok = load_policy(it.cfg, it.adapters, base=it.base)
    loaded = PeftModel.from_pretrained(load_model(it.base, device="cpu"), str(out)).eval()
    pairs = store.read_jsonl(RunDir(run).pairs(2))
    got, want = logps(loaded, tok, pairs), logps(policy, tok, pairs)
    assert max(abs(a - b) for a, b in zip(got, want)) < F32_TOL
    # one adapter (iteration 1 of the merge chain) is that adapter, byte for byte
    one = tmp_path / "one"
    assert export(run, "--out", one, "--adapter-only", "--iteration", 1) == 0
    saved = RunDir(run).stage(1, "train") / "adapter"
    assert (one / "adapter_model.safetensors").read_bytes() == (saved / "adapter_model.safetensors").read_bytes()
    # adapters whose updates concatenated ranks do not sum exactly (here: DoRA) are refused
    dora = tmp_path / "dora"
    shutil.copytree(it.adapters[1], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (tmp_path / "refused").mkdir()
    with pytest.raises(ExportError, match="cannot be combined exactly with the chain's other adapters: it uses DoRA"):
        write_adapter(it.cfg, [it.adapters[0], dora], it.base, tmp_path / "refused")


def _one_error(capfd) -> str:
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: harness export: "), lines
    return lines[0]


def test_refusals_are_one_line_and_write_nothing(run, tmp_path, capfd):
    out = tmp_path / "out"
    assert export(tmp_path, "--out", out) == 1
    assert "is not a run directory" in _one_error(capfd)
    seeds = tmp_path / "seeds"  # an experiment run with several seeds: a run directory per seed
    (seeds / "seed-0").mkdir(parents=True)
    (seeds / "seed-0" / "config.json").write_text("{}")
    assert export(seeds, "--out", out) == 1
    assert "is not a run directory (no config.json and provenance.json); its seeds' runs are seed-0" \
        in _one_error(capfd)
    assert export(run, "--out", out, "--iteration", 3) == 1
    assert "the run has iterations 0-2, not 3" in _one_error(capfd)
    assert export(run, "--out", out, "--iteration", 0, "--adapter-only") == 1
    assert "iteration 0 is the base model itself: it has no adapter" in _one_error(capfd)
    full = tmp_path / "full"
    (full / "x").mkdir(parents=True)
    assert export(run, "--out", full) == 1
    assert "exists and is not an empty directory" in _one_error(capfd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "seeds"]  # no out, no temporary directory left
    # an adapter changed after its stage finished is not exported with the others
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    weights = copy / "iter_002" / "train" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert export(copy, "--out", out) == 1
    assert "the adapter changed since its stage finished" in _one_error(capfd)
    assert not out.exists()


def test_an_unfinished_run_exports_its_last_finished_iteration(run, tmp_path, capfd):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    layout = RunDir(copy)
    layout.final.unlink()
    store.write_jsonl(layout.results, [r for r in store.read_jsonl(layout.results) if r["iteration"] < 2])
    out = tmp_path / "model"
    out.mkdir()  # an empty directory is replaced
    assert export(copy, "--out", out) == 0
    said = "no final.json (the run has not finished): the last finished iteration"
    assert f"iteration 1: {said}" in capfd.readouterr().err
    assert json.loads((out / EXPORT_FILE).read_text())["iteration"] == 1
    card = (out / "README.md").read_text()
    assert "# exp-spin: spin, iteration 1" in card and said in card
    assert export(copy, "--out", tmp_path / "other", "--iteration", 2) == 1
    assert "iteration 2 is not finished (finished iterations: 0-1)" in _one_error(capfd)
    # a final.json from before the run's last start (resumed for more iterations) is not its choice
    shutil.copy2(run / "final.json", layout.final)  # iteration 2, chosen by the finished 2-iteration run
    os.utime(layout.final, ns=(layout.config.stat().st_mtime_ns - 10**9,) * 2)
    assert export(copy, "--out", tmp_path / "third") == 0
    assert "final.json is older than the run's last start" in capfd.readouterr().err
    assert json.loads((tmp_path / "third" / EXPORT_FILE).read_text())["iteration"] == 1


def test_a_4bit_continue_chain_is_dequantized_then_merged_in_float32(qlora_dir, tmp_path):
    """The exported float32 model computes what the harness's 4-bit policy computes (the same
    dequantized weights plus the adapter), not the original weights plus the adapter."""
    pytest.importorskip("bitsandbytes")
    from peft import get_peft_model
    from test_train import PAIRS, make_cfg

    from harness.train import lora_config

    cfg = make_cfg(qlora_dir, tmp_path, model={"quantization": "4bit"})
    assert cfg.chain == "continue"
    base, _ = load_policy(cfg, [])
    torch.manual_seed(0)
    peft = get_peft_model(base, lora_config(cfg.lora))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    adapter = tmp_path / "a1"
    peft.save_pretrained(str(adapter))
    del base, peft
    policy, tok = load_policy(cfg, [adapter])
    exported, _ = full_precision_policy(cfg, [adapter], str(qlora_dir))
    assert {p.dtype for p in exported.parameters()} == {torch.float32}
    assert not hasattr(exported, "peft_config") and getattr(exported.config, "quantization_config", None) is None
    got, want = logps(exported, tok, PAIRS), logps(policy, tok, PAIRS)
    gap = max(abs(a - b) for a, b in zip(got, want))
    unquantized = full_precision_policy(make_cfg(qlora_dir, tmp_path, lora={"chain": "continue"}), [adapter],
                                        str(qlora_dir))[0]
    plain = logps(unquantized, tok, PAIRS)
    moved = max(abs(a - b) for a, b in zip(plain, want))
    print(f"4-bit: |exported - harness policy| {gap:.1e} nats; original weights + adapter {moved:.1e}")
    assert gap < Q4_TOL and moved > 10 * Q4_TOL  # the quantization's rounding is part of the iterate
    # --adapter-only of a continue chain: its adapter as saved
    out = tmp_path / "adapter"
    out.mkdir()
    assert write_adapter(cfg, [adapter], str(qlora_dir), out) == cfg.lora.r
    assert (out / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()


def test_a_bfloat16_base_is_upcast_and_the_update_kept_in_float32(tiny_dir, tmp_path):
    """A bfloat16 run (continue chain): the exported weights are the run's bfloat16 base values
    plus the adapter's whole update in float32, which bfloat16 could not hold."""
    from peft import get_peft_model
    from test_train import make_cfg

    from harness.train import lora_config

    cfg = make_cfg(tiny_dir, tmp_path, model={"dtype": "bfloat16"})
    assert cfg.chain == "continue"
    torch.manual_seed(0)
    peft = get_peft_model(load_model(str(tiny_dir), device="cpu"), lora_config(cfg.lora))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.01)  # an update of ~1e-4 per weight, far below bfloat16's spacing there
    adapter = tmp_path / "a1"
    peft.save_pretrained(str(adapter))
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    exported, _ = full_precision_policy(cfg, [adapter], str(tiny_dir))
    base = load_model(str(tiny_dir), dtype="bfloat16", device="cpu")
    held = base.model.layers[0].self_attn.q_proj.weight.float()
    got = exported.model.layers[0].self_attn.q_proj.weight
    assert got.dtype == torch.float32 and exported.config.dtype == torch.float32
    assert torch.allclose(got, held + delta, atol=1e-7, rtol=0)
    assert torch.equal(exported.model.embed_tokens.weight, base.model.embed_tokens.weight.float())
    off_grid = (got != got.bfloat16().float()).float().mean()
    assert off_grid > 0.9  # saved in bfloat16, the update would be rounded away
