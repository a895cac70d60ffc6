"""Multi-turn data: which turns make a training prompt (``data.turns``: SPIN's code takes the
first user turn and its answer), the opponent's answer generated from exactly the prompt
training sees (after the prompt cap), and judges shown the conversation so far."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from harness.store import files as store
from harness.config.experiment import parse
from harness.models.data import DataError, Example, conversation_text, load_examples, select_turns
from harness.engines.generate import chat_ids, render
from harness.judges.llm import LLMJudge
from harness.judges.parsing import group_template_ref, load_judge_template
from harness.judges.judging import judge_groups
from harness.methods.base import Candidate, Group
from harness.config.registry import METHODS


def conversation(n: int, words: int = 3, system: bool = True) -> list[dict]:
    """A system message, then ``n`` (user, assistant) turns."""
    out = [{"role": "system", "content": "be brief"}] if system else []
    for t in range(n):
        out += [{"role": "user", "content": f"question {t}: " + " ".join(f"w{t}{i}" for i in range(words))},
                {"role": "assistant", "content": f"answer {t}: " + " ".join(f"a{t}{i}" for i in range(words))}]
    return out


def chat_file(path: Path, n: int = 6, turns: int = 3, words: int = 3) -> Path:
    path.write_text("".join(json.dumps({"id": f"c{i}", "messages": conversation(turns, words + i)}) + "\n"
                            for i in range(n)))
    return path


def spin_doc(root: Path, data: Path, **data_opts) -> dict:
    return {"experiment": {"name": "turns", "seed": 0, "output_dir": str(root / "out")},
            "model": {"base": "tiny", "device": "cpu", "cpu_threads": 1},
            "lora": {"r": 4, "alpha": 8},
            "method": {"name": "spin", "iterations": 1, "spin": {"temperature": 0.0}},
            "data": {"train": str(data), "messages_field": "messages", **data_opts},
            "generation": {"max_new_tokens": 6, "batch_size": 32},
            "training": {"learning_rate": 5e-4, "batch_size": 8, "max_length": 96, "warmup_ratio": 0.0},
            "eval": {"indicators": {"num_prompts": 0}}}


def test_select_turns_first_keeps_the_system_message_first_user_turn_and_its_answer():
    msgs = conversation(3)
    assert select_turns(msgs, "first") == (msgs[:2], msgs[2]["content"])
    assert select_turns(msgs, "all") == (msgs[:-1], msgs[-1]["content"])
    assert select_turns(msgs[:2], "first") == (msgs[:2], None)              # no answer follows
    with pytest.raises(ValueError, match="no user turn"):
        select_turns([msgs[0], msgs[2]], "first")


def test_spin_trains_on_the_first_turn_by_default_other_methods_on_the_whole_conversation(tmp_path):
    data = chat_file(tmp_path / "chat.jsonl")
    cfg = parse(spin_doc(tmp_path, data), "t.toml")
    assert cfg.data.turns == "first"  # "auto" resolved to the method's choice at parse time
    ex = load_examples(cfg.data, seed=0)[0]
    whole = conversation(3, 3)
    assert list(ex.messages) == whole[:2] and ex.response == whole[2]["content"]
    explicit = parse(spin_doc(tmp_path, data, turns="all"), "t.toml")
    ex = load_examples(explicit.data, seed=0)[0]
    assert list(ex.messages) == whole[:-1] and ex.response == whole[-1]["content"]
    assert METHODS.get("dno").turns == METHODS.get("self_rewarding").turns == "all"
    # a first user turn without its answer is named as a row of the file
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "r"},
                                            {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: column 'messages' has no assistant turn right after"):
        load_examples(parse(spin_doc(tmp_path, bad), "t.toml").data, seed=0, require_response=True)


@pytest.mark.slow
def test_the_opponent_answers_the_prompt_training_sees_token_for_token(tmp_path):
    """Long conversations over the prompt cap: the generate stage's prompts are those training
    uses (earlier turns dropped by the same cut), so training cuts no prompt again."""
    from harness.run.loop import run_experiment
    from harness.models.load import load_tokenizer
    from harness.store.rundir import RunDir
    from harness.train import TrainingError
    from harness.train.truncate import fit_prompt

    data = chat_file(tmp_path / "chat.jsonl", n=6, turns=4, words=4)
    doc = spin_doc(tmp_path, data, turns="all")
    doc["training"].update(max_length=128, max_prompt_length=60)  # 206-346 prompt tokens, answers <= 42
    # too many cut prompts fail before anything is generated, as their pairs would fail training
    with pytest.raises(TrainingError, match=r"6 of 6 prompts do not fit training\.max_length = 128 tokens "
                                            r"\(prompts at most 60\): 6 prompts cut from the left"):
        run_experiment(parse(copy.deepcopy(doc), "t.toml"))
    assert not list((tmp_path / "out").rglob("samples.jsonl"))
    doc["training"]["max_truncated_share"] = 1.0
    doc["experiment"]["name"] = "turns-cut"
    cfg = parse(copy.deepcopy(doc), "t.toml")
    run_dir, rows = run_experiment(cfg)
    layout = RunDir(run_dir)
    tok = load_tokenizer("tiny")
    originals = {e.id: list(e.messages) for e in load_examples(cfg.data, seed=0)}
    generated = {r["id"]: r["messages"] for r in store.read_jsonl(layout.stage(1, "generate") / "prompts.jsonl")}
    pairs = {p["id"]: p["messages"] for p in store.read_jsonl(layout.pairs(1))}
    assert set(generated) == set(originals) == set(pairs)
    n_cut = 0
    for pid, msgs in originals.items():
        trained, cut = fit_prompt(tok, msgs, 60)
        n_cut += cut
        engine_ids = tok(render(tok, generated[pid]), add_special_tokens=False).input_ids
        assert engine_ids == chat_ids(tok, trained, True) == chat_ids(tok, pairs[pid], True), pid
        assert fit_prompt(tok, pairs[pid], 60) == (pairs[pid], False)  # training cuts nothing more
    assert n_cut == len(originals)  # every prompt was over the cap
    assert rows[1]["metrics"]["gen/n_prompts_cut"] == n_cut and rows[1]["metrics"]["train/n_pairs_truncated"] == 0


class _Recorder:
    """An engine's ``generate`` that records the judge prompts and answers "Score: 3"."""

    def __init__(self):
        self.prompts: list[str] = []

    def __call__(self, model, tokenizer, prompts, sampling, **kw):
        self.prompts += [p.messages[-1]["content"] for p in prompts]
        text = "Score 1: 3\nScore 2: 3" if "<answer 2>" in prompts[0].messages[-1]["content"] else "Score: 3"
        return {p.id: {"id": p.id, "samples": [{"text": text, "finish": "eos"}]} for p in prompts}


