"""Hub data through the hub's files, read offline from a prepared Hugging Face cache: a hub
training set's split (its dataset card's files, or the default names) at its pinned revision,
AlpacaEval 2.0's ``alpaca_eval_gpt4_baseline.json``, ``harness validate`` on both (and the file
it names when one is missing), and a run whose evaluate stage reads AlpacaEval 2.0 from the cache.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.config.experiment import DataSection, parse
from harness.models.data import DataError, load_examples, read_records
from harness.evaluate.alpaca_instructions import HUB_FILE, HUB_REPO, load_instructions
from harness.models.sources import resolve_ref
from test_eval_fixtures import hub_cache, write_hub_files  # noqa: F401  (fixture)

ULTRACHAT, ULTRAFEEDBACK = "HuggingFaceH4/ultrachat_200k", "HuggingFaceH4/ultrafeedback_binarized"
REV_A, REV_B, REV_C = "a" * 40, "b" * 40, "c" * 40
CARD = """---
license: mit
configs:
- config_name: default
  data_files:
  - split: train_sft
    path: data/train_sft-*
  - split: test_sft
    path: data/test_sft-*
---
# UltraChat 200k (a few rows)
"""


def chats(tag: str, n: int) -> list[dict]:
    """UltraChat-shaped rows: two user turns, each answered."""
    return [{"prompt_id": f"{tag}{i}", "prompt": f"{tag} question {i}",
             "messages": [{"role": "user", "content": f"{tag} question {i}"},
                          {"role": "assistant", "content": f"{tag} answer {i}"},
                          {"role": "user", "content": "and then?"},
                          {"role": "assistant", "content": f"{tag} more {i}"}]} for i in range(n)]


def ultrachat(hub: Path) -> tuple[list[dict], list[dict]]:
    """Revision A (main: the train split in two shards, a test split beside it) and revision B."""
    a, b = chats("a", 5), chats("b", 3)
    write_hub_files(hub, ULTRACHAT, REV_A, {"README.md": CARD,
                                            "data/train_sft-00000-of-00002-x1.parquet": a[:3],
                                            "data/train_sft-00001-of-00002-x2.parquet": a[3:],
                                            "data/test_sft-00000-of-00001-x3.parquet": chats("t", 2)})
    write_hub_files(hub, ULTRACHAT, REV_B, {"README.md": CARD, "data/train_sft-00000-of-00001-y.parquet": b},
                    main=False)
    return a, b


def alpaca_rows(n: int = 6) -> list[dict]:
    """The tiny world's AlpacaEval rows (the oracle judges them), as the hub file's records."""
    return json.loads(Path(resolve_ref("tiny:alpaca_eval")).read_text())[:n]


def write_alpaca(hub: Path, rev: str, rows: list[dict], main: bool = True) -> Path:
    return write_hub_files(hub, HUB_REPO, rev, {HUB_FILE: json.dumps(rows)}, main=main) / HUB_FILE


def test_a_hub_split_loads_offline_from_the_cache_at_its_revision(hub_cache):
    a, b = ultrachat(hub_cache)
    section = DataSection(train=ULTRACHAT, split="train_sft", messages_field="messages", id_field="prompt_id",
                          turns="first")
    exs = load_examples(section, seed=0)
    # the card's train split, both shards in order, and nothing of the test split
    assert [e.id for e in exs] == [r["prompt_id"] for r in a]
    assert [e.messages for e in exs] == [({"role": "user", "content": r["messages"][0]["content"]},) for r in a]
    assert [e.response for e in exs] == [r["messages"][1]["content"] for r in a]
    # data.revision pins another commit: its rows, not main's
    pinned = load_examples(dataclasses.replace(section, revision=REV_B), seed=0)
    assert [e.id for e in pinned] == [r["prompt_id"] for r in b]
    # a split the card does not name
    with pytest.raises(DataError, match="'train_gen' is not a split of hub dataset .*its card names: train_sft, test_sft"):
        read_records(ULTRACHAT, split="train_gen")
    # no card: the file names datasets gives a split (UltraFeedback's prompts)
    prompts = [{"prompt": f"p{i}", "prompt_id": f"u{i}"} for i in range(4)]
    write_hub_files(hub_cache, ULTRAFEEDBACK, REV_C, {"data/train_prefs-00000-of-00001-z.parquet": prompts,
                                                      "data/test_prefs-00000-of-00001-z.parquet": prompts[:1]})
    uf = load_examples(DataSection(train=ULTRAFEEDBACK, split="train_prefs", id_field="prompt_id"), seed=0)
    assert [(e.id, e.instruction) for e in uf] == [(r["prompt_id"], r["prompt"]) for r in prompts]
    # a revision that is not cached: named, with the files looked for
    with pytest.raises(DataError, match=rf"hub dataset {ULTRACHAT}: file 'README.md' \(revision {REV_C}\) is not in "
                                        "the local Hugging Face cache .*; nor is any file of split 'train_sft'"):
        read_records(ULTRACHAT, split="train_sft", revision=REV_C)
    # the card is cached but its split's files are not
    for f in (hub_cache / "datasets--HuggingFaceH4--ultrachat_200k" / "snapshots" / REV_B / "data").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=rf"hub dataset {ULTRACHAT}: file 'data/train_sft-\*' \(revision {REV_B}\) "
                                        "is not in the local Hugging Face cache"):
        read_records(ULTRACHAT, split="train_sft", revision=REV_B)


def test_alpaca_eval_2_is_the_hub_file_read_from_the_cache(hub_cache):
    rows = alpaca_rows()
    write_alpaca(hub_cache, REV_A, rows)
    write_alpaca(hub_cache, REV_B, rows[:2], main=False)
    got = load_instructions("alpaca_eval", limit=4)
    assert [(r["instruction"], r["output"]) for r in got] == [(r["instruction"], r["output"]) for r in rows[:4]]
    assert len(load_instructions("alpaca_eval", revision=REV_B)) == 2
    with pytest.raises(FileNotFoundError, match=rf"{HUB_REPO}: file '{HUB_FILE}' \(revision {REV_C}\) is not in"):
        load_instructions("alpaca_eval", revision=REV_C)


EXPERIMENT = """
[experiment]
name = "hub"
output_dir = "{out}"
{requires}
[model]
base = "tiny"
device = "cpu"

