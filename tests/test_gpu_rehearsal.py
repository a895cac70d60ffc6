"""A CPU rehearsal of every GPU config (the ``rehearsal`` tier: ``pytest -m rehearsal``, run by
.ci/run after the main suite, which deselects it).

Each ``experiments/gpu/*.toml`` runs through ``harness run`` unchanged except for ``--set``
overrides of the base (``smollm2-135m-instruct``), the device (cpu), the sizes (a few prompts,
short answers and lengths, lm-eval's limit) and the output directory. The config's own dtype
(bfloat16), quantization (DNO's 4-bit QLoRA: bitsandbytes runs 4-bit on a CPU), optimizer,
gradient checkpointing, methods, judges, data shapes and iteration count stay as written,
so the path a GPU user takes is the one run here:

- its hub data come from a prepared Hugging Face cache read with the hub off: UltraChat-shaped
  multi-turn rows whose first turns are longer than the prompt cap, UltraFeedback-shaped
  prompts (train_prefs / test_prefs), and AlpacaEval 2.0's ``alpaca_eval_gpt4_baseline.json``
  built from the published GPT-4 Turbo reference outputs (shared data);
- its HTTP judges (AlpacaEval 2.0's log-prob annotator, DNO's dno6 judge) are a local
  OpenAI-compatible endpoint at 127.0.0.1 that answers every request deterministically; with
  HARNESS_REHEARSAL_VLLM=1 (.ci/run sets it once ./install.sh --vllm has built .venv-vllm),
  AlpacaEval's judge is vLLM's own OpenAI server serving SmolLM2 instead;
- lm-eval's ``arc_easy`` and ``gsm8k`` read their data through ``datasets``, which cannot load a
  hub dataset from the cache offline (it looks only for a dataset it prepared before), so their
  task list is overridden with lm-eval's own task YAMLs pointed at local files: gsm8k's real
  rows (shared data) and ARC-shaped rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from test_eval_fixtures import SHARED_DATA, require, write_hub_files
from test_judges_http import LocalEndpoint, send_json

pytestmark = pytest.mark.rehearsal

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIGS = sorted((ROOT / "experiments" / "gpu").glob("*.toml"))
REV = "0" * 39 + "1"
KEY_ENV = "JUDGE_API_KEY"
ULTRACHAT, ULTRAFEEDBACK = "HuggingFaceH4/ultrachat_200k", "HuggingFaceH4/ultrafeedback_binarized"
AE_REPO, AE_FILE = "tatsu-lab/alpaca_eval", "alpaca_eval_gpt4_baseline.json"
N_ROWS = 10      # rows per split
PROMPT_CAP = 96   # training.max_prompt_length here; UltraChat's rows 0 and 5 are longer (cut, counted)


def _card(splits: list[str]) -> str:
    files = "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in splits)
    return f"---\nlicense: mit\nconfigs:\n- config_name: default\n  data_files:\n{files}---\n"


def _long(i: int) -> str:
    """A first user turn; rows 0 and 5 are far longer than PROMPT_CAP tokens: 20% of SPIN's
    prompts are cut from the left (under the config's training.max_truncated_share = 0.3)."""
    text = f"Question {i}: name a colour of the sky and say why it looks that way."
    if i % 5 == 0:
        text = f"Here is some background for question {i}. " + " ".join(
            f"Sentence {k} of the story talks about clouds, light and weather." for k in range(40)) + " " + text
    return text


def ultrachat_rows(tag: str) -> list[dict]:
    """UltraChat-shaped rows: two user turns, each answered."""
    return [{"prompt": _long(i), "prompt_id": hashlib.sha256(f"{tag}{i}".encode()).hexdigest(),
             "messages": [{"role": "user", "content": _long(i)},
                          {"role": "assistant", "content": f"The sky is blue ({tag} {i}): air scatters blue light."},
                          {"role": "user", "content": "And at sunset?"},
                          {"role": "assistant", "content": "Red and orange: the light crosses more air."}]}
            for i in range(N_ROWS)]


WORDS = ["What colour is the sky on a clear day?", "What is the opposite of hot?", "Which animal barks?",
         "What is two plus two?", "What do bees make?"]
RIGHT = ["Blue.", "Cold.", "A dog.", "Four.", "Honey."]


def ultrafeedback_rows(tag: str) -> list[dict]:
    """UltraFeedback-shaped (binarized) rows: a prompt, its id, chosen / rejected conversations,
    scores. Their prompts fit (Self-Rewarding and DNO stop past 10% cut pairs, the default
    training.max_truncated_share) and ask for one word, so that some sampled answers end within
    the rehearsal's few tokens: a pair whose chosen answer is cut is dropped (cut_chosen = "drop")."""
    out = []
    for i in range(N_ROWS):
        p = f"Reply with one word only. {WORDS[i % len(WORDS)]} (case {i})"  # unique, as the hub's prompts are
        pid = hashlib.sha256(f"uf{tag}{i}".encode()).hexdigest()
        out.append({"prompt": p, "prompt_id": pid,
                    "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": "A good answer."}],
                    "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": "A bad one."}],
                    "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "A good answer."}],
                    "score_chosen": 8.0, "score_rejected": 3.0})
    return out