@pytest.mark.parametrize("side_by_side", [False, True])
def test_judges_see_the_earlier_turns_of_a_multi_turn_prompt(tmp_path, side_by_side):
    rubric = load_judge_template("")
    group = load_judge_template(group_template_ref(""), group=True)
    judge = LLMJudge(None, None, template=rubric.text, lo=rubric.lo, hi=rubric.hi, group_template=group.text)
    judge.generate_fn = rec = _Recorder()
    multi, single = conversation(2)[:-1], conversation(1)[:-1]
    groups = [Group(Example("m", tuple(multi)), [Candidate("first"), Candidate("second")]),
              Group(Example("s", tuple(single)), [Candidate("first"), Candidate("second")])]
    judge_groups(judge, groups, store.JsonlLog(tmp_path / "j.jsonl"), batch_size=8, what="t",
                 side_by_side=side_by_side)
    shown = [p for p in rec.prompts if "question 1" in p]
    assert shown and all("User: question 0: w00 w01 w02\n\nAssistant: answer 0: a00 a01 a02\n\n"
                         "User: question 1: w10 w11 w12" in p for p in shown)
    assert conversation_text(multi).endswith(multi[-1]["content"])
    # a single-turn prompt: exactly its text, as before (no labels, no system message)
    assert conversation_text(single) == single[-1]["content"]
    assert any(f"<request>\n{single[-1]['content']}\n</request>" in p for p in rec.prompts)
