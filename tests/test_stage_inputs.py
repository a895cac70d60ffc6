"""A stage's config inputs are the fields it read (``harness.run.reuse``): changing any config
field reruns exactly the stages that read it, raising ``method.iterations`` continues a
finished run, and an edited data file or a damaged manifest stops the run naming it.

The runs are SPIN on the embedded tiny world with a few prompts (seconds each)."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from harness.store import files as store
from harness.config.experiment import parse
from harness.run.loop import run_experiment
from harness.store.rundir import RunDir
from harness.config.schema import explain, to_dict
from harness.models.sources import resolve_ref
from harness.run.reuse import ConfigView, RecordedStage, status
from harness.store.files import StageChanged, StageCorrupt

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("library_console")]


def spin_doc(root: Path, name: str, iterations: int = 1) -> dict:
    data = root / "sft.jsonl"
    if not data.exists():
        data.write_text("".join(line + "\n" for line in
                                Path(resolve_ref("tiny:sft_train")).read_text().splitlines()[:24]))
    prompts = root / "eval_prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"id": f"e{i}", "prompt": f"reverse the word ab{i}"}) + "\n"
                                   for i in range(6)))
    return {"experiment": {"name": name, "seed": 0, "output_dir": str(root / "out")},
            "model": {"base": "tiny", "device": "cpu", "cpu_threads": 1},
            "lora": {"r": 4, "alpha": 8},
            "method": {"name": "spin", "iterations": iterations, "spin": {"temperature": 0.0}},
            "data": {"train": str(data)},
            "generation": {"max_new_tokens": 12, "batch_size": 32},
            "training": {"learning_rate": 5e-4, "batch_size": 8, "max_length": 96, "warmup_ratio": 0.0},
            "eval": {"lm_eval_tasks": ["tiny:tiny_gen"], "limit": 6, "batch_size": 32, "eval_prompts": str(prompts),
                     "indicators": {"num_prompts": 4}}}


def run(doc: dict):
    return run_experiment(parse(copy.deepcopy(doc), "test.toml"))


def numbers(rows: list[dict], final: bool = True) -> list[dict]:
    """A row's metrics without timings and costs, which differ between runs (and, unless
    ``final``, without the mark of the final iterate, which moves when a run is extended)."""
    return [{k: v for k, v in r["metrics"].items()
             if not k.startswith(("cost/", "wall_time_s")) and not k.endswith(("seconds", "peak_memory_mb"))
             and (final or k != "selected")} for r in rows]


def manifests(run_dir: Path) -> dict[str, dict]:
    return {f"{t}/{d.name}": store.read_json(d / "manifest.json") for t, d in RunDir(run_dir).stage_dirs()
            if (d / "manifest.json").exists()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-iteration SPIN run: (its document, its run directory, its rows)."""
    root = tmp_path_factory.mktemp("stage_inputs")
    doc = spin_doc(root, "spin")
    doc["eval"]["num_fewshot"] = {"tiny_gen": 0}  # a table-valued field (tiny_gen's own count is 0 too)
    run_dir, rows = run(doc)
    return doc, run_dir, rows


def test_the_view_records_each_leaf_read_with_method_options_spelled_as_in_toml(tmp_path):
    cfg = parse(spin_doc(tmp_path, "v"), "v.toml")
    view = ConfigView(cfg)
    assert view.cfg.training.max_length == 96 and view.cfg.options.temperature == 0.0
    assert isinstance(view.cfg.training, type(cfg.training))
    assert set(view.reads) == {"training.max_length", "method.spin.temperature"}
    to_dict(view.cfg.generation)  # a whole section: each of its fields
    assert {k for k in view.reads if k.startswith("generation.")} == {
        f"generation.{f.name}" for f in dataclasses.fields(cfg.generation)}
    assert view.cfg.chain == "merge" and "lora.chain" in view.reads  # a property reads through the view too
    # a read of another view while this one is its sink counts here too (the loop's own config)
    outer = ConfigView(cfg)
    outer.sink = view
    outer.cfg.judge.name
    assert "judge.name" in view.reads and "judge.name" in outer.reads
    values, files = view.recorded()
    assert values["generation.max_new_tokens"] == 12 and files == {}
    files = ConfigView(cfg)
    files.cfg.data.train
    assert set(files.recorded()[1]) == {"data.train"}  # a field naming a file: its content too


