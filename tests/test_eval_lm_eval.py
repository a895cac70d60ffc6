"""The lm-eval adapter reports exactly what the ``lm_eval`` command line reports
for the same saved model, tasks and settings (offline, local task files): each task at
its own YAML's few-shot count when none is set, as the command line without
``--num_fewshot``, and at the given count when one is."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from test_eval_fixtures import MC_YAML, OFFLINE_ENV, beside_lm_eval_cli, SHARED_DATA, build_tiny_model, datasets_cache, require, tiny, tiny_dir  # noqa: F401

from harness.config.eval_sections import EvalSection
from harness.evaluate import lm_eval_adapter
from harness.evaluate.lm_eval_adapter import _check_names, flat_metrics, primary_key, resolve_task_specs, run_lm_eval

LIMIT = 6
BATCH = 4
GSM8K = SHARED_DATA / "gsm8k"

GEN_YAML = """task: t_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""



# lm-eval's own gsm8k task with the data pointed at the local copy
GSM8K_YAML = """include: {builtin}
task: gsm8k_local
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
generation_kwargs:
  until: ["Question:", "</s>"]
  do_sample: false
  max_gen_toks: 16
"""


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _gen_task(d: Path, answers: list[str], tag: str, extra: str = "") -> None:
    data = d / f"gen_{tag}.jsonl"  # a new file name per version: the datasets cache never serves an old one
    _write_jsonl(data, [{"question": f"say {i} {w}", "answer": a}
                        for i, (w, a) in enumerate(zip(["fox", "dog", "yes", "no"] * 2, answers))])
    (d / "gen.yaml").write_text(GEN_YAML.format(data=data) + extra)


# t_gen's YAML sets its own few-shot count; t_mc's sets none (0); lm-eval's gsm8k YAML sets 5
OWN_SHOTS = {"t_gen": 3, "t_mc": 0, "gsm8k_local": 5}


@pytest.fixture(scope="module", params=[None, 0], ids=["own-shots", "0-shot"])
def runs(tmp_path_factory, request):
    """Adapter run and command-line run over the same tasks: with no few-shot setting (each
    task at its own YAML's count; the command line without --num_fewshot), and with 0 for
    every task (--num_fewshot 0, which overrides t_gen's 3 and gsm8k's 5); returns both
    results and the shots each task should have used."""
    shots = request.param
    import datasets
    from lm_eval import tasks as lm_tasks

    from harness.models.load import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("lm_eval")
    old_cache = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = str(root / "hf_datasets")
    try:
        model_dir = build_tiny_model(root / "model")
        model, tok = load_model(str(model_dir), device="cpu"), load_tokenizer(str(model_dir))
        tasks = root / "tasks"
        tasks.mkdir()
        # pass 1 learns the model's greedy answers; pass 2 makes every even one the target,
        # so exact_match is a non-trivial 0.5 rather than the 0 of a random model
        _gen_task(tasks, ["x"] * 8, "v1")
        first = EvalSection(lm_eval_tasks=(str(tasks / "gen.yaml"),), batch_size=BATCH, limit=LIMIT)
        run_lm_eval(model, tok, first, root / "pass1")
        resps = [json.loads(line)["filtered_resps"][0] for line in (root / "pass1/samples_t_gen.jsonl").open()]
        _gen_task(tasks, [r if i % 2 == 0 else "no match" for i, r in enumerate(resps)] + ["x", "x"], "v2",
                  extra=f"num_fewshot: {OWN_SHOTS['t_gen']}\n")
        _write_jsonl(tasks.parent / "mc.jsonl", [
            {"question": f"what is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1), "fox", "yes"],
             "label": (i * 7) % 4} for i in range(12)])
        (tasks / "mc.yaml").write_text(MC_YAML.format(name="t_mc", extra='  - metric: acc_norm\n', data=tasks.parent / "mc.jsonl"))
        if GSM8K.is_dir():
            builtin = Path(lm_tasks.__file__).parent / "gsm8k" / "gsm8k.yaml"
            (tasks / "gsm8k_local.yaml").write_text(GSM8K_YAML.format(
                builtin=builtin, train=GSM8K / "train.jsonl", test=GSM8K / "test.jsonl"))

        section = EvalSection(lm_eval_tasks=(str(tasks),), batch_size=BATCH, limit=LIMIT, num_fewshot=shots,
                              apply_chat_template=True)
        cli_out = root / "cli"
        # the same torch thread count as this process, so per-sample log-likelihoods agree to the bit
        env = {**os.environ, **OFFLINE_ENV, "HF_HOME": str(root / "hf_home"),
               "HF_DATASETS_CACHE": str(root / "hf_datasets_cli"), "OMP_NUM_THREADS": str(torch.get_num_threads())}
        cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf",
               "--model_args", f"pretrained={model_dir},dtype=float32",
               "--tasks", ",".join(resolve_task_specs(section.lm_eval_tasks)[0]),
               "--include_path", str(tasks), "--device", "cpu", "--batch_size", str(BATCH),
               "--limit", str(LIMIT), *(["--num_fewshot", str(shots)] if shots is not None else []),
               "--apply_chat_template", "--output_path", str(cli_out), "--log_samples"]
        # the command line spends ~15 s indexing lm-eval's built-in tasks: run ours meanwhile
        ours, cli, cli_dir = beside_lm_eval_cli(cmd, env, cli_out, root / "cli.log",
                                                lambda: run_lm_eval(model, tok, section, root / "ours"), timeout=300)
        return {"ours": ours, "cli": cli, "ours_dir": root / "ours", "cli_dir": cli_dir,
                "shots": OWN_SHOTS if shots is None else dict.fromkeys(OWN_SHOTS, shots)}
    finally:
        datasets.config.HF_DATASETS_CACHE = old_cache


