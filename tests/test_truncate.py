"""Long prompts never eat the answer: prompts are cut from the left to the stage's prompt
limit (whole earlier turns first, the system message kept) before trl sees them, answers
that still do not fit are cut and counted, and too many cut pairs fail the stage."""

from __future__ import annotations

import pytest

from harness.engines.generate import chat_ids, completion_ids
from harness.models.load import load_policy
from harness.train import TrainingError, dpo_trainer, train_dpo, train_sft
from harness.train.truncate import fit_prompt
from test_eval_fixtures import tiny  # noqa: F401  (the fixture)
from test_train import make_cfg

WORDS = "the quick brown fox jumps over the lazy dog".split()


def _text(n: int, seed: int) -> str:
    return " ".join(f"{WORDS[(seed + i) % len(WORDS)]} {i % 10}" for i in range(n))


def conversation(turns: int, words: int, seed: int = 0, system: bool = True) -> list[dict]:
    """A multi-turn chat prompt (optionally with a system message) ending in a user turn."""
    out = [{"role": "system", "content": "you are a fox"}] if system else []
    for t in range(turns):
        out.append({"role": "user", "content": f"question {t}: " + _text(words, seed + t)})
        if t < turns - 1:
            out.append({"role": "assistant", "content": f"answer {t}: " + _text(words // 2, seed + 7 * t)})
    return out


def long_pairs(n: int = 8, turns: int = 4, words: int = 20) -> list[dict]:
    return [{"id": f"p{i}", "messages": conversation(turns, words, seed=i), "chosen": f"yes {i} " + _text(3, i),
             "rejected": "no no"} for i in range(n)]


def _valid(messages: list[dict]) -> bool:
    """System first (if any), then user/assistant alternating, ending with a user turn."""
    roles = [m["role"] for m in messages if m["role"] != "system"]
    return (all(m["role"] != "system" for m in messages[1:]) and roles[-1] == "user"
            and all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)))


def test_fit_prompt_drops_earlier_turns_keeps_system_then_cuts_the_last_turn_from_the_left(tiny):
    _, tok = tiny
    msgs = conversation(4, 20)
    full = len(chat_ids(tok, msgs, True))
    assert fit_prompt(tok, msgs, full) == (msgs, False)
    last_two = [msgs[0]] + msgs[-3:]  # system + (user, assistant) + the last user turn
    limit = len(chat_ids(tok, last_two, True))
    got, cut = fit_prompt(tok, msgs, limit)
    assert cut and got == last_two and _valid(got)
    # only the last user turn fits no more: its text is cut from the left, its end is kept
    alone = [msgs[0], msgs[-1]]
    limit = len(chat_ids(tok, alone, True)) - 10
    got, cut = fit_prompt(tok, msgs, limit)
    assert cut and [m["role"] for m in got] == ["system", "user"] and got[0] == msgs[0]
    assert len(chat_ids(tok, got, True)) <= limit
    kept = got[-1]["content"]
    assert 0 < len(kept) < len(msgs[-1]["content"]) and msgs[-1]["content"].endswith(kept.strip())
    # the system message alone does not fit: no valid prompt
    assert fit_prompt(tok, msgs, len(chat_ids(tok, [msgs[0]], False)) - 1) is None


def test_long_multi_turn_prompts_train_with_every_answer_whole(tiny_dir, tmp_path):
    """Prompts longer than max_length: trl 1.16 dropped every pair (the stage died with
    "IndexError: Invalid key: 0 is out of bounds for size 0"); now they are cut to the
    prompt limit, every answer is trained whole, and the cuts are counted."""
    cfg = make_cfg(tiny_dir, tmp_path, training={"max_length": 96, "max_truncated_share": 1.0})
    pairs = long_pairs()
    model, tok = load_policy(cfg, [])
    assert all(len(chat_ids(tok, p["messages"], True)) > 96 for p in pairs)  # each prompt alone fills max_length
    metrics, _ = train_dpo(model, tok, pairs, cfg, 1, tmp_path / "it1")
    assert metrics["train/n_pairs"] == len(pairs)
    assert metrics["train/n_pairs_truncated"] == len(pairs) and metrics["train/n_pairs_dropped"] == 0
    assert metrics["train/steps"] > 0


def test_no_answer_is_cut_by_trl_after_fitting(tiny_dir, tmp_path):
    """Prompts of 118-121 of 128 tokens (the CPU SPIN case): trl kept them and cut the
    answers silently. Fitted, each trl row holds the pair's whole answer (end of turn
    included) within max_length, with the prompt's last turns."""
    cfg = make_cfg(tiny_dir, tmp_path, training={"max_length": 128, "max_truncated_share": 1.0})
    model, tok = load_policy(cfg, [])
    pairs = long_pairs(turns=3, words=14)
    from harness.train.truncate import fit

    fitted = fit(tok, pairs, ("chosen", "rejected"), 128, cfg.training.prompt_limit)
    assert fitted.n_truncated == len(pairs) and fitted.n_answers_cut == 0
    trainer = dpo_trainer(model, tok, fitted.items, cfg, 1, tmp_path / "it1")
    data = trainer.train_dataset
    assert len(data) == len(pairs)
    for row in data:
        pair = fitted.items[row["row"]]
        p, c = completion_ids(tok, pair["messages"], pair["chosen"])
        assert row["chosen_ids"] == c and len(row["prompt_ids"]) + len(c) <= 128
        assert len(row["prompt_ids"]) <= cfg.training.prompt_limit


def test_too_many_cut_pairs_fail_the_stage_with_the_lengths_to_raise(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path, training={"max_length": 96})  # max_truncated_share 0.1 by default
    model, tok = load_policy(cfg, [])
    pairs = long_pairs(n=2) + [{"messages": [{"role": "user", "content": f"say {i}"}], "chosen": f"{i}",
                                "rejected": "no"} for i in range(6)]
    with pytest.raises(TrainingError, match=r"2 of 8 pairs do not fit training.max_length = 96.*"
                                            r"training.max_truncated_share"):
        train_dpo(model, tok, pairs, cfg, 1, tmp_path / "it1")


def test_answers_longer_than_the_room_left_are_cut_and_counted(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path, training={"max_length": 48, "max_truncated_share": 1.0})
    model, tok = load_policy(cfg, [])
    pairs = [{"messages": [{"role": "user", "content": f"say {i}"}], "chosen": _text(30, i), "rejected": "no"}
             for i in range(4)] + [{"messages": [{"role": "user", "content": "say 9"}], "chosen": "9",
                                    "rejected": "no"}]
    trainer = dpo_trainer(model, tok, pairs, cfg, 1, tmp_path / "t")
    assert all(len(p) + len(c) <= 48 for p, c in zip(trainer.train_dataset["prompt_ids"],
                                                     trainer.train_dataset["chosen_ids"]))
    model, tok = load_policy(cfg, [])
    metrics, _ = train_dpo(model, tok, pairs, cfg, 1, tmp_path / "it1")
    assert metrics["train/n_pairs_truncated"] == 4 and metrics["train/n_pairs_dropped"] == 0


def test_sft_fits_long_judge_prompts_and_counts_them(tiny_dir, tmp_path):
    """EFT examples hold a whole judge prompt: fitted like any prompt (left cut), counted."""
    cfg = make_cfg(tiny_dir, tmp_path, training={"max_length": 64, "max_truncated_share": 1.0})
    model, tok = load_policy(cfg, [])
    examples = [{"messages": [{"role": "user", "content": "judge this: " + _text(60, i)}],
                 "response": f"Score: {i % 5}"} for i in range(4)]
    examples.append({"messages": [{"role": "user", "content": "say 1"}], "response": "1"})
    metrics = train_sft(model, tok, examples, cfg, 1, tmp_path / "sft", max_steps=1)
    assert metrics["train/n_pairs_truncated"] == 4 and metrics["train/n_pairs_dropped"] == 0


def test_prompt_limit_defaults_to_half_of_max_length_and_must_leave_room(tiny_dir, tmp_path):
    from harness.config.schema import ConfigError

    assert make_cfg(tiny_dir, tmp_path, training={"max_length": 128}).training.prompt_limit == 64
    assert make_cfg(tiny_dir, tmp_path, training={"max_prompt_length": 50}).training.prompt_limit == 50
    with pytest.raises(ConfigError, match="training.max_prompt_length"):
        make_cfg(tiny_dir, tmp_path, training={"max_length": 64, "max_prompt_length": 64})


@pytest.mark.parametrize("precompute", [True, False])
def test_probe_matches_trls_rows_to_our_pairs_when_trl_drops_one(tiny_dir, tmp_path, monkeypatch, precompute):
    """Unfitted pairs, the first with a prompt that alone fills max_length: trl drops it.
    The probe's reference values must still be those of the same pairs as its policy values
    (they were taken from trl's first rows and matched to pairs[:probe]: a gap of whole nats)."""
    from harness.train import dpo
    from harness.train.truncate import Fitted

    monkeypatch.setattr(dpo, "fit", lambda tok, pairs, *a: Fitted(items=list(pairs), index=list(range(len(pairs)))))
    cfg = make_cfg(tiny_dir, tmp_path, training={"max_length": 96, "probe_share": 1.0})  # probe every pair
    model, tok = load_policy(cfg, [])
    short = [{"messages": [{"role": "user", "content": f"what is {i} plus {i + 1}"}], "chosen": f"{2 * i + 1}",
              "rejected": "no no" * (i + 1)} for i in range(7)]
    pairs = long_pairs(n=1) + short
    metrics, _ = train_dpo(model, tok, pairs, cfg, 1, tmp_path / "it1", precompute=precompute)
    assert metrics["train/n_pairs"] == metrics["train/probe_pairs"] == 7
    assert metrics["train/ref_gap_to_start"] < 1e-3
    model, tok = load_policy(cfg, [])
    from harness.train import pair_logps

    c, r = pair_logps(model, tok, short, 96)
    assert metrics["train/logp_chosen_before"] == pytest.approx(sum(c) / 7, abs=1e-3)
    assert metrics["train/ref_logp_rejected"] == pytest.approx(sum(r) / 7, abs=1e-3)