def prepare_hub(hub: Path) -> None:
    """The hub files the three GPU configs read, in a Hugging Face cache's layout at ``hub``."""
    write_hub_files(hub, ULTRACHAT, REV, {"README.md": _card(["train_sft", "test_sft"]),
                                          "data/train_sft-00000-of-00001-r.parquet": ultrachat_rows("train"),
                                          "data/test_sft-00000-of-00001-r.parquet": ultrachat_rows("test")})
    write_hub_files(hub, ULTRAFEEDBACK, REV, {"README.md": _card(["train_prefs", "test_prefs"]),
                                              "data/train_prefs-00000-of-00001-r.parquet": ultrafeedback_rows("train"),
                                              "data/test_prefs-00000-of-00001-r.parquet": ultrafeedback_rows("test")})
    refs = SHARED_DATA / "alpaca_eval" / "gpt4_1106_preview.model_outputs.json"
    require(refs.is_file(), f"AlpacaEval's published reference outputs not found at {refs} (shared data folder absent)")
    write_hub_files(hub, AE_REPO, REV, {AE_FILE: refs.read_text()})


ARC_YAML = """include: {builtin}
task: arc_easy_local
dataset_path: parquet
dataset_name: null
dataset_kwargs:
  data_files:
    train: {data}
    validation: {data}
    test: {data}
"""

GSM8K_YAML = """include: {builtin}
task: gsm8k_local
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
generation_kwargs:
  until: ["Question:", "</s>", "<|im_end|>"]
  do_sample: false
  max_gen_toks: 16
"""


def prepare_tasks(d: Path) -> Path:
    """lm-eval's own arc_easy and gsm8k task YAMLs with their data pointed at local files
    (gsm8k's answers capped at 16 tokens: a size, like the other overrides)."""
    import pandas as pd
    from lm_eval import tasks as lm_tasks

    gsm8k = SHARED_DATA / "gsm8k"
    require(gsm8k.is_dir(), f"gsm8k not found at {gsm8k} (shared data folder absent)")
    builtin = Path(lm_tasks.__file__).parent
    d.mkdir(parents=True)
    arc = d / "arc.parquet"
    pd.DataFrame([{"id": f"q{i}", "question": f"Which number follows {i}?",
                   "choices": {"text": [str(i + 1), str(i + 7), "blue", "none"], "label": ["A", "B", "C", "D"]},
                   "answerKey": "A"} for i in range(12)]).to_parquet(arc)
    (d / "arc_easy_local.yaml").write_text(ARC_YAML.format(builtin=builtin / "arc" / "arc_easy.yaml", data=arc))
    (d / "gsm8k_local.yaml").write_text(GSM8K_YAML.format(
        builtin=builtin / "gsm8k" / "gsm8k.yaml", train=gsm8k / "train.jsonl", test=gsm8k / "test.jsonl"))
    return d


