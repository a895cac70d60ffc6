"""RewardModelJudge on a randomly initialised tiny LlamaForSequenceClassification saved to disk."""

import math

import pytest
import torch

from test_eval_fixtures import JUDGE_CHAT_TEMPLATE, build_tokenizer, tiny_llama_config

from harness.config.experiment import JudgeSection
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
    with pytest.raises(ValueError, match="num_labels=3: .*set score_field"):
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


# ---- a reward model with its own head: a custom module whose output holds a "score" field

HEAD_CODE = '''"""A tiny reward model with its own head, as ArmoRM has: per-objective rewards and their mean,
read at each sequence's last real token (right padding, by the attention mask)."""
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


class HeadRMConfig(LlamaConfig):
    model_type = "head_rm"


@dataclass
class HeadRMOutput(ModelOutput):
    score: torch.FloatTensor = None
    rewards: torch.FloatTensor = None


class HeadRM(LlamaPreTrainedModel):
    config_class = HeadRMConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression = torch.nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(-1) - 1
        rewards = self.regression(hidden[torch.arange(len(input_ids)), last])
        return HeadRMOutput(score=rewards.mean(-1), rewards=rewards)
'''


@pytest.fixture(scope="module")
def head_rm_dir(tmp_path_factory):
    """A local model directory whose code (modeling_head_rm.py, named in config.json's auto_map)
    has 3 objectives (num_labels = 3) and a "score" output: loaded with trust_remote_code."""
    import importlib.util
    import sys

    code_dir = tmp_path_factory.mktemp("head_rm_code")
    (code_dir / "modeling_head_rm.py").write_text(HEAD_CODE)
    spec = importlib.util.spec_from_file_location("modeling_head_rm", code_dir / "modeling_head_rm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["modeling_head_rm"] = module
    try:
        spec.loader.exec_module(module)
        tok = tiny_tokenizer()
        torch.manual_seed(0)
        cfg = module.HeadRMConfig(**tiny_llama_config(tok, max_position_embeddings=256, num_labels=3).to_dict())
        module.HeadRMConfig.register_for_auto_class()
        module.HeadRM.register_for_auto_class("AutoModelForSequenceClassification")
        path = tmp_path_factory.mktemp("head_rm")
        module.HeadRM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
    finally:
        del sys.modules["modeling_head_rm"]
    assert (path / "modeling_head_rm.py").exists()
    return path


def _head_judge(path, **options):
    return build_judge(JudgeSection.of("reward_model", model=str(path), trust_remote_code=True, batch_size=3,
                                       **options))


def test_a_reward_head_is_read_from_its_score_field(head_rm_dir):
    """score_field = "score": each reward is the model's own score of the text alone, unpadded."""
    judge = _head_judge(head_rm_dir, score_field="score")
    assert judge.model.config.num_labels == 3 and type(judge.model).__name__ == "HeadRM"
    batched = judge.score(ITEMS)
    assert all(v.ok and math.isfinite(v.score) for v in batched)
    assert len({v.score for v in batched}) == 3
    tok = judge.tokenizer
    for item, v in zip(ITEMS, batched):
        ids = torch.tensor([tok(judge._text(item), add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = judge.model(input_ids=ids)
        assert v.score == pytest.approx(out.score[0].item(), rel=1e-5, abs=1e-5)
        assert out.score[0].item() == pytest.approx(out.rewards[0].mean().item(), rel=1e-6)


def test_an_unscorable_reward_model_names_its_num_labels(head_rm_dir):
    """Without score_field a 3-label model is refused at validate time (its config.json) and when
    built; a score_field its output lacks, or one with several numbers per sequence, when it scores."""
    from harness.judges import JUDGES
    from harness.judges.kind import Checks
    from harness.judges.reward_model import RewardModelError

    kind = JUDGES.get("reward_model")
    checks = Checks()
    kind.preflight(kind.Options(model=str(head_rm_dir)), "judge.reward_model", checks)
    assert [(e.path, e.message.split(":")[0]) for e in checks.errors] == [
        ("judge.reward_model.score_field", "reward model with num_labels=3")]
    assert "\n" not in checks.errors[0].message and "score_field" in checks.errors[0].message
    ok = Checks()
    kind.preflight(kind.Options(model=str(head_rm_dir), score_field="score"), "judge.reward_model", ok)
    assert ok.errors == []
    with pytest.raises(RewardModelError, match=r"^reward model with num_labels=3: its logits are not one"):
        _head_judge(head_rm_dir)
    with pytest.raises(RewardModelError, match=r"num_labels=3: its output has no field 'reward' \(fields: score, rewards\)"):
        _head_judge(head_rm_dir, score_field="reward").score(ITEMS[:1])
    with pytest.raises(RewardModelError, match=r"num_labels=3: its output field 'rewards' has shape \(1, 3\)"):
        _head_judge(head_rm_dir, score_field="rewards").score(ITEMS[:1])


def test_a_one_label_model_passes_the_validate_check(rm_dir):
    from harness.judges import JUDGES
    from harness.judges.kind import Checks

    kind = JUDGES.get("reward_model")
    checks = Checks()
    kind.preflight(kind.Options(model=str(rm_dir)), "judge.reward_model", checks)
    assert checks.errors == []
