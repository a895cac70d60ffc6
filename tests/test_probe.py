"""The post-training probe: its prompt-shared forward equals a full forward of each
sequence, and its sample is seeded, bounded by its share of the stage's work, and what
``train_dpo`` reports on."""

from __future__ import annotations

import statistics

import pytest
import torch

from full_forward import sequence_logprobs
from harness.models.load import load_policy
from harness.train import GAP_CHECK_PAIRS, pair_logps, probe_sample, train_dpo
from harness.train.probe import LOGIT_BUDGET, PROBE_FORWARDS, PROBE_MAX, PROBE_MIN, _batches, probe_tokens, stage_work
from test_train import PAIRS, make_cfg

WORDS = "the quick brown fox jumps over the lazy dog what is plus minus say".split()


def mixed_pairs() -> list[dict]:
    """Short and long, single- and multi-turn prompts, a system message, answers of very
    different lengths, and pairs whose answers max_length = 96 cuts or removes entirely."""
    out = []
    for i in range(11):
        turns = [{"role": "system", "content": "say yes"}] if i % 3 == 0 else []
        for t in range(i % 4 + 1):
            turns.append({"role": "user", "content": " ".join(WORDS[(i + t + k) % len(WORDS)] for k in range(2 + i))})
            turns.append({"role": "assistant", "content": " ".join(WORDS[:t + 2])})
        out.append({"messages": turns[:-1], "chosen": f"{2 * i + 1}",
                    "rejected": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + 4 * i))})
    return out


def full_forward(model, tok, pairs, max_length):
    msgs = [p["messages"] for p in pairs]
    return (sequence_logprobs(model, tok, msgs, [p["chosen"] for p in pairs], max_length=max_length),
            sequence_logprobs(model, tok, msgs, [p["rejected"] for p in pairs], max_length=max_length))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prompt_shared_forward_equals_full_forward(tiny_dir, tmp_path, dtype):
    """One prompt forward per pair + its KV cache for both answers gives each sequence's
    full-forward log-likelihood (float rounding apart), on left-padded batches of mixed
    lengths, long multi-turn prompts and answers cut at max_length."""
    cfg = make_cfg(tiny_dir, tmp_path, model={"dtype": dtype})
    model, tok = load_policy(cfg, [])
    pairs = mixed_pairs()
    from harness.engines.generate import completion_ids

    lengths = [len(sum(completion_ids(tok, p["messages"], p["rejected"]), [])) for p in pairs]
    assert min(lengths) < 96 < max(lengths)  # some pairs are cut, some not
    got_c, got_r = pair_logps(model, tok, pairs, 96, batch_size=4)
    want_c, want_r = full_forward(model, tok, pairs, 96)
    tol = 5e-4 if dtype == "float32" else 0.05  # measured: 6e-5 and 0.011 nats on answers of up to 530
    assert got_c == pytest.approx(want_c, abs=tol) and got_r == pytest.approx(want_r, abs=tol)
    assert len(set(round(v, 3) for v in got_r)) > 6 and sum(v < 0 for v in got_c) > 6
    assert 0.0 in got_c  # a prompt that fills max_length leaves no answer token to score
    # one pair alone (no padding) gives the same numbers as inside a batch
    alone = pair_logps(model, tok, pairs[5:6], 96)
    assert alone[0][0] == pytest.approx(got_c[5], abs=tol) and alone[1][0] == pytest.approx(got_r[5], abs=tol)


