"""The harness's side of lm-eval through vLLM (``harness.evaluate.lm_eval_vllm``), without vLLM: a
fake vLLM environment whose Python keeps the job it is given and fails as a worker fails. That
the real worker's numbers equal ``lm_eval --model vllm``: tests/test_vllm.py (the vLLM tier)."""

from __future__ import annotations

import json

import pytest

from test_eval_fixtures import MC_YAML, tiny, tiny_dir  # noqa: F401  (fixtures)

from harness.config.eval_sections import EvalSection
from harness.engines.vllm_client import WorkerError
from harness.evaluate.lm_eval_vllm import run_lm_eval_vllm


def fake_environment(root, monkeypatch, script: str, lm_eval: bool = True):
    """A vLLM environment at ``root`` whose Python is ``script``, with (or without) lm-eval and
    the "vllm" distribution lm-eval reads, as ./install.sh --vllm leaves them."""
    py = root / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text(script)
    py.chmod(0o755)
    site = root / "lib" / "python3.11" / "site-packages"
    (site / "vllm-0.32.0+cpu.dist-info").mkdir(parents=True)
    if lm_eval:
        (site / "lm_eval-0.4.13.dist-info").mkdir()
    monkeypatch.setenv("HARNESS_VLLM_PYTHON", str(py))


def test_the_job_carries_the_evaluations_settings_and_a_failure_is_one_line(tiny, tmp_path, monkeypatch):
    """A PeftModel served as "adapter" on a CPU: lm-eval is given the task specs, the shots table,
    limit, chat template with multi-turn few-shot, the system prompt, lm-eval's default seeds, the
    base and adapter directories with max_lora_rank from the adapter's rank, and one request at a
    time (vLLM's CPU LoRA path); the worker's failure is a WorkerError whose first line names its
    exception, and no metrics are written."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    seen = tmp_path / "seen"
    seen.mkdir()
    # keeps the job and lists what the served directories hold, then dies as vLLM does
    fake_environment(tmp_path / "venv", monkeypatch, (
        "#!/bin/sh\n"
        f'cp "$2" {seen}/job.json\n'
        f'python3 -c "import json,os,sys; a=json.load(open(sys.argv[1]))[\'model_args\']; '
        f'print(json.dumps({{k: sorted(os.listdir(a[k])) for k in (\'pretrained\', \'tokenizer\', \'lora_local_path\')}}))" '
        f'"$2" > {seen}/dirs.json\n'
        "echo 'INFO starting' >&2\n"
        "echo '(EngineCore pid=7) RuntimeError: Worker failed with error einsum()' >&2\n"
        "exit 1\n"))
    model, tok = tiny
    policy = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps({"question": f"{i} plus {i}?", "choices": ["a", "b"],
                                                           "label": i % 2}) + "\n" for i in range(4)))
    (tmp_path / "mc.yaml").write_text(MC_YAML.format(name="t_mc", extra="", data=tmp_path / "mc.jsonl"))
    section = EvalSection(lm_eval_tasks=(str(tmp_path / "mc.yaml"),), limit=3, num_fewshot={"t_mc": 1},
                          backend="vllm")
    with pytest.raises(WorkerError) as e:
        run_lm_eval_vllm(policy, tok, section, tmp_path / "out", weights="adapter", max_num_seqs=8,
                         system_prompt="Be brief.")
    first = str(e.value).splitlines()[0]
    assert first.startswith("lm-eval through vLLM failed (rc=1): RuntimeError: Worker failed with error einsum()"), first
    assert str(tmp_path / "out" / "vllm.log") in first
    assert not (tmp_path / "out" / "metrics.json").exists()
    job = json.loads((seen / "job.json").read_text())
    args = job.pop("model_args")
    assert {k: v for k, v in job.items() if k not in ("out", "include")} == {
        "tasks": [str(tmp_path / "mc.yaml")], "builtin": False, "shots": {"t_mc": 1}, "where": "eval.num_fewshot",
        "limit": 3, "batch_size": 1, "apply_chat_template": True, "fewshot_as_multiturn": True,
        "system_instruction": "Be brief.", "seeds": {}}
    assert {k: args[k] for k in ("dtype", "seed", "max_num_seqs", "enforce_eager", "max_lora_rank")} == {
        "dtype": "float32", "seed": 1234, "max_num_seqs": 8, "enforce_eager": True, "max_lora_rank": 8}
    dirs = json.loads((seen / "dirs.json").read_text())
    assert dirs["pretrained"] == ["config.json", "model.safetensors"]  # the base alone; the adapter beside it
    assert "adapter_config.json" in dirs["lora_local_path"] and "tokenizer_config.json" in dirs["tokenizer"]


def test_an_environment_without_lm_eval_is_refused_before_any_export(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    fake_environment(tmp_path / "venv", monkeypatch, "#!/bin/sh\nexit 0\n", lm_eval=False)
    model, tok = tiny
    with pytest.raises(WorkerError, match=r"eval.backend = \"vllm\": the vLLM environment has no lm-eval"):
        run_lm_eval_vllm(model, tok, EvalSection(lm_eval_tasks=("x.yaml",), backend="vllm"), tmp_path / "out")
    assert not (tmp_path / "cache").exists()
