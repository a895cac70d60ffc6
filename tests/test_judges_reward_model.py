"""RewardModelJudge on a randomly initialised tiny LlamaForSequenceClassification saved to disk."""

import math

import pytest
import torch

from test_eval_fixtures import JUDGE_CHAT_TEMPLATE, build_tokenizer, tiny_llama_config

from harness.config import JudgeSection
from harness.judges import build_judge
from harness.judges.base import JudgeItem
from harness.judges.reward_model import RewardModelJudge


def tiny_tokenizer():
    return build_tokenizer(["the user asks and the assistant answers well"] * 10, vocab_size=300, chat_template=JUDGE_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    from transformers import LlamaForSequenceClassification

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = tiny_llama_config(tok, max_position_embeddings=256, num_labels=1)
    model = LlamaForSequenceClassification(cfg)
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


ITEMS = [JudgeItem("a", "What is the capital of France?", "Paris."),
         JudgeItem("b", "Say something long.", "the assistant answers well " * 6),
         JudgeItem("c", "Hi", "")]


def test_scores_are_finite_and_batch_invariant(rm_dir):
    judge = build_judge(JudgeSection.of("reward_model", model=str(rm_dir), batch_size=3))
    assert isinstance(judge, RewardModelJudge) and judge.scale == (-math.inf, math.inf)
    assert judge.observed is None
    batched = judge.score(ITEMS)
    assert all(v.ok and math.isfinite(v.score) for v in batched)
    assert len({v.score for v in batched}) == 3  # different inputs, different rewards
    # the range seen so far: the very numbers just returned, so exact
    assert judge.observed == (min(v.score for v in batched), max(v.score for v in batched))
    one_by_one = [judge.score([it])[0] for it in ITEMS]
    # padding must not change a sequence's reward. Batches of 3 (padded) and of 1 run
    # different matmul shapes, so the CPU kernels may sum in another order (AVX-512
    # machines differ in the 8th digit, 0.18905195 vs 0.18905193): equal to float32
    # rounding, not bit for bit. 1e-5 is far above that rounding (~1e-8 here) and far
    # below the gaps between different inputs' rewards (~1e-2).
    for b, s in zip(batched, one_by_one):
        assert b.score == pytest.approx(s.score, rel=1e-5, abs=1e-5)
        assert b.scores == (b.score,) and b.raw == (repr(b.score),)
    lo, hi = judge.observed
    # now also covers the one-by-one numbers, which differ from the batched ones by rounding only
    assert (lo, hi) == pytest.approx((min(v.score for v in batched), max(v.score for v in batched)),
                                     rel=1e-5, abs=1e-5)


def test_reward_uses_the_full_chat(rm_dir):
    judge = build_judge(JudgeSection.of("reward_model", model=str(rm_dir)))
    text = judge._text(ITEMS[0])
    assert text == "<s>user: What is the capital of France?</s><s>assistant: Paris.</s>"
    # the response matters: same instruction, other response -> other reward
    v1, v2 = judge.score([ITEMS[0], JudgeItem("a", ITEMS[0].instruction, "London.")])
    assert v1.score != v2.score


def test_rejects_multi_label_models(rm_dir):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    cfg = AutoConfig.from_pretrained(rm_dir)
    cfg.num_labels = 3
    model = AutoModelForSequenceClassification.from_config(cfg)
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardModelJudge(model, AutoTokenizer.from_pretrained(rm_dir))


def test_non_finite_reward_is_a_failure(rm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    (v,) = RewardModelJudge(model, AutoTokenizer.from_pretrained(rm_dir)).score(ITEMS[:1])
    assert v.score is None and v.scores == (None,)


def _unpadded_reward(model, tok, text):
    """The reward of ``text`` alone, unpadded, read at its last token: the reference."""
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    saved, model.config.pad_token_id = model.config.pad_token_id, None
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits[0, 0].item()
    finally:
        model.config.pad_token_id = saved


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pad", ["eos", "none"])
def test_pad_equal_to_eos_pools_each_texts_last_token(rm_dir, side, pad):
    """A tokenizer whose pad is its eos (or that has no pad): the chat text ends with eos, so
    a model told pad = eos would read the token before it. Every reward, batched with texts
    of other lengths or alone, equals the unpadded text's reward read at its last token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_dir)
    tok.padding_side = side
    if pad == "eos":
        tok.pad_token = tok.eos_token
    else:
        tok.pad_token = None
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    model.config.pad_token_id = tok.pad_token_id
    judge = RewardModelJudge(model, tok, batch_size=3)
    assert judge._text(ITEMS[0]).endswith(tok.eos_token)
    expected = [_unpadded_reward(model, tok, judge._text(it)) for it in ITEMS]
    assert len({round(e, 6) for e in expected}) == 3
    batched = judge.score(ITEMS)
    alone = [judge.score([it])[0] for it in ITEMS]
    for b, a, e in zip(batched, alone, expected):
        assert b.score == pytest.approx(e, rel=1e-5, abs=1e-5)
        assert a.score == pytest.approx(e, rel=1e-5, abs=1e-5)
    assert model.config.pad_token_id == tok.pad_token_id  # the model's own setting is restored