def test_batches_bound_the_answer_logits():
    """Up to ``most`` pairs a batch, fewer where two rows per pair of the batch's widest answer
    pass the logit budget; a pair wider than the budget still gets a batch of its own."""
    assert _batches(range(10), [5] * 10, 4, 1000) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert _batches(range(5), [256] * 5, 8, LOGIT_BUDGET // 152064) == [[0, 1, 2], [3, 4]]
    assert _batches([0, 1, 2], [900, 10, 10], 8, 1000) == [[0], [1, 2]]
    assert _batches([0, 1, 2], [10, 300, 10], 8, 1000) == [[0], [1], [2]]  # 2 * 2 * 300 > 1000


def test_probe_sample_is_seeded_and_bounded():
    lengths = [(30 + i % 7, 5 + i % 3, 20 + i % 11) for i in range(400)]
    work = stage_work(lengths, epochs=1.0, precomputed=True, checkpointing=False)
    assert work == 3 * sum(2 * p + c + r for p, c, r in lengths)
    a = probe_sample(lengths, work, 0.05, key="probe/0/1")
    assert a == probe_sample(lengths, work, 0.05, key="probe/0/1") == sorted(a)
    assert a != probe_sample(lengths, work, 0.05, key="probe/0/2")
    used = sum(PROBE_FORWARDS * probe_tokens(lengths[i]) for i in a)  # before and after training
    assert used <= 0.05 / 0.95 * work and used + 2 * max(map(probe_tokens, lengths)) > 0.05 / 0.95 * work
    assert PROBE_MIN < len(a) < PROBE_MAX
    assert sorted(a) != list(range(len(a)))  # a random sample, not the first pairs
    # checks already spent shrink it; the cap, the floor and share = 1
    assert len(probe_sample(lengths, work, 0.05, key="probe/0/1", spent=0.02 * work)) < len(a)
    assert len(probe_sample(lengths, work, 1.0, key="k")) == PROBE_MAX == 256
    assert len(probe_sample(lengths, work, 1.0, key="k", cap=1000)) == 400
    assert len(probe_sample(lengths, work, 0.0, key="k")) == PROBE_MIN
    assert probe_sample(lengths[:3], work, 0.0, key="k") == [0, 1, 2]
    # more epochs, more work, a larger sample
    assert len(probe_sample(lengths, stage_work(lengths, 3.0, True, False), 0.05, key="probe/0/1")) > len(a)


def pair_lengths(tok, pairs) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of each pair, as trl's rows count them."""
    from harness.engines.generate import completion_ids

    out = []
    for p in pairs:
        prompt, c = completion_ids(tok, p["messages"], p["chosen"])
        out.append((len(prompt), len(c), len(completion_ids(tok, p["messages"], p["rejected"])[1])))
    return out


@pytest.mark.parametrize("share", [0.05, 1.0])
def test_train_dpo_reports_on_its_sample(tiny_dir, tmp_path, share):
    """The probe's numbers are those of the sampled pairs: its "before" and "after" values
    equal independent forwards of exactly those pairs, before and after training, and trl's
    reference values those of the model before training; share = 1 probes every pair."""
    cfg = make_cfg(tiny_dir, tmp_path, training={"probe_share": share})
    pairs = PAIRS + [{**p, "chosen": p["chosen"] + " plus"} for p in PAIRS]  # 16 pairs
    model, tok = load_policy(cfg, [])
    start_c, start_r = pair_logps(model, tok, pairs, 64)
    metrics, trained = train_dpo(model, tok, pairs, cfg, 1, tmp_path / "it1")
    n = metrics["train/probe_pairs"]
    assert n == (16 if share == 1 else PROBE_MIN)
    lengths = pair_lengths(tok, pairs)
    work = stage_work(lengths, 1.0, True, False)
    spent = sum(probe_tokens(x) for x in lengths[:GAP_CHECK_PAIRS]) * 3  # the checks: start, reference, merged
    picked = probe_sample(lengths, work, share, key="probe/0/1", spent=spent)
    assert len(picked) == n
    assert metrics["train/logp_chosen_before"] == pytest.approx(sum(start_c[i] for i in picked) / n, abs=1e-4)
    assert metrics["train/logp_rejected_before"] == pytest.approx(sum(start_r[i] for i in picked) / n, abs=1e-4)
    assert metrics["train/ref_logp_chosen"] == pytest.approx(sum(start_c[i] for i in picked) / n, abs=1e-4)
    end_c, end_r = pair_logps(trained, tok, [pairs[i] for i in picked], 64)
    assert metrics["train/logp_chosen"] == pytest.approx(sum(end_c) / n, abs=1e-4)
    assert metrics["train/logp_rejected"] == pytest.approx(sum(end_r) / n, abs=1e-4)
    assert abs(metrics["train/logp_chosen"] - metrics["train/logp_chosen_before"]) > 0.02  # training moved it
    assert metrics["train/ref_gap_to_start"] < 1e-3 and metrics["train/merge_gap"] < 1e-3
    beta = cfg.method.beta
    margins = [beta * ((end_c[k] - start_c[i]) - (end_r[k] - start_r[i])) for k, i in enumerate(picked)]
    assert metrics["train/reward_margin"] == pytest.approx(statistics.mean(margins), abs=1e-4)
    assert metrics["train/reward_margin_stderr"] == pytest.approx(statistics.stdev(margins) / n ** 0.5, abs=1e-4)


def test_probe_of_a_model_that_did_not_move_reports_exactly_zero_in_bfloat16(tiny_dir, tmp_path):
    """bfloat16 at learning rate 1e-30: the only weights the optimizer moves are the fresh
    adapter's zero-initialised lora_B, by about 1e-30 (the trainer's guard refuses an adapter
    left bit for bit unchanged), which leaves every log-prob of the model bit for bit as it was.
    "Before" and "after" come from one forward function on the same batches, so the margin and
    the likelihood changes are exactly 0, and so is the gap from the reference to the start
    (both measured by that function). With trl's reference pass as "before" they were not."""
    from harness.train.trainer import prepare_policy

    cfg = make_cfg(tiny_dir, tmp_path, model={"dtype": "bfloat16"}, lora={"chain": "continue"},
                   training={"learning_rate": 1e-30, "probe_share": 1.0}, method={"beta": 0.1})
    pairs = PAIRS + [{**p, "chosen": p["chosen"] + " plus", "rejected": "no " * (i + 1)} for i, p in enumerate(PAIRS)]
    model, tok = load_policy(cfg, [])
    start = full_forward(model, tok, pairs, 64)
    metrics, trained = train_dpo(model, tok, pairs, cfg, 1, tmp_path / "it1")
    # the model did not move: its adapter is the fresh one up to 1e-30, its log-probs are unchanged
    fresh = {n: p.detach() for n, p in prepare_policy(load_policy(cfg, [])[0], cfg, 1)[0].named_parameters()
             if "lora_" in n}
    moved = {n: (p.detach() - fresh[n]).abs().max().item() for n, p in trained.named_parameters()
             if "lora_" in n and ".ref." not in n}
    assert moved.keys() == fresh.keys() and 0 < max(moved.values()) < 1e-25
    assert all(moved[n] == 0 for n in moved if "lora_A" in n)
    assert full_forward(trained, tok, pairs, 64) == start
    assert metrics["train/probe_pairs"] == metrics["train/n_pairs"] > 4
    assert metrics["train/reward_margin"] == 0.0 and metrics["train/reward_accuracy"] == 0.0
    assert metrics["train/logp_chosen"] - metrics["train/logp_chosen_before"] == 0.0
    assert metrics["train/logp_rejected"] - metrics["train/logp_rejected_before"] == 0.0
    assert metrics["train/prefers_chosen_after"] == metrics["train/prefers_chosen_before"]
    assert metrics["train/ref_gap_to_start"] == 0.0


@pytest.mark.parametrize("chain", ["merge", "continue"])
def test_reference_model_is_the_reference_trl_holds(tiny_dir, tmp_path, chain):
    """reference = "base" from a start that is not the base: inside ``reference_model`` the
    probe's forward measures the base (trl's ref_model, or the policy with its adapters
    disabled), not the policy, and on leaving the policy is the start again."""
    from harness.train import dpo_trainer, lora_config
    from harness.train.reference import reference_model

    cfg = make_cfg(tiny_dir, tmp_path, lora={"chain": chain}, method={"reference": "base"})
    from peft import get_peft_model

    peft = get_peft_model(load_policy(cfg, [])[0], lora_config(cfg.lora))
    torch.manual_seed(0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    peft.save_pretrained(str(tmp_path / "a1"))
    model, tok = load_policy(cfg, [tmp_path / "a1"])
    start = pair_logps(model, tok, PAIRS, 64)
    base = pair_logps(load_policy(cfg, [])[0], tok, PAIRS, 64)
    assert max(abs(a - b) for a, b in zip(start[0] + start[1], base[0] + base[1])) > 0.1
    trainer = dpo_trainer(model, tok, PAIRS, cfg, 2, tmp_path / "it2", reference=[])
    with reference_model(trainer) as ref:
        got = pair_logps(ref, tok, PAIRS, 64)
    assert got[0] == pytest.approx(base[0], abs=1e-4) and got[1] == pytest.approx(base[1], abs=1e-4)
    assert pair_logps(trainer.model, tok, PAIRS, 64) == start


def test_probe_forwards_stay_within_their_share(tiny_dir, tmp_path, monkeypatch):
    """Every pair_logps forward train_dpo runs (continue chain: the start and the reference on
    the check pairs, the policy before and after training on the sample) fits in
    training.probe_share of the stage's forward work, and the sample is as large as that allows:
    the accounting counts the forwards that run."""
    from harness.train import dpo

    calls = []

    def spy(model, tok, pairs, max_length, **kw):
        calls.append([id(p) for p in pairs])
        return pair_logps(model, tok, pairs, max_length, **kw)

    monkeypatch.setattr(dpo, "pair_logps", spy)
    share = 0.25
    cfg = make_cfg(tiny_dir, tmp_path, lora={"chain": "continue"}, training={"probe_share": share})
    pairs = PAIRS + [{**p, "chosen": p["chosen"] + " plus"} for p in PAIRS]
    model, tok = load_policy(cfg, [])
    metrics, _ = train_dpo(model, tok, pairs, cfg, 1, tmp_path / "it1")
    lengths = {id(p): x for p, x in zip(pairs, pair_lengths(tok, pairs))}
    budget = share / (1 - share) * stage_work(list(lengths.values()), 1.0, True, False)
    used = sum(probe_tokens(lengths[i]) for call in calls for i in call)
    n = metrics["train/probe_pairs"]
    assert PROBE_MIN < n < len(pairs)
    assert len(calls) == 4 and calls[2] == calls[3] and len(calls[2]) == n  # before and after: the same pairs
    assert used <= budget < used + PROBE_FORWARDS * max(map(probe_tokens, lengths.values()))
