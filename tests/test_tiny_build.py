"""The real tiny world, built once for this module (about a minute on two cores)."""

from __future__ import annotations

import json

import pytest
import torch

from harness.tiny import tasks
from harness.tiny.build import ensure_tiny
from harness.store.files import read_jsonl
from harness.tiny.oracle import grade

EM_BAND = (0.20, 0.60)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.setenv("HARNESS_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        yield ensure_tiny(seed=0)


@pytest.fixture(scope="module")
def model_and_tok(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(world / "model"),
            AutoTokenizer.from_pretrained(world / "model"))


def test_warmup_exact_match_in_band(world, model_and_tok):
    from harness.tiny.warmup import generate

    record = json.loads((world / "build.json").read_text())
    assert EM_BAND[0] <= record["exact_match"] <= EM_BAND[1], record
    # the saved model, reloaded with the Auto classes, reproduces the recorded number
    model, tok = model_and_tok
    rows = read_jsonl(world / "eval.jsonl")
    outs = generate(model, tok, [r["prompt"] for r in rows])
    em = sum(tasks.check(r["prompt"], o) for r, o in zip(rows, outs)) / len(rows)
    assert em == pytest.approx(record["exact_match"], abs=1e-3)


def test_the_model_can_answer_what_it_gets_wrong(world, model_and_tok):
    """The gap the methods are measured on: where greedy decoding gives the habit, sampling
    finds the correct answer (so a judge that tells them apart has pairs to learn from)."""
    import torch
    from harness.tiny.warmup import generate

    record = json.loads((world / "build.json").read_text())
    assert record["habit_rate"] >= 0.1, record
    model, tok = model_and_tok
    rows = read_jsonl(world / "eval.jsonl")
    greedy = generate(model, tok, [r["prompt"] for r in rows])
    habitual = [r for r, o in zip(rows, greedy) if o.strip() == tasks.habit(r["prompt"]) != r["answer"]]
    assert len(habitual) / len(rows) == pytest.approx(record["habit_rate"], abs=1e-3)
    found = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(8):
            outs = generate(model, tok, [r["prompt"] for r in habitual], do_sample=True, temperature=1.0)
            found |= {r["id"] for r, o in zip(habitual, outs) if tasks.check(r["prompt"], o)}
    assert len(found) >= 0.5 * len(habitual), (len(found), len(habitual))


def test_files_and_formats(world):
    train = read_jsonl(world / "sft_train.jsonl")
    prompts = read_jsonl(world / "prompts_train.jsonl")
    teacher = read_jsonl(world / "teacher.jsonl")
    ift, eft = read_jsonl(world / "ift.jsonl"), read_jsonl(world / "eft.jsonl")
    ev, ev_prompts = read_jsonl(world / "eval.jsonl"), read_jsonl(world / "eval_prompts.jsonl")
    alpaca = json.loads((world / "alpaca_eval.json").read_text())
    assert len(train) == len(prompts) == len(teacher) >= 256 and len(ev) == len(ev_prompts) >= 100
    for r in train + teacher:
        assert set(r) >= {"id", "prompt", "response"} and tasks.check(r["prompt"], r["response"])
    # the seed instruction data comes from the warm-up's demonstrators: right or the habit
    assert all(r["response"] in (r["answer"], tasks.habit(r["prompt"])) for r in ift)
    assert any(r["response"] != r["answer"] for r in ift) and any(r["response"] == r["answer"] for r in ift)
    assert all(set(r) >= {"id", "prompt"} for r in prompts + ev_prompts)
    for rows in (train, ift, ev, eft):
        assert len({r["id"] for r in rows}) == len(rows)
    # held-out prompts never appear in training files
    held_out = {r["prompt"] for r in ev}
    trained = {r["prompt"] for r in train + ift} | {r["instruction"] for r in eft}
    assert not held_out & trained
    assert held_out == {r["instruction"] for r in alpaca} == {r["prompt"] for r in ev_prompts}
    # EFT: the filled judge template, answered with the oracle's score
    for r in eft:
        assert r["prompt"] == tasks.judge_prompt(r["instruction"], r["candidate"])
        assert r["response"].endswith(f"Score: {grade(r['task'], tasks.parse(r['instruction'])[1], r['candidate'])[0]}")
    assert {r["score"] for r in eft} == {1, 2, 3, 4, 5}
    # AlpacaEval reference: mostly but not always correct
    assert all(set(r) == {"instruction", "output", "generator", "dataset"} for r in alpaca)
    right = sum(tasks.check(r["instruction"], r["output"]) for r in alpaca) / len(alpaca)
    assert 0.5 < right < 1.0
    # multiple choice: one right answer among same-length distractors
    for r in ev:
        assert r["choices"][r["label"]] == r["answer"] and len(set(r["choices"])) == len(r["choices"]) == 4
    assert (world / "judge_template.txt").read_text() == tasks.JUDGE_TEMPLATE


def test_lm_eval_runs_on_exported_tasks(world, model_and_tok):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from harness.tiny.warmup import generate

    model, tok = model_and_tok
    limit = 24
    res = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=24),
        tasks=["tiny_gen", "tiny_mc"], apply_chat_template=True, limit=limit,
        task_manager=TaskManager(include_path=str(world / "lm_eval"), include_defaults=False))
    gen, mc = res["results"]["tiny_gen"], res["results"]["tiny_mc"]
    # lm-eval's multiple-choice accuracy equals an independent argmax over the choices'
    # log-likelihoods (context = the chat-templated prompt, continuation = the choice, split as
    # lm-eval splits a context + continuation pair)
    mc_rows = read_jsonl(world / "eval.jsonl")[:limit]
    right = 0
    with torch.inference_mode():
        for r in mc_rows:
            context = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                              add_generation_prompt=True)
            scores = []
            for choice in r["choices"]:
                whole = tok(context + choice, add_special_tokens=False).input_ids
                n_ctx = len(tok(context, add_special_tokens=False).input_ids)
                logits = model(torch.tensor([whole])).logits[0, :-1].float()
                logp = torch.log_softmax(logits, -1)[torch.arange(len(whole) - 1), torch.tensor(whole[1:])]
                scores.append(float(logp[n_ctx - 1:].sum()))
            right += max(range(len(scores)), key=scores.__getitem__) == r["label"]
    assert mc["acc,none"] == pytest.approx(right / limit)
    assert 0.25 < right / limit  # above chance: the warmed-up model knows some answers
    # lm-eval's exact match agrees with ours on the same examples and the same chat template
    rows = read_jsonl(world / "eval.jsonl")[:limit]
    ours = sum(tasks.check(r["prompt"], o) for r, o in zip(rows, generate(model, tok, [r["prompt"] for r in rows])))
    assert gen["exact_match,none"] == pytest.approx(ours / limit)