def _cli_samples(cli_dir: Path, task: str) -> list[dict]:
    (path,) = cli_dir.glob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.open()]


def _plain(samples: list[dict], key: str) -> list:
    """The command line's sample logger writes numbers as strings; compare in that form."""
    def leaves(x):
        return [leaves(v) for v in x] if isinstance(x, (list, tuple)) else str(x)
    return [leaves(s[key]) for s in samples]


def _our_samples(ours_dir: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (ours_dir / f"samples_{task}.jsonl").open()]


@pytest.mark.parametrize("task,metric,key", [("t_gen", "exact_match", "exact_match,none"),
                                             ("t_mc", "acc", "acc,none")])
def test_adapter_equals_command_line(runs, task, metric, key):
    ours, cli = runs["ours"], runs["cli"]["results"][task]
    assert ours[f"lm_eval/{task}/{metric}"] == cli[key]
    assert ours[f"lm_eval/{task}/{metric}_stderr"] == cli[key.replace(",", "_stderr,")]
    # the per-sample outputs agree too, not just the aggregate
    a, b = _our_samples(runs["ours_dir"], task), _cli_samples(runs["cli_dir"], task)
    assert _plain(a, "filtered_resps") == _plain(b, "filtered_resps")
    assert len(a) == LIMIT
    # the few-shot examples are in the prompt (each example's question, then the asked one), in the
    # context of every request of the document (one per choice of a multiple-choice task)
    question, requests = ("say ", 1) if task == "t_gen" else ("what is ", 4)
    assert str(a[0]["arguments"]).count(question) == (1 + runs["shots"][task]) * requests


def test_the_protocol_of_each_task_is_recorded(runs):
    """metrics.json records, per task, lm-eval's own n-shot and versions and the chat settings."""
    protocol = json.loads((runs["ours_dir"] / "metrics.json").read_text())["protocol"]
    cli = runs["cli"]
    assert set(protocol) == set(cli["configs"])
    for task, p in protocol.items():
        assert p == {"num_fewshot": runs["shots"][task], "apply_chat_template": True, "fewshot_as_multiturn": True,
                     "system_instruction": "", "lm_eval_version": cli["lm_eval_version"],
                     "task_version": cli["versions"][task], "backend": "hf"}, task
        assert p["num_fewshot"] == cli["n-shot"][task]