class _Edited:
    """A config as a dict with one leaf replaced (what ``RecordedStage`` compares against)."""

    def __init__(self, d: dict):
        self.d = d

    def to_dict(self) -> dict:
        return self.d

    def hash(self) -> str:
        return store.dict_hash(self.d)


def _leaves(d: dict, prefix: str = "", tables: frozenset[str] = frozenset()) -> list[str]:
    """The dotted paths of a config dict's fields; a field whose value is a table (``tables``,
    e.g. eval.num_fewshot = {gsm8k = 5}) is one field, read and compared whole."""
    out = []
    for k, v in d.items():
        path = f"{prefix}.{k}" if prefix else k
        out += _leaves(v, path, tables) if isinstance(v, dict) and path not in tables else [path]
    return out


def test_every_config_field_reruns_exactly_the_stages_that_read_it(finished):
    doc, run_dir, _ = finished
    cfg = parse(copy.deepcopy(doc), "test.toml")
    base = cfg.to_dict()
    found = manifests(run_dir)
    assert set(found) == {"0/evaluate", "1/generate", "1/pairs", "1/train", "1/evaluate"}
    read_by: dict[str, set[str]] = {}
    tables = frozenset(key for key, type_name, *_ in explain(type(cfg)) if "table of" in type_name)
    assert "eval.num_fewshot" in tables and isinstance(base["eval"]["num_fewshot"], dict)
    for path in _leaves(base, tables=tables):
        edited = copy.deepcopy(base)
        node = edited
        *head, last = path.split(".")
        for part in head:
            node = node[part]
        node[last] = ["<changed>", node[last]]
        rerun = set()
        for key, m in found.items():
            t, name = key.split("/")
            st = RecordedStage(RunDir(run_dir).stage(int(t), name), m["inputs"]["upstream"], _Edited(edited))
            changes = st.changes(m["inputs"])
            assert set(changes) <= {f"config.{path}", f"the contents of config.{path}"}
            if changes:
                rerun.add(key)
        assert rerun == {k for k, m in found.items() if path in m["inputs"]["config"]}, path
        read_by[path] = rerun
    # what the stages read, as a researcher expects
    assert read_by["method.iterations"] == set()
    assert read_by["tracking.report_to"] == set()  # where numbers are also sent: no stage's input
    assert read_by["experiment.output_dir"] == set()
    assert read_by["generation.max_new_tokens"] == {"1/generate", "0/evaluate", "1/evaluate"}
    assert read_by["training.learning_rate"] == {"1/train"}
    assert read_by["eval.limit"] == {"0/evaluate", "1/evaluate"}
    assert read_by["eval.num_fewshot"] == {"0/evaluate", "1/evaluate"}
    assert read_by["method.spin.temperature"] == {"1/generate"}
    assert read_by["generation.engine"] == {"1/generate", "0/evaluate", "1/evaluate"}  # they generate
    assert read_by["method.beta"] == {"1/train"}
    assert "1/train" in read_by["lora.r"] and "1/generate" in read_by["model.dtype"]


def test_raising_iterations_continues_a_finished_run_as_if_uninterrupted(finished, tmp_path):
    doc, run_dir, rows = finished
    longer = copy.deepcopy(doc)
    longer["method"]["iterations"] = 2
    longer["experiment"]["output_dir"] = str(tmp_path / "extended")
    shutil.copytree(run_dir, tmp_path / "extended" / "spin")
    before = manifests(tmp_path / "extended" / "spin")
    _, ext_rows = run(longer)
    after = manifests(tmp_path / "extended" / "spin")
    assert {k: after[k] for k in before} == before  # every finished stage kept as it was
    assert set(after) - set(before) == {"2/generate", "2/pairs", "2/train", "2/evaluate"}
    assert [r["iteration"] for r in ext_rows] == [0, 1, 2]
    assert numbers(ext_rows[:2], final=False) == numbers(rows, final=False)  # the kept iterations' rows
    straight = copy.deepcopy(longer)
    straight["experiment"]["output_dir"] = str(tmp_path / "straight")
    _, straight_rows = run(straight)
    assert numbers(ext_rows) == numbers(straight_rows)