[method]
name = "spin"
iterations = 1

[data]
train = "{train}"
split = "train_sft"
messages_field = "messages"
id_field = "prompt_id"

[training]
batch_size = 2
max_length = 128

[eval.alpaca_eval]
instructions = "alpaca_eval"
annotator = "harness_rubric"
{revision}
[eval.alpaca_eval.judge]
name = "oracle"

[eval.validation]
prompts = "{prompts}"
split = "test_prefs"
"""


def test_validate_accepts_cached_hub_files_and_names_a_missing_one(hub_cache, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    def validate(requires: str = "", revision: str = "") -> tuple[int, str]:
        path = tmp_path / "exp.toml"
        path.write_text(EXPERIMENT.format(out=tmp_path / "out", train=ULTRACHAT, prompts=ULTRAFEEDBACK,
                                          requires=requires, revision=revision))
        capsys.readouterr()
        code = main(["validate", str(path)])
        return code, capsys.readouterr().err

    ultrachat(hub_cache)
    write_alpaca(hub_cache, REV_A, alpaca_rows())
    write_hub_files(hub_cache, ULTRAFEEDBACK, REV_C, {"data/test_prefs-00000-of-00001-z.parquet": [{"x": "no prompt"}]})
    code, err = validate()  # the validation prompts are read from the cache: their missing column is named
    assert code == 1 and "eval.validation.prompts: " in err and "no column 'prompt' (columns: x)" in err, err
    write_hub_files(hub_cache, ULTRAFEEDBACK, REV_C, {"data/test_prefs-00000-of-00001-z.parquet": [{"prompt": "p"}]})
    code, err = validate()
    assert code == 0, err
    # a pinned AlpacaEval revision that the cache lacks: the file, its repo and the revision
    code, err = validate(revision=f'revision = "{REV_B}"')
    assert code == 1
    assert (f"eval.alpaca_eval.instructions: hub dataset {HUB_REPO}: file '{HUB_FILE}' (revision {REV_B}) is not in "
            "the local Hugging Face cache") in err
    # an empty cache: both files named
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty))
    code, err = validate()
    assert code == 1
    assert f"eval.alpaca_eval.instructions: hub dataset {HUB_REPO}: file '{HUB_FILE}' (revision main)" in err
    assert f"data.train: hub dataset {ULTRACHAT}: file 'README.md' (revision main) is not in the local" in err
    assert f"eval.validation.prompts: hub dataset {ULTRAFEEDBACK}: file 'README.md' (revision main)" in err
    # declared: an unmet requirement, and the missing files are still named
    code, err = validate(requires='requires = ["hub"]')
    assert code == 0
    assert f"eval.alpaca_eval.instructions: warning: not checked: hub dataset {HUB_REPO}: file '{HUB_FILE}'" in err
    assert f"data.train: warning: not checked: hub dataset {ULTRACHAT}" in err


@pytest.mark.slow
@pytest.mark.usefixtures("library_console")
def test_a_run_evaluates_alpaca_eval_2_from_the_cached_hub_file(hub_cache, tmp_path):
    from harness.run.loop import run_experiment
    from harness.store.rundir import RunDir
    from harness.store.files import StageChanged

    rows = alpaca_rows()
    path = write_alpaca(hub_cache, REV_A, rows)
    sft = [{"prompt_id": f"s{i}", "messages": [{"role": "user", "content": r["prompt"]},
                                               {"role": "assistant", "content": r["response"]}]}
           for i, r in enumerate(read_records("tiny:sft_train")[:16])]
    write_hub_files(hub_cache, "org/tiny_sft", REV_C, {"data/train_sft-00000-of-00001-s.parquet": sft})
    doc = {"experiment": {"name": "hub", "seed": 0, "output_dir": str(tmp_path / "out")},
           "model": {"base": "tiny", "device": "cpu", "cpu_threads": 1},
           "lora": {"r": 4, "alpha": 8},
           "method": {"name": "spin", "iterations": 1, "spin": {"temperature": 0.0}},
           "data": {"train": "org/tiny_sft", "split": "train_sft", "messages_field": "messages",
                    "id_field": "prompt_id"},
           "generation": {"max_new_tokens": 12, "batch_size": 32},
           "training": {"learning_rate": 5e-4, "batch_size": 8, "max_length": 96, "warmup_ratio": 0.0},
           "eval": {"alpaca_eval": {"instructions": "alpaca_eval", "annotator": "harness_rubric", "limit": 4,
                                    "max_new_tokens": 12, "judge": {"name": "oracle"}},
                    "indicators": {"num_prompts": 4}}}
    run_dir, _ = run_experiment(parse(copy.deepcopy(doc), "hub.toml"))
    expected = [r["id"] for r in load_instructions(str(path), limit=4)]
    for t in (0, 1):
        gens = [json.loads(line) for line in RunDir(run_dir).alpaca_generations(t).read_text().splitlines()]
        assert sorted(g["id"] for g in gens) == sorted(expected)
        out = RunDir(run_dir).alpaca_generations(t).parent
        protocol = json.loads((out / "metrics.json").read_text())["protocol"]
        assert protocol["reference"]["hub"] == {
            "repo": HUB_REPO, "revision": "main", "commit": REV_A,
            "files": {HUB_FILE: hashlib.sha256(path.read_bytes()).hexdigest()}}
    trained = [json.loads(line)["id"] for line in (run_dir / "iter_001" / "generate" / "samples.jsonl").open()]
    assert sorted(trained) == sorted(r["prompt_id"] for r in sft)
    # main moves to a commit with other references: the finished evaluation is not reused
    edited = [{**r, "output": r["output"] + "!"} for r in rows]
    write_alpaca(hub_cache, REV_B, edited)
    with pytest.raises(StageChanged, match=r"iter_000/evaluate .*upstream\.alpaca_eval_instructions"):
        run_experiment(parse(copy.deepcopy(doc), "hub.toml"))