def known_answer_model():
    """A tiny Llama whose greedy answer to every prompt is known without running it: every
    layer writes nothing to the residual stream (o_proj and down_proj are zero), every token
    embeds to the same all-ones vector, and lm_head scores only token T (logit 32, all others
    0). So the next token is T everywhere, and an answer of n tokens is T repeated n times."""
    from transformers import LlamaForCausalLM

    from test_eval_fixtures import build_tokenizer, tiny_llama_config

    tok = build_tokenizer(["the quick brown fox jumps over the lazy dog 0123456789 question answer yes no "
                           "user assistant what is plus minus say"] * 10)
    tok.padding_side = "left"
    model = LlamaForCausalLM(tiny_llama_config(tok, tie_word_embeddings=False)).eval()
    (t,) = tok("yes", add_special_tokens=False).input_ids[:1]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[t] = 1.0
    return model, tok, t


def test_generation_metric_is_not_trivial(tmp_path, datasets_cache):
    """exact_match against a model with a known answer: the targets of even docs are that
    answer, so the reported number is 0.5 whatever the adapter's own outputs are."""
    model, tok, t = known_answer_model()
    answer = tok.decode([t] * 6)        # GEN_YAML: max_gen_toks 6, no stop sequence in the answer
    assert answer.strip() and "\n" not in answer
    _gen_task(tmp_path, [answer if i % 2 == 0 else "no match" for i in range(8)], "known")
    section = EvalSection(lm_eval_tasks=(str(tmp_path / "gen.yaml"),), batch_size=BATCH, limit=LIMIT)
    got = run_lm_eval(model, tok, section, tmp_path / "out")
    assert [s["filtered_resps"][0] for s in _our_samples(tmp_path / "out", "t_gen")] == [answer] * LIMIT
    assert got["lm_eval/t_gen/exact_match"] == 0.5   # docs 0, 2, 4 of the first 6