def test_a_changed_field_stops_the_run_at_the_first_stage_that_read_it(finished):
    doc, run_dir, _ = finished
    changed = copy.deepcopy(doc)
    changed["training"]["learning_rate"] = 1e-3
    before = manifests(run_dir)
    with pytest.raises(StageChanged, match=r"iter_001/train was produced from different inputs; "
                                           r"changed: config\.training\.learning_rate\."):
        run(changed)
    assert manifests(run_dir) == before  # nothing recomputed or overwritten
    changed = copy.deepcopy(doc)
    changed["generation"]["max_new_tokens"] = 10
    with pytest.raises(StageChanged, match=r"iter_000/evaluate .*changed: config\.generation\.max_new_tokens\."):
        run(changed)


def test_edited_data_files_are_changed_inputs(tmp_path):
    doc = spin_doc(tmp_path, "spin")
    run(doc)
    # the human answer of one SFT prompt (SPIN's chosen side) edited
    sft = tmp_path / "sft.jsonl"
    original = sft.read_text()
    rows = [json.loads(line) for line in original.splitlines()]
    rows[0]["response"] = rows[0]["response"] + " (edited)"
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(StageChanged, match=r"iter_001/generate .*changed: upstream\.prompts\."):
        run(doc)
    # the held-out prompts of the indicators edited: the evaluations are refused, naming the file
    sft.write_text(original)
    prompts = tmp_path / "eval_prompts.jsonl"
    prompts.write_text(prompts.read_text().replace("ab0", "xy0"))
    with pytest.raises(StageChanged, match=r"iter_000/evaluate .*changed: the contents of config\.eval\.eval_prompts"):
        run(doc)


def test_an_edited_lm_eval_data_file_is_a_changed_input(tmp_path):
    from test_eval_fixtures import MC_YAML

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": f"reverse ab{i}", "choices": [f"b{i}a", f"ab{i}"], "label": 0})
                            + "\n" for i in range(4)))
    (tmp_path / "mc.yaml").write_text(MC_YAML.format(name="stage_mc", extra="", data=data))
    doc = spin_doc(tmp_path, "task")
    doc["eval"]["lm_eval_tasks"] = [str(tmp_path / "mc.yaml")]
    run(doc)
    data.write_text(data.read_text().replace('"label": 0', '"label": 1'))  # the task file itself unchanged
    with pytest.raises(StageChanged, match=r"iter_000/evaluate .*changed: the contents of config\.eval\.lm_eval_tasks"):
        run(doc)


def test_a_truncated_manifest_names_its_file(finished, tmp_path):
    doc, run_dir, _ = finished
    broken = tmp_path / "out" / "spin"
    shutil.copytree(run_dir, broken)
    manifest = broken / "iter_001" / "pairs" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    moved = copy.deepcopy(doc)
    moved["experiment"]["output_dir"] = str(tmp_path / "out")
    with pytest.raises(StageCorrupt, match=rf"{manifest}: not a valid stage manifest .*delete {manifest.parent}"):
        run(moved)
    rows = {(r["iteration"], r["stage"]): r for r in status(broken)}
    assert "unreadable" in rows[(1, "pairs")]["detail"] and rows[(1, "train")]["state"] == "done"


def test_a_tampered_stage_output_is_detected_on_reuse(finished, tmp_path):
    doc, run_dir, _ = finished
    copied = tmp_path / "out" / "spin"
    shutil.copytree(run_dir, copied)
    moved = copy.deepcopy(doc)
    moved["experiment"]["output_dir"] = str(tmp_path / "out")
    samples = copied / "iter_001" / "generate" / "samples.jsonl"
    first = samples.read_text().splitlines()[0]
    with open(samples, "a") as f:  # a valid record appended to a finished stage's log
        f.write(first.replace('"id": "', '"id": "forged-') + "\n")
    with pytest.raises(StageCorrupt, match=rf"{samples} differs from what the stage wrote"):
        run(moved)
    (copied / "iter_001" / "pairs" / "pairs.jsonl").unlink()
    shutil.copy(run_dir / "iter_001" / "generate" / "samples.jsonl", samples)
    with pytest.raises(StageCorrupt, match=r"iter_001/pairs/pairs\.jsonl is missing"):
        run(moved)


