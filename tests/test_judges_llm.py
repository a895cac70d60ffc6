"""LLMJudge: mechanics on a tiny random Llama; averaging and failure counting with a stub generate."""

import pytest
import torch

import harness.judges.llm as llm_mod
from test_eval_fixtures import JUDGE_CHAT_TEMPLATE, build_tokenizer, tiny_llama_config

from harness.config.experiment import JudgeSection
from harness.judges import build_judge, coverage
from harness.judges.base import JudgeItem
from harness.judges.llm import LLMJudge

TEMPLATE = "Rate.\nQ: {instruction}\nA: {response}\nEnd with Score: N"


def tiny_tokenizer():
    return build_tokenizer(["Score: 4. Rate the answer. What is two plus two? It is four."] * 20, vocab_size=320, chat_template=JUDGE_CHAT_TEMPLATE)


def tiny_llama(tok):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_llama_config(tok, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def policy():
    tok = tiny_tokenizer()
    return tiny_llama(tok), tok


ITEMS = [JudgeItem("p1", "What is two plus two?", "It is four."),
         JudgeItem("p2", "Name a colour.", "Blue."),
         JudgeItem("p3", "Say hi.", "hi")]


def make(policy, **kw):
    model, tok = policy
    args = dict(template=TEMPLATE, lo=1, hi=5, samples=2, temperature=1.0, max_new_tokens=6, batch_size=4,
                seed_key=(0, 1, "judge"))
    args.update(kw)
    return LLMJudge(model, tok, **args)


def test_tiny_model_mechanics_and_reproducible_seeding(policy):
    judge = make(policy)
    verdicts = judge.score(ITEMS)
    assert len(verdicts) == 3
    for v in verdicts:
        assert len(v.raw) == 2 and len(v.scores) == 2 and all(isinstance(r, str) for r in v.raw)
    assert coverage(verdicts)["n_total"] == 3
    # seeds depend on content only: other order, other neighbours, other batch size -> same answers
    again = make(policy, batch_size=1).score([ITEMS[2], ITEMS[0]])
    assert again[0].raw == verdicts[2].raw and again[1].raw == verdicts[0].raw
    # another seed key changes the samples (temperature 1 on a random model)
    other = make(policy, seed_key=(1, 1, "judge")).score(ITEMS)
    assert [v.raw for v in other] != [v.raw for v in verdicts]


def test_duplicates_are_judged_once_and_agree(policy):
    dup = JudgeItem("other-id", ITEMS[0].instruction, ITEMS[0].response)
    v = make(policy, samples=1, temperature=0.0).score([ITEMS[0], dup])
    assert v[0] == v[1]


CUT = "<cut>"  # a scripted answer ending in CUT stopped at max_new_tokens (finish "length")


class StubGenerate:
    """Stands in for harness.engines.generate.generate: answers scripted per instruction."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def __call__(self, model, tokenizer, prompts, sampling, *, seed_key, batch_size, desc=""):
        self.calls.append(dict(prompts=prompts, sampling=sampling, seed_key=seed_key, batch_size=batch_size))
        out = {}
        for p in prompts:
            content = p.messages[-1]["content"]
            key = next(k for k in self.script if f"Q: {k}\n" in content or f"<request>\n{k}\n" in content)
            texts = self.script[key]
            assert len(texts) == sampling.n
            out[p.id] = {"id": p.id, "samples": [{"text": t.removesuffix(CUT), "n_tokens": 1,
                                                  "finish": "length" if t.endswith(CUT) else "eos"} for t in texts]}
        return out


def test_averaging_and_parse_failures_with_stub(monkeypatch, policy):
    stub = StubGenerate({
        "a": ["Fine.\nScore: 4", "Score: 5", "I cannot decide"],
        "b": ["no score", "Score: 9", "Score: 2.5"],
        "c": ["Score: 3", "**Score:** 3", "Score: 3/5"],
    })
    monkeypatch.setattr(llm_mod, "generate", stub)
    judge = make(policy, samples=3, temperature=0.7, max_new_tokens=33, batch_size=5, seed_key=(7, 2, "judge"))
    items = [JudgeItem("i1", "a", "x {instruction}"), JudgeItem("i2", "b", "y"), JudgeItem("i3", "c", "z")]
    v = judge.score(items)
    assert v[0].score == 4.5 and v[0].scores == (4, 5, None) and v[0].raw[2] == "I cannot decide"
    assert v[1].score is None and v[1].scores == (None, None, None)
    assert v[2].score == 3.0
    cov = coverage(v)
    assert cov == {"n_total": 3, "n_scored": 2, "n_failed": 1, "coverage": 2 / 3}
    (call,) = stub.calls
    s = call["sampling"]
    assert (s.n, s.temperature, s.max_new_tokens) == (3, 0.7, 33)
    assert call["batch_size"] == 5 and call["seed_key"] == (7, 2, "judge")
    first = call["prompts"][0]
    assert first.messages == ({"role": "user", "content": "Rate.\nQ: a\nA: x {instruction}\nEnd with Score: N"},)


def test_build_self_judge_uses_policy_and_section(monkeypatch, policy):
    stub = StubGenerate({"a": ["Score: 0", "Score: 4"]})
    monkeypatch.setattr(llm_mod, "generate", stub)
    section = JudgeSection.of("self", samples=2, temperature=0.5, max_new_tokens=12, batch_size=3)
    judge = build_judge(section, policy=policy, seed_key=(0, 3))
    # the built-in additive rubric starts from 0: a 0 is the worst answer, not a parse failure
    assert judge.scale == (0.0, 5.0) and judge.name == "self"
    (v,) = judge.score([JudgeItem("i", "a", "r")])
    assert v.scores == (0, 4) and v.score == 2.0
    # the built-in rubric was filled in
    content = stub.calls[0]["prompts"][0].messages[0]["content"]
    assert "Score: <points>" in content and "<answer>\nr\n</answer>" in content
    assert stub.calls[0]["seed_key"] == (0, 3)
    with pytest.raises(ValueError, match="policy"):
        build_judge(section)


def test_truncated_answers_are_marked(monkeypatch, policy):
    stub = StubGenerate({"a": ["The answer is relevant and" + CUT, "Fine.\nScore: 4"]})
    monkeypatch.setattr(llm_mod, "generate", stub)
    (v,) = make(policy, samples=2).score([JudgeItem("i", "a", "r")])
    assert v.truncated == (True, False) and v.scores == (None, 4) and v.score == 4.0


def test_dno6_template_scores_one_to_six(monkeypatch, policy):
    stub = StubGenerate({"a": ["Score: 6", "Score: 0"]})
    monkeypatch.setattr(llm_mod, "generate", stub)
    judge = build_judge(JudgeSection.of("self", template="builtin:dno6", samples=2, temperature=0.5),
                        policy=policy, seed_key=(0, 3))
    assert judge.scale == (1.0, 6.0)
    (v,) = judge.score([JudgeItem("i", "a", "r")])
    assert v.scores == (6, None)  # 0 is below the 6-point scale
    assert "6-point" in stub.calls[0]["prompts"][0].messages[0]["content"]


def test_build_hf_judge_from_a_local_directory(tmp_path, policy):
    model, tok = policy
    model.save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    tpl = tmp_path / "tpl.txt"
    tpl.write_text(TEMPLATE + "\n")
    section = JudgeSection.of("hf", model=str(tmp_path / "judge"), template=str(tpl), max_new_tokens=4)
    judge = build_judge(section, cache_path=tmp_path / "cache.jsonl")
    assert judge.inner.name == f"hf:{tmp_path / 'judge'}" and '"weights":{"fingerprint":"' in judge.identity
    verdicts = judge.score(ITEMS)
    # the loaded copy answers exactly like the in-memory model (greedy)
    direct = make(policy, samples=1, temperature=0.0, max_new_tokens=4).score(ITEMS)
    assert [v.raw for v in verdicts] == [v.raw for v in direct]
    # a rebuilt judge (a restarted stage) is served only valid judgments from the cache: these
    # answers are cut at 4 tokens before any score (failed judgments), so all are asked again, alike
    assert all(v.score is None for v in verdicts)
    again = build_judge(section, cache_path=tmp_path / "cache.jsonl")
    assert again.score(ITEMS) == verdicts and (again.hits, again.misses) == (0, 3)


FIXED = {0: "Helpful.\nScore: 2", 1: "Score: 5", 2: "no score at all"}  # answer of each sample index


def test_scores_are_the_mean_of_the_parsable_samples(monkeypatch, policy):
    """The real generation path, with each sample's text replaced by a fixed answer of its
    sample index: the verdicts are hand-computed, so a wrong average or a failure counted
    as a score fails."""
    real = llm_mod.generate

    def fixed(*args, **kw):
        out = real(*args, **kw)
        for rec in out.values():
            for j, s in enumerate(rec["samples"]):
                s["text"] = FIXED[j]
        return out

    monkeypatch.setattr(llm_mod, "generate", fixed)
    verdicts = make(policy, samples=3).score(ITEMS)
    for v in verdicts:
        assert v.scores == (2, 5, None)
        assert v.score == 3.5  # (2 + 5) / 2: the unparsable third sample is left out, not a 0
        assert v.raw == (FIXED[0], FIXED[1], FIXED[2])
    assert coverage(verdicts) == {"n_total": 3, "n_scored": 3, "n_failed": 0, "coverage": 1.0}
    (one,) = make(policy, samples=1).score(ITEMS[:1])
    assert one.score == 2.0 and one.scores == (2,)
    # one sample that does not parse is a failure, never a score
    monkeypatch.setattr(llm_mod, "generate", lambda *a, **kw: {
        pid: {**rec, "samples": [{**s, "text": "no score at all"} for s in rec["samples"]]}
        for pid, rec in real(*a, **kw).items()})
    (bad,) = make(policy, samples=1).score(ITEMS[:1])
    assert bad.score is None and bad.scores == (None,)
    assert coverage([bad]) == {"n_total": 1, "n_scored": 0, "n_failed": 1, "coverage": 0.0}