@pytest.mark.slow
@pytest.mark.usefixtures("library_console")
def test_a_harness_run_at_a_tasks_own_shots_equals_the_command_line(tmp_path, datasets_cache):
    """Through a run (SPIN on the tiny world, one iteration): a tiny-world task whose YAML sets
    ``num_fewshot: 2``, with no few-shot setting in the experiment, gives at iteration 0 (the
    tiny model) exactly the number of the ``lm_eval`` command line with the same chat-template
    flag and no --num_fewshot, the same answers, and the row's protocol says 2 shots."""
    from harness.config.experiment import parse
    from harness.run.loop import run_experiment
    from harness.models.sources import resolve_ref
    from harness.tiny.data import lm_eval_yamls

    model_dir = resolve_ref("tiny")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    text = lm_eval_yamls(Path(resolve_ref("tiny:eval")))["tiny_gen"].replace("task: tiny_gen\n", "task: own_gen\n")
    (tasks / "own_gen.yaml").write_text(text + "num_fewshot: 2\n")
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(line + "\n" for line in Path(resolve_ref("tiny:sft_train")).read_text().splitlines()[:16]))
    doc = {"experiment": {"name": "own", "seed": 0, "output_dir": str(tmp_path / "out")},
           "model": {"base": "tiny", "device": "cpu", "cpu_threads": 1}, "lora": {"r": 4, "alpha": 8},
           "method": {"name": "spin", "iterations": 1, "spin": {"temperature": 0.0}}, "data": {"train": str(sft)},
           "generation": {"max_new_tokens": 8, "batch_size": 16},
           "training": {"learning_rate": 5e-4, "batch_size": 8, "max_length": 96, "warmup_ratio": 0.0},
           "eval": {"lm_eval_tasks": [str(tasks)], "limit": LIMIT, "batch_size": BATCH, "indicators": {"num_prompts": 0}}}
    cli_out = tmp_path / "cli"
    env = {**os.environ, **OFFLINE_ENV, "HF_HOME": str(tmp_path / "hf_home"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets_cli"), "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf",
           "--model_args", f"pretrained={model_dir},dtype=float32", "--tasks", "own_gen", "--include_path", str(tasks),
           "--device", "cpu", "--batch_size", str(BATCH), "--limit", str(LIMIT), "--apply_chat_template",
           "--output_path", str(cli_out), "--log_samples"]
    (run_dir, rows), cli, cli_dir = beside_lm_eval_cli(cmd, env, cli_out, tmp_path / "cli.log",
                                                       lambda: run_experiment(parse(doc, "own.toml")), timeout=300)
    row = rows[0]
    assert row["iteration"] == 0
    assert row["protocol"]["lm_eval"]["own_gen"]["num_fewshot"] == cli["n-shot"]["own_gen"] == 2
    assert row["metrics"]["lm_eval/own_gen/exact_match"] == cli["results"]["own_gen"]["exact_match,none"]
    ours = _our_samples(run_dir / "iter_000" / "evaluate" / "lm_eval", "own_gen")
    assert _plain(ours, "filtered_resps") == _plain(_cli_samples(cli_dir, "own_gen"), "filtered_resps")
    # two examples, then the question, each a user turn (few-shot as multi-turn, as the command line)
    assert [s["arguments"][0][0].count("<|user|>") for s in ours] == [3] * LIMIT


def test_a_table_sets_the_shots_of_the_tasks_and_groups_it_names(tiny, tmp_path, datasets_cache):
    """num_fewshot = {t_b = 2}: t_b runs 2-shot, t_a at its YAML's own 3; a group's name sets
    each of its tasks (a task's own entry wins); a name that is not evaluated is an error
    naming the field."""
    from lm_eval.tasks import TaskManager

    model, tok = tiny
    _write_jsonl(tmp_path / "mc.jsonl", [{"question": f"what is {i} plus {i}?", "choices": [str(2 * i), "fox"],
                                          "label": 0} for i in range(6)])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, extra in (("t_a", "num_fewshot: 3\n"), ("t_b", "")):
        (tasks / f"{name}.yaml").write_text(MC_YAML.format(name=name, extra="", data=tmp_path / "mc.jsonl") + extra)
    section = EvalSection(lm_eval_tasks=(str(tasks),), batch_size=BATCH, limit=2, num_fewshot={"t_b": 2})
    run_lm_eval(model, tok, section, tmp_path / "out")
    protocol = json.loads((tmp_path / "out" / "metrics.json").read_text())["protocol"]
    assert {t: p["num_fewshot"] for t, p in protocol.items()} == {"t_a": 3, "t_b": 2}
    for task, shots in (("t_a", 3), ("t_b", 2)):  # the examples are in the prompts, not only in the record
        assert str(_our_samples(tmp_path / "out", task)[0]["arguments"]).count("what is ") == (1 + shots) * 2

    (tasks / "both.yaml").write_text("group: both\ntask: [t_a, t_b]\n")
    loaded = TaskManager(include_path=[str(tasks)], include_defaults=False).load(["both"])
    lm_eval_adapter.set_shots(loaded, {"both": 1, "t_b": 2})
    assert {n: t.get_config("num_fewshot") for n, t in loaded["tasks"].items()} == {"t_a": 1, "t_b": 2}
    with pytest.raises(KeyError, match=r"eval.validation.num_fewshot: 't_c' is not one of the tasks"):
        run_lm_eval(model, tok, EvalSection(lm_eval_tasks=(str(tasks),), num_fewshot={"t_c": 1}), tmp_path / "bad",
                    where="eval.validation.num_fewshot")


def test_lm_eval_files_are_kept(runs):
    d = runs["ours_dir"]
    results = json.loads((d / "results.json").read_text())
    assert results["results"]["t_mc"]["acc,none"] == runs["ours"]["lm_eval/t_mc/acc"]
    assert "samples" not in results
    keys = json.loads((d / "metrics.json").read_text())["lm_eval_keys"]
    assert keys["lm_eval/t_mc/acc"] == "acc,none"
    assert "lm_eval/t_mc/acc_norm" not in runs["ours"]  # only the primary (first) metric


def test_gsm8k_local_equals_command_line(runs):
    require(GSM8K.is_dir(), f"GSM8K data not found at {GSM8K} (shared data folder absent)")
    ours, cli = runs["ours"], runs["cli"]["results"]["gsm8k_local"]
    # primary = first metric under the first filter (strict-match)
    assert ours["lm_eval/gsm8k_local/exact_match"] == cli["exact_match,strict-match"]
    assert ours["lm_eval/gsm8k_local/exact_match_stderr"] == cli["exact_match_stderr,strict-match"]
    a, b = _our_samples(runs["ours_dir"], "gsm8k_local"), _cli_samples(runs["cli_dir"], "gsm8k_local")
    assert len(a) == LIMIT * 2  # one row per (doc, filter)
    assert _plain(a, "resps") == _plain(b, "resps")


# --- small units ---------------------------------------------------------------------------

def test_task_spec_resolution(tmp_path, monkeypatch):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "a.yaml").write_text("task: task_a\ndataset_path: json\noutput_type: multiple_choice\n")
    (d / "b.yaml").write_text("task: task_b\ndataset_path: json\noutput_type: multiple_choice\n")
    load, include, builtin = resolve_task_specs([str(d)])
    assert (load, include, builtin) == (["task_a", "task_b"], [str(d.resolve())], False)

    load, include, builtin = resolve_task_specs([str(d / "a.yaml"), "hellaswag"])
    assert load == [str((d / "a.yaml").resolve()), "hellaswag"] and builtin

    monkeypatch.setattr(lm_eval_adapter, "resolve_ref", lambda ref: str(d / "b.yaml"))
    assert resolve_task_specs(["tiny:b"])[0] == [str((d / "b.yaml").resolve())]

    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        resolve_task_specs([str(tmp_path / "missing.yaml")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no task YAML"):
        resolve_task_specs([str(tmp_path / "empty")])


def test_primary_metric_uses_first_metric_and_filter():
    cfg = {"task": "x", "metric_list": [{"metric": "exact_match"}, {"metric": "f1"}],
           "filter_list": [{"name": "strict-match"}, {"name": "flexible-extract"}]}
    assert primary_key(cfg) == ("exact_match", "strict-match")
    results = {"configs": {"x": cfg},
               "results": {"x": {"alias": "x", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A",
                                 "exact_match,flexible-extract": 0.75}}}
    metrics, source = flat_metrics(results)
    assert metrics == {"lm_eval/x/exact_match": 0.25, "lm_eval/x/exact_match_stderr": None}
    assert source["lm_eval/x/exact_match"] == "exact_match,strict-match"
    with pytest.raises(KeyError, match="primary metric"):
        flat_metrics({"configs": {"x": cfg}, "results": {"x": {"exact_match,none": 1.0}}})


def test_peft_model_is_evaluated_in_memory(tmp_path, datasets_cache):
    """A PeftModel is scored with its adapter active (== the merged model), and its
    train/eval mode is restored afterwards."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from harness.models.load import load_model, load_tokenizer

    model_dir = build_tiny_model(tmp_path / "model")
    base, tok = load_model(str(model_dir), device="cpu"), load_tokenizer(str(model_dir))
    _write_jsonl(tmp_path / "mc.jsonl", [
        {"question": f"what is {i} plus {i}?", "choices": [str(2 * i), "fox", "yes"], "label": i % 3}
        for i in range(6)])
    (tmp_path / "mc.yaml").write_text(MC_YAML.format(name="t_mc", extra='  - metric: acc_norm\n', data=tmp_path / "mc.jsonl"))
    section = EvalSection(lm_eval_tasks=(str(tmp_path / "mc.yaml"),), batch_size=BATCH)

    def loglikelihoods(model, name):
        run_lm_eval(model, tok, section, tmp_path / name)
        return [r[0] for s in _our_samples(tmp_path / name, "t_mc") for r in s["filtered_resps"]]

    plain = loglikelihoods(base, "base")
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a fresh adapter is a no-op; make it change the model
    peft.train()
    with_adapter = loglikelihoods(peft, "peft")
    assert peft.training  # restored
    merged = loglikelihoods(copy.deepcopy(peft).merge_and_unload(), "merged")
    assert with_adapter == pytest.approx(merged, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(with_adapter, plain)) > 1e-2


def test_unknown_task_name_suggests():
    # (the real list comes from lm-eval's TaskManager; indexing the built-ins takes ~15 s)
    _check_names(["gsm8k", "/abs/task.yaml"], ["gsm8k", "hellaswag"])
    with pytest.raises(KeyError, match="unknown lm-eval task 'gsm8kk'; did you mean 'gsm8k'"):
        _check_names(["gsm8kk"], ["gsm8k", "hellaswag"])
