"""Batched generation: same answers as one-at-a-time, per-request seeds, resumable logs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from harness.engines.generate import (_GOLDEN, Prompt, Sampling, SeededSampler, generate, generation_settings,
                                      gumbel_noise, mix64, plan_batches, render, request_seed, topk_stats)
from harness.models.load import load_model, load_tokenizer
from harness.store.files import JsonlLog

PROMPTS = [Prompt(f"p{i}", ({"role": "user", "content": text},)) for i, text in enumerate(
    ["what is 1 plus 2", "say yes", "the quick brown fox jumps over the lazy dog", "no", "what is minus",
     "answer the question", "fox", "lazy dog says no"])]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir), device="cpu"), load_tokenizer(str(tiny_dir))


def texts(out):
    return {pid: [s["text"] for s in r["samples"]] for pid, r in out.items()}


def test_greedy_batched_equals_one_at_a_time(tiny):
    model, tok = tiny
    s = Sampling(max_new_tokens=12)
    batched = generate(model, tok, PROMPTS, s, seed_key=(0,), batch_size=8)
    single = generate(model, tok, PROMPTS, s, seed_key=(0,), batch_size=1)
    assert texts(batched) == texts(single)
    assert len({t[0] for t in texts(batched).values()}) > 2  # outputs depend on the prompt


def test_sampling_is_seeded_per_request(tiny):
    model, tok = tiny
    s = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=10, n=3)
    a = generate(model, tok, PROMPTS, s, seed_key=(7, 1), batch_size=6)
    b = generate(model, tok, PROMPTS, s, seed_key=(7, 1), batch_size=6)
    c = generate(model, tok, PROMPTS, s, seed_key=(8, 1), batch_size=6)
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert any(len(set(v)) > 1 for v in texts(a).values())  # samples of one prompt differ


def test_resume_from_partial_log_equals_uninterrupted(tiny, tmp_path):
    model, tok = tiny
    s = Sampling(temperature=1.0, max_new_tokens=10, n=2)
    full = generate(model, tok, PROMPTS, s, seed_key=(1,), batch_size=4, log=JsonlLog(tmp_path / "a.jsonl"))
    # simulate a kill after the first batch: keep its records plus a torn line
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    (tmp_path / "b.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])
    log = JsonlLog(tmp_path / "b.jsonl")
    assert len(log.records) == 2
    resumed = generate(model, tok, PROMPTS, s, seed_key=(1,), batch_size=4, log=log)
    assert texts(resumed) == texts(full)
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == len(PROMPTS)


def test_batch_plan_is_length_sorted_and_keeps_samples_together():
    lengths = {"a": 3, "b": 9, "c": 5, "d": 9}
    assert plan_batches(lengths, ["a", "b", "c", "d"], rows_per_prompt=2, batch_size=4) == [["b", "d"], ["c", "a"]]


def test_topk_stats_match_the_formula():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    ent, mass = topk_stats(logits, k=3)
    p = torch.softmax(logits[0], -1).tolist()
    top = sorted(p, reverse=True)[:3]
    m = sum(top)
    assert mass[0].item() == pytest.approx(m, rel=1e-6)
    assert ent[0].item() == pytest.approx(-sum(q / m * math.log(q / m) for q in top), rel=1e-6)
    assert mass[1].item() == pytest.approx(3 / 5) and ent[1].item() == pytest.approx(math.log(3))


def test_indicator_stats_equal_an_independent_forward_pass_over_prompt_and_answer(tiny):
    """Each recorded top-k statistic is the mean, over the answer's tokens, of the statistic of
    the distribution that token was drawn from: recomputed here token by token with full forward
    passes (no cache, no padding, no generate), so an off-by-one in which logits are recorded fails."""
    from harness.engines.generate import render

    model, tok = tiny
    k, steps = 10, 8
    out = generate(model, tok, PROMPTS[:3], Sampling(temperature=0.0, max_new_tokens=steps, top_k_stats=k),
                   seed_key=(0,), batch_size=3)
    eos = tok.eos_token_id
    for p in PROMPTS[:3]:
        ids = tok(render(tok, p.messages), add_special_tokens=False, return_tensors="pt").input_ids
        ents, masses, new = [], [], []
        for _ in range(steps):
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
            top = logp.topk(k).values.exp()
            q = top / top.sum()
            ents.append(float(-(q * q.log()).sum()))
            masses.append(float(top.sum()))
            nxt = int(logp.argmax())
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if nxt == eos:
                break
        s = out[p.id]["samples"][0]
        assert s["n_tokens"] == len(new) and s["text"] == tok.decode(new, skip_special_tokens=True)
        assert s["topk_entropy"] == pytest.approx(sum(ents) / len(ents), rel=1e-4)
        assert s["topk_mass"] == pytest.approx(sum(masses) / len(masses), rel=1e-4)
        # the statistic of the next step's distribution is not the one recorded (an off-by-one shows)
        assert len(set(round(e, 4) for e in ents)) > 1


# ----- the device-side sampler -------------------------------------------------------------

def _mix64_reference(x: int) -> int:
    x &= (1 << 64) - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return x ^ (x >> 31)


def test_mix64_is_bit_exact_splitmix64_on_int64_tensors():
    vals = [0, 1, 2, 12345, (1 << 63) - 1, -1, -(1 << 63), -987654321, 0x1234567890ABCDEF]
    got = mix64(torch.tensor(vals, dtype=torch.int64)).tolist()
    assert [g & ((1 << 64) - 1) for g in got] == [_mix64_reference(v) for v in vals]


def test_gumbel_noise_is_its_documented_function_of_key_and_token():
    keys = torch.tensor([5, -7, 2 ** 62, request_seed("k")])
    ids = torch.arange(300).expand(4, -1)
    z = mix64(keys.unsqueeze(-1) + ids * _GOLDEN)
    u = ((z >> 41).double() + 2 ** 22 + 0.5) / 2 ** 23
    assert torch.equal(gumbel_noise(keys, ids), -torch.log(-torch.log(u.float())))
    assert torch.equal(gumbel_noise(keys[2:3], ids[:1, 100:200]), gumbel_noise(keys, ids)[2:3, 100:200])


def _nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """softmax(logits / T) restricted to the top-p nucleus (top token always kept), renormalised."""
    p = torch.softmax(logits.double() / temperature, -1)
    sp, idx = p.sort(descending=True)
    keep = (sp.cumsum(-1) - sp) <= top_p
    q = torch.zeros_like(p).scatter(-1, idx, sp * keep)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.8), (1.3, 1.0)])
def test_sampler_frequencies_match_tempered_nucleus_distribution(temperature, top_p):
    from scipy.stats import chisquare

    logits = torch.tensor([2.0, 1.5, -3.0, 1.0, 0.5, 0.0, -0.5, -1.0])
    rows, steps = 4000, 5
    sampler = SeededSampler([request_seed("chi2", i) for i in range(rows)],
                            Sampling(temperature=temperature, top_p=top_p))
    counts = torch.zeros(len(logits), dtype=torch.long)
    for _ in range(steps):
        out = sampler(torch.zeros(rows, 1, dtype=torch.long), logits.expand(rows, -1).clone())
        assert ((out == 0).sum(-1) == 1).all() and torch.isinf(out).sum() == rows * (len(logits) - 1)
        counts += torch.bincount(out.argmax(-1), minlength=len(logits))
    q = _nucleus(logits, temperature, top_p)
    assert counts[q == 0].sum() == 0  # never outside the nucleus
    kept = q > 0
    if top_p < 1.0:
        assert 0 < int(kept.sum()) < len(logits)
    result = chisquare(counts[kept].numpy(), (q[kept] * rows * steps).numpy())
    assert result.pvalue > 1e-3, (counts, q * rows * steps)


def test_sampler_draws_are_independent_across_steps():
    from scipy.stats import chi2_contingency

    logits = torch.tensor([1.0, 0.5, 0.0, -0.5])
    rows = 6000
    sampler = SeededSampler([request_seed("ind", i) for i in range(rows)], Sampling(temperature=1.0))
    ids = torch.zeros(rows, 1, dtype=torch.long)
    first = sampler(ids, logits.expand(rows, -1).clone()).argmax(-1)
    second = sampler(ids, logits.expand(rows, -1).clone()).argmax(-1)
    assert (first != second).any()
    table = torch.zeros(4, 4, dtype=torch.long)
    table.index_put_((first, second), torch.ones(rows, dtype=torch.long), accumulate=True)
    assert chi2_contingency(table.numpy()).pvalue > 1e-3


def test_sampler_top_token_always_kept_and_greedy_is_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, -1.0, 2.9]])
    tiny_p = SeededSampler([1, 2], Sampling(temperature=1.0, top_p=1e-6))
    assert tiny_p(torch.zeros(2, 1, dtype=torch.long), logits.clone()).argmax(-1).tolist() == [1, 0]
    greedy = SeededSampler([1, 2], Sampling())
    assert greedy(torch.zeros(2, 1, dtype=torch.long), logits.clone()).argmax(-1).tolist() == [1, 0]


def test_sampler_rows_do_not_depend_on_their_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    seeds = [request_seed("row", i) for i in range(6)]
    s = Sampling(temperature=1.0, top_p=0.9)
    ids = torch.zeros(6, 1, dtype=torch.long)
    full = SeededSampler(seeds, s)
    part = SeededSampler(seeds[2:5][::-1], s)
    for _ in range(4):
        a = full(ids, logits.clone()).argmax(-1)
        b = part(ids[:3], logits[2:5].flip(0).clone()).argmax(-1)
        assert a[2:5].flip(0).tolist() == b.tolist()


def test_sampled_outputs_do_not_depend_on_batch_composition(tiny):
    model, tok = tiny
    s = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=10, n=2)
    ref = texts(generate(model, tok, PROMPTS, s, seed_key=(3, 0), batch_size=16))
    assert any(len(set(v)) > 1 for v in ref.values())
    for bs in (2, 6):
        assert texts(generate(model, tok, PROMPTS, s, seed_key=(3, 0), batch_size=bs)) == ref
    alone = texts(generate(model, tok, [PROMPTS[2]], s, seed_key=(3, 0), batch_size=2))
    assert alone["p2"] == ref["p2"]
    others = [PROMPTS[5], PROMPTS[2], Prompt("x", ({"role": "user", "content": "a different prompt yes"},))]
    mixed = texts(generate(model, tok, others, s, seed_key=(3, 0), batch_size=6))
    assert mixed["p2"] == ref["p2"] and mixed["p5"] == ref["p5"]


def _dirty_copy(model, tok):
    """The same weights with a checkpoint generation_config that would change decoding."""
    from transformers import GenerationConfig

    dirty = copy.deepcopy(model)
    dirty.generation_config = GenerationConfig(
        repetition_penalty=1.5, top_k=2, do_sample=True, temperature=0.3, no_repeat_ngram_size=2,
        suppress_tokens=list(range(5, 40)), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return dirty


def test_checkpoint_generation_config_cannot_change_decoding(tiny, tmp_path):
    model, tok = tiny
    dirty = _dirty_copy(model, tok)
    enc = tok([render(tok, p.messages) for p in PROMPTS[:4]], return_tensors="pt", padding=True,
              add_special_tokens=False)
    with torch.inference_mode():  # sanity: left to itself, that config does change greedy decoding
        plain = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        changed = dirty.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    assert not torch.equal(plain, changed)
    saved = dirty.generation_config.to_dict()
    # a saved-and-reloaded checkpoint carrying that config, and a PeftModel on top of it
    dirty.save_pretrained(tmp_path / "dirty")
    tok.save_pretrained(tmp_path / "dirty")
    reloaded = load_model(str(tmp_path / "dirty"), device="cpu")
    assert reloaded.generation_config.repetition_penalty == 1.5
    from peft import LoraConfig, get_peft_model

    peft_dirty = get_peft_model(copy.deepcopy(reloaded), LoraConfig(r=2, target_modules=["q_proj"]))
    for s in (Sampling(max_new_tokens=12, top_k_stats=5),
              Sampling(temperature=1.0, top_p=0.9, max_new_tokens=12, n=2, top_k_stats=5)):
        clean = generate(model, tok, PROMPTS, s, seed_key=(5,), batch_size=8)
        for other in (dirty, reloaded):
            assert generate(other, tok, PROMPTS, s, seed_key=(5,), batch_size=8) == clean
        # the LoRA layer's zero update leaves last-bit differences in the logits: same tokens
        wrapped = generate(peft_dirty, tok, PROMPTS, s, seed_key=(5,), batch_size=8)
        assert texts(wrapped) == texts(clean)
        for pid, rec in wrapped.items():
            for a, b in zip(rec["samples"], clean[pid]["samples"]):
                assert a["topk_entropy"] == pytest.approx(b["topk_entropy"], rel=1e-5)
                assert a["topk_mass"] == pytest.approx(b["topk_mass"], rel=1e-5)
    assert dirty.generation_config.to_dict() == saved  # set aside for the call only
    assert peft_dirty.get_base_model().generation_config.repetition_penalty == 1.5


def test_generation_settings_are_the_experiments(tiny):
    model, tok = tiny
    dirty = _dirty_copy(model, tok)
    s = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=33)
    got = generation_settings(dirty, tok, s)
    assert got == generation_settings(model, tok, s)
    assert json.loads(json.dumps(got)) == got
    hf = got["hf"]
    assert hf["max_new_tokens"] == 33 and hf["do_sample"] is False and hf["repetition_penalty"] == 1.0
    assert hf["pad_token_id"] == tok.pad_token_id and hf["eos_token_id"] == [tok.eos_token_id]
    assert got["sampler"]["temperature"] == 0.7 and got["sampler"]["top_p"] == 0.9
    assert "top_k" not in hf and "temperature" not in hf