def prepare_eft(path: Path) -> Path:
    """Self-Rewarding's M1 judge-training (EFT) data for the rehearsal: the UltraFeedback-shaped
    prompts' candidates put into the built-in rubric (the self-judge's template, filled as the
    judge fills it), each answered by a one-line justification ending in "Score: N". SmolLM2-135M
    does not end a judgment in that form on its own (tried at 16 to 200 tokens, with the rubric
    and with a one-line form: 0 of 24 judgments), so without M1 no self-judgment would parse;
    the GPU config's model (Qwen2.5-0.5B-Instruct) needs no M1, and the config documents the
    ``ift`` / ``eft`` files that turn it on."""
    from harness.judges.parsing import fill_template, load_template

    template = load_template("")
    rows = []
    for i, (question, right) in enumerate(zip(WORDS, RIGHT)):
        wrong = RIGHT[(i + 1) % len(RIGHT)]
        for k, (answer, why, score) in enumerate([(right, "Right and brief.", 4), (wrong, "Wrong.", 1),
                                                  ("It depends.", "No answer.", 0)]):
            rows.append({"id": f"eft{i}-{k}", "prompt": fill_template(template, f"Reply with one word only. {question}", answer),
                         "response": f"{why}\nScore: {score}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- the judge endpoint -------------------------------------------------------------------

_ANSWERS = re.compile(r"<answer (\d+)>")


def judge_reply(body: dict) -> dict:
    """A deterministic chat completion: log-probs of AlpacaEval 2.0's ``m`` / ``M`` when asked for
    them, else a justification ending in a 1-6 score (one "Score N:" line per candidate for a
    group prompt)."""
    prompt = json.dumps(body.get("messages"), sort_keys=True)
    d = hashlib.sha256(prompt.encode()).digest()
    logprobs = None
    if body.get("logprobs"):
        top = sorted([{"token": "m", "logprob": -(d[1] / 60.0)}, {"token": "M", "logprob": -(d[2] / 60.0)},
                      {"token": "The", "logprob": -9.0}], key=lambda t: -t["logprob"])
        content = top[0]["token"]
        logprobs = {"content": [{"token": content, "logprob": top[0]["logprob"], "bytes": list(content.encode()),
                                 "top_logprobs": [{**t, "bytes": list(t["token"].encode())}
                                                  for t in top[:body.get("top_logprobs") or 5]]}]}
    else:
        text = body["messages"][-1]["content"]
        n = len(set(_ANSWERS.findall(text)))
        content = "Clear enough.\n" + ("\n".join(f"Score {k}: {1 + d[k] % 6}" for k in range(1, n + 1)) if n
                                       else f"Score: {1 + d[0] % 6}")
    return {"id": "r", "object": "chat.completion", "created": 0, "model": body.get("model", ""),
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 8, "total_tokens": 108}}


class FakeJudge(LocalEndpoint):
    """A local OpenAI-compatible chat-completions endpoint (127.0.0.1, a free port) answering
    with ``judge_reply``; it counts its requests by kind."""

    def __init__(self):
        self.calls = {"logprobs": 0, "score": 0}
        self.lock = threading.Lock()

        def on_post(handler, body):
            with self.lock:
                self.calls["logprobs" if body.get("logprobs") else "score"] += 1
            send_json(handler, 200, json.dumps(judge_reply(body)))

        super().__init__(on_post)


# ---- the rehearsal ------------------------------------------------------------------------

# Per config: the sizes and judges' endpoints changed; everything else as written.
COMMON = ["model.base=smollm2-135m-instruct", "model.device=cpu",
          f"training.max_length={PROMPT_CAP + 32}", f"training.max_prompt_length={PROMPT_CAP}",
          "eval.alpaca_eval.limit=4", "eval.alpaca_eval.max_new_tokens=8"]
SIZES = {
    # 8 prompts (rows 0 and 5 cut: 25%, under the config's max_truncated_share 0.3), one epoch: the second
    # iteration trains on 16 pairs (newest_plus_previous)
    "spin_qwen0.5b": ["generation.max_new_tokens=8", "data.num_prompts=8", "training.epochs=1", "eval.limit=2",
                      "eval.indicators.num_prompts=4"],
    "self_rewarding_qwen0.5b": ["generation.max_new_tokens=12", "data.num_prompts=8",
                                "method.self_rewarding.prompts_per_iteration=4", "judge.self.max_new_tokens=24",
                                # a judge taught in 20 steps repeats itself in some judgments (2 of 16 measured)
                                "judge.min_coverage=0.75",
                                # M1 on the EFT data (prepare_eft): the rubric prompts (~370 tokens) cut from
                                # the left to their last 72 tokens (the instruction to end in "Score: N"; every
                                # example cut, so the cut-share guard is off), 20 steps at a rate that teaches
                                # that form
                                "method.self_rewarding.sft.max_length=96", "method.self_rewarding.sft.max_prompt_length=72",
                                "method.self_rewarding.sft.max_truncated_share=1.0", "method.self_rewarding.sft.epochs=4",
                                "method.self_rewarding.sft.learning_rate=2e-3", "method.self_rewarding.sft.batch_size=3"],
    "dno_qwen1.5b_qlora": ["generation.max_new_tokens=12", "method.dno.prompts_per_iteration=4",
                           "eval.validation.num_prompts=4"],
}
# two where the second iteration takes another path (SPIN's continued float32 adapter on a bfloat16
# base, DNO's continued 4-bit adapter and its replay); Self-Rewarding's second is its first again
ITERATIONS = {"spin_qwen0.5b": 2, "self_rewarding_qwen0.5b": 1, "dno_qwen1.5b_qlora": 2}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(the prepared hub cache's HF_HOME, the lm-eval task directory, the judge's URL)."""
    root = tmp_path_factory.mktemp("rehearsal")
    prepare_hub(root / "hf_home" / "hub")
    tasks = prepare_tasks(root / "tasks")
    if os.environ.get("HARNESS_REHEARSAL_VLLM") == "1":  # the vLLM tier: vLLM's server serves AlpacaEval's judge
        from harness.engines.vllm_server import serve
        from harness.models.sources import model_path

        fake = FakeJudge()  # DNO's training judge stays the fake one (a 135M model rarely ends in a score)
        with serve(model_path("smollm2-135m-instruct"), "Qwen/Qwen2.5-7B-Instruct", seeded=True) as url:
            yield root, tasks, url, fake
        fake.close()
    else:
        fake = FakeJudge()
        yield root, tasks, fake.url, fake
        fake.close()


def overrides(name: str, tasks: Path, ae_url: str, judge_url: str, out: Path) -> list[str]:
    text = (ROOT / "experiments" / "gpu" / f"{name}.toml").read_text()
    sets = COMMON + SIZES[name] + [f"method.iterations={ITERATIONS[name]}", f"experiment.output_dir={out}",
                                   f"eval.alpaca_eval.judge.openai.base_url={ae_url}"]
    if "lm_eval_tasks" in text:
        sets.append(f"eval.lm_eval_tasks=['{tasks}']")
    if "learning_rates" in text:  # one rate per iteration: the config's first ones
        rates = tomllib.loads(text)["training"]["learning_rates"][:ITERATIONS[name]]
        sets.append(f"training.learning_rates={rates}")
    if "replay" in text:  # replay from earlier iterations: the fractions of those the run has
        replay = tomllib.loads(text)["method"]["dno"]["replay"][:ITERATIONS[name] - 1]
        sets.append(f"method.dno.replay={replay}")
    if "[judge.openai]" in text:
        sets.append(f"judge.openai.base_url={judge_url}")
    if "[eval.validation.judge.openai]" in text:
        sets.append(f"eval.validation.judge.openai.base_url={judge_url}")
    if name == "self_rewarding_qwen0.5b":  # M1 first (see prepare_eft)
        sets.append(f"method.self_rewarding.eft={prepare_eft(out.parent / 'eft.jsonl')}")
    return [a for s in sets for a in ("--set", s)]


def harness_env(root: Path) -> dict:
    env = {**os.environ, "HF_HOME": str(root / "hf_home"), "HF_HUB_CACHE": str(root / "hf_home" / "hub"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "hf_datasets"),
           KEY_ENV: "unused-locally", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HARNESS_ONLINE", None)
    return env


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda p: p.stem)
def test_a_gpu_config_runs_on_cpu_unchanged_but_for_its_sizes(config, world):
    root, tasks, ae_url, fake = world
    name = config.stem
    out = root / "results"
    cmd = [str(Path(sys.executable).parent / "harness"), "run", str(config),
           *overrides(name, tasks, ae_url, fake.url, out)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=root, env=harness_env(root), capture_output=True, text=True, timeout=1800)
    took = time.time() - t0
    print(f"{name}: {took:.0f} s")
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    doc = tomllib.loads(config.read_text())
    run_dir = out / doc["experiment"]["name"]
    recorded = json.loads((run_dir / "config.json").read_text())["config"]
    assert recorded["model"]["dtype"] == doc["model"]["dtype"]  # the config's own (bfloat16), not the CPU default
    assert recorded["model"]["base"] == "smollm2-135m-instruct"  # the --set overrides are the run's config
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS[name] + 1))
    for r in rows:  # AlpacaEval 2.0 (the hub file) judged through alpaca_eval's own annotator, every instruction
        assert r["protocol"]["alpaca_eval"]["annotator"] == "weighted_alpaca_eval_gpt4_turbo"
        assert r["metrics"]["alpaca_eval/n_total"] == r["metrics"]["alpaca_eval/n_instructions"] == 4
        if doc["eval"].get("lm_eval_tasks"):
            assert {"arc_easy_local", "gsm8k_local"} <= {k.split("/")[1] for k in r["metrics"] if k.startswith("lm_eval/")}
    if doc["method"]["name"] == "self_rewarding":  # M1 taught the self-judge its form; it judged, pairs trained
        assert (run_dir / "iter_000" / "init_sft" / "manifest.json").is_file()
        assert rows[1]["metrics"]["judge/coverage"] >= 0.75 and rows[1]["metrics"]["train/n_pairs"] > 0
    if doc.get("judge", {}).get("name") == "openai":  # DNO's judge scored its samples through the endpoint
        assert fake.calls["score"] > 0