def test_adapter_hash_does_not_depend_on_the_order_peft_wrote_a_set_in(tmp_path):
    for name, modules in (("a", ["q_proj", "v_proj", "k_proj"]), ("b", ["k_proj", "q_proj", "v_proj"])):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": modules}))
        (d / "adapter_model.safetensors").write_bytes(b"weights")
    assert store.file_hash(tmp_path / "a") != store.file_hash(tmp_path / "b")  # the bytes differ
    assert store.adapter_hash(tmp_path / "a") == store.adapter_hash(tmp_path / "b")
    (tmp_path / "b" / "adapter_model.safetensors").write_bytes(b"other weights")
    assert store.adapter_hash(tmp_path / "a") != store.adapter_hash(tmp_path / "b")


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path, monkeypatch):
    import os

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        store.atomic_write_text(tmp_path / "x.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_indicators_that_stop_the_run_exclude_the_crossing_iterate_from_the_final_choice(tmp_path):
    doc = spin_doc(tmp_path, "stop", iterations=2)
    doc["eval"]["indicators"].update(entropy_min=50.0, action="stop")  # crossed by every iterate
    run_dir, rows = run(doc)
    assert [r["iteration"] for r in rows] == [0, 1]  # stopped after iteration 1
    final = store.read_json(run_dir / "final.json")
    assert final["iteration"] == 0 and final["stopped"]["iteration"] == 1
    assert final["selected_by"] == "last iterate before iteration 1, whose indicators stopped the run"
    assert [r["metrics"]["selected"] for r in rows] == [1, 0]


def test_validation_head_to_head_is_against_iteration_0s_answers(tmp_path):
    doc = spin_doc(tmp_path, "h2h", iterations=1)
    doc["training"]["learning_rate"] = 3e-3  # an iterate whose answers differ from iteration 0's
    doc["eval"]["validation"] = {"alpaca_eval": {"instructions": "tiny:alpaca_eval", "limit": 24,
                                                 "reference": "iteration0"}}
    run_dir, rows = run(doc)
    first, second = (r["metrics"]["validation/alpaca_eval/win_rate"] for r in rows)
    assert first == 50.0  # iteration 0 against itself, by construction
    own = [json.loads(line)["samples"][0]["text"] for line in
           (run_dir / "iter_001" / "validation" / "alpaca_eval" / "generations.jsonl").read_text().splitlines()]
    ref = [json.loads(line)["samples"][0]["text"] for line in
           (run_dir / "iter_000" / "validation" / "alpaca_eval" / "generations.jsonl").read_text().splitlines()]
    assert own != ref and second != 50.0  # judged against iteration 0's answers, not its own
    annotations = json.loads((run_dir / "iter_001" / "validation" / "alpaca_eval" / "annotations.json").read_text())
    assert {a["generator_1"] for a in annotations} == {"h2h/iter_000/validation"}


def test_validate_and_run_say_what_a_finished_run_would_refuse_before_any_compute(finished, tmp_path, capfd):
    import tomllib  # noqa: F401  (the experiment text below is TOML)

    from harness.cli import main

    doc, run_dir, _ = finished
    root = tmp_path / "out"
    shutil.copytree(run_dir, root / "spin")

    def write(d: dict, name: str) -> Path:
        d = copy.deepcopy(d)
        d["experiment"]["output_dir"] = str(root)
        lines = []
        for section, values in d.items():
            flat = {k: v for k, v in values.items() if not isinstance(v, dict)}
            lines.append(f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in flat.items()))
            for sub, inner in values.items():
                if isinstance(inner, dict):
                    lines.append(f"[{section}.{sub}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in inner.items()))
        (tmp_path / name).write_text("\n".join(lines))
        return tmp_path / name

    longer = copy.deepcopy(doc)
    longer["method"]["iterations"] = 2
    assert main(["validate", str(write(longer, "longer.toml"))]) == 0
    assert "finished up to iteration 1; continues to iteration 2" in capfd.readouterr().out
    changed = copy.deepcopy(longer)
    changed["generation"]["max_new_tokens"] = 10
    before = sorted(p.name for p in (root / "spin").rglob("*"))
    assert main(["run", str(write(changed, "changed.toml"))]) == 1
    err = capfd.readouterr().err
    assert "iter_001/generate: generation.max_new_tokens was 12, now 10: the run would stop there" in err
    assert "Traceback" not in err and sorted(p.name for p in (root / "spin").rglob("*")) == before
