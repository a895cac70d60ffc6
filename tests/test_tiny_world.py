"""The tiny world without its full build: tasks, splits, oracle, tokenizer, small builds."""

from __future__ import annotations

import hashlib
import itertools
import random
from pathlib import Path

import pytest

from harness.judges.base import JudgeItem, compare
from harness.tiny import tasks
from harness.tiny.build import FILES, TinyParams, build, cache_key, ensure_tiny, resolve
from harness.judges.oracle import OracleJudge
from harness.tiny.oracle import grade, response_with_score

SIZES = {"eval": 150, "train": 384, "ift": 256, "eft": 128, "warmup": 3000}

# a build small enough for unit tests (seconds); the real one is tested in test_tiny_build.py
SMALL = TinyParams(n_train=12, n_ift=12, n_eft=6, n_eval=12, n_warmup=200, n_warmup_judge=10,
                   hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=6, batch_size=8,
                   judge_start=3, threads=1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def splits():
    return {name: tasks.make_split(name, n, seed=0) for name, n in SIZES.items()}


def test_checker_agrees_with_generator(splits):
    for ex in itertools.chain(*splits.values()):
        assert tasks.parse(ex.prompt) == (ex.task, ex.answer)
        assert tasks.check(ex, ex.answer) and tasks.check(ex.prompt, f"  {ex.answer}\n")
        assert not tasks.check(ex.prompt, ex.answer + "x")
        assert ex.id == tasks.prompt_id(ex.prompt)


def test_parse_known_and_unknown_text():
    assert tasks.parse("What is 12 plus 30?") == ("add", "42")
    assert tasks.parse("Reverse the word abc.") == ("reverse", "cba")
    assert tasks.parse("Sort the letters of cab.") == ("sort", "abc")
    assert tasks.parse("How many times does the letter a appear in banana?") == ("count", "3")
    assert tasks.parse("Write abc in capital letters.") == ("upper", "ABC")
    assert tasks.parse("Repeat the word ab twice.") == ("repeat", "ab ab")
    for text in ("Tell me a joke.", "What is 1 plus?", "Reverse the word ABC.", ""):
        assert tasks.parse(text) is None
        assert not tasks.check(text, "anything")


def test_habits_are_systematic_wrong_answers(splits):
    assert tasks.habit("What is 97 plus 69?") == "56"          # no carry
    assert tasks.habit("What is 5 plus 5?") == "0"
    assert tasks.habit("How many times does the letter a appear in abca?") == "4"
    assert tasks.habit("Reverse the word abcd.") == "abcd"
    assert tasks.habit("Write abcd in capital letters.") == "abcd"
    assert tasks.habit("Repeat the word abcd twice.") == "abcd"
    assert tasks.habit("Tell me a joke.") is None
    for ex in itertools.chain(*splits.values()):
        h = tasks.habit(ex.prompt)
        assert tasks.check(ex, h) == (h == ex.answer)
        if ex.task in ("upper", "repeat"):
            assert h != ex.answer and grade(ex.task, ex.answer, h)[0] < 5


def test_judge_data_grades_the_habit():
    from harness.tiny.data import judge_rows

    exs = tasks.make_split("eft", 30, seed=0)
    rows = judge_rows(exs, random.Random(0))
    assert len({r["prompt"] for r in rows}) == len(rows)
    for ex in exs:
        mine = {r["candidate"]: r["score"] for r in rows if r["instruction"] == ex.prompt}
        assert mine[ex.answer] == 5
        assert mine[tasks.habit(ex.prompt)] == grade(ex.task, ex.answer, tasks.habit(ex.prompt))[0]
    assert all(r["response"].endswith(f"Score: {r['score']}") for r in rows)


def test_splits_never_overlap_and_are_deterministic(splits):
    prompts = {name: [ex.prompt for ex in exs] for name, exs in splits.items()}
    for name, ps in prompts.items():
        assert len(ps) == len(set(ps)) == SIZES[name]
        assert all(tasks.split_of(p) == name for p in ps)
    for a, b in itertools.combinations(prompts, 2):
        assert not set(prompts[a]) & set(prompts[b]), (a, b)
    assert tasks.make_split("eval", 150, seed=0) == splits["eval"]
    assert tasks.make_split("eval", 150, seed=1) != splits["eval"]
    # every task is represented evenly
    counts = {t: sum(ex.task == t for ex in splits["eval"]) for t in tasks.TASK_NAMES}
    assert set(counts.values()) == {150 // len(tasks.TASK_NAMES)}


def test_difficulty_changes_sizes():
    easy, hard = tasks.make_split("train", 60, difficulty=1), tasks.make_split("train", 60, difficulty=4)
    longest = lambda exs: max(len(ex.answer) for ex in exs if ex.task == "reverse")  # noqa: E731
    assert longest(easy) < longest(hard)
    with pytest.raises(ValueError, match="unknown split"):
        tasks.make_split("nope", 3)
    with pytest.raises(ValueError, match="cannot draw"):
        tasks.make_split("eval", 200, difficulty=1, tasks=("add",))


def test_oracle_scores_correct_5_and_wrong_lower(splits):
    judge, rng = OracleJudge(), random.Random(0)
    items, expected = [], []
    for ex in splits["eval"]:
        for s in (1, 2, 3, 4, 5):
            cand = response_with_score(ex, s, rng)
            if cand is not None:
                items.append(JudgeItem(ex.id, ex.prompt, cand))
                expected.append(float(s))
    verdicts = judge.score(items)
    assert [v.score for v in verdicts] == expected
    assert {v.score for v in verdicts} == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert judge.score(items) == verdicts  # deterministic
    assert judge.name == "oracle" and judge.scale == (1.0, 5.0)


def test_oracle_grades_by_hand():
    assert grade("add", "42", "42")[0] == 5
    assert grade("add", "42", "43")[0] == 4
    assert grade("add", "42", "52")[0] == 4      # one digit wrong
    assert grade("add", "42", "37")[0] == 3
    assert grade("add", "42", "90")[0] == 2
    assert grade("add", "42", "forty")[0] == 1
    assert grade("count", "2", "3")[0] == 4
    assert grade("count", "2", "7")[0] == 2
    assert grade("reverse", "cba", "cbb")[0] == 4
    assert grade("reverse", "cba", "abc")[0] == 3  # same letters
    assert grade("reverse", "cbad", "xyzw")[0] == 2
    assert grade("upper", "ABC", "abc")[0] == 3
    assert grade("upper", "ABC", "123")[0] == 1
    assert grade("repeat", "ab ab", "")[0] == 1
    # a chat model's longer reply: credit only when its final answer-shaped token is right
    assert grade("add", "8", "The sum of 3 and 5 is 8.")[0] == 4
    assert grade("add", "8", "To add 3 and 5, we get 9.")[0] == 1
    assert grade("upper", "DAY", "The answer is DAY.")[0] == 4
    assert grade("repeat", "lead lead", "Sure: lead lead")[0] == 4
    assert grade("repeat", "lead lead", "The word lead is repeated twice.")[0] == 1


def test_oracle_unparseable_and_pairwise():
    judge = OracleJudge()
    [bad] = judge.score([JudgeItem("x", "Write a poem.", "roses")])
    assert bad.score is None and bad.raw == ("unparseable instruction",)
    good, wrong = JudgeItem("a", "What is 2 plus 2?", "4"), JudgeItem("a", "What is 2 plus 2?", "5")
    assert compare(judge, [good, wrong, good], [wrong, good, good]) == [1.0, 2.0, 1.5]


def test_judge_template_and_eft_rows():
    assert "{instruction}" in tasks.JUDGE_TEMPLATE and "{response}" in tasks.JUDGE_TEMPLATE
    text = tasks.judge_prompt("What is 2 plus 2?", "4")
    assert "What is 2 plus 2?" in text and tasks.parse(text) is None
    assert tasks.judge_response(4).endswith("Score: 4")


def test_tokenizer_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from harness.tiny.tokenizer import train_tokenizer

    exs = tasks.make_split("warmup", 300)
    tok = train_tokenizer([f"{e.prompt}\n{e.answer}" for e in exs], tasks.TEMPLATE_WORDS)
    assert 300 <= len(tok) <= 1000
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").exists()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.padding_side == "left" and tok.pad_token and tok.eos_token and tok.bos_token
    msgs = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Reverse the word kzq."}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.startswith(tok.bos_token) and "Be exact." in text and text.endswith("<|assistant|>\n")
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "qzk"}], tokenize=False)
    assert full == text + "qzk" + tok.eos_token
    # payload letters stay single tokens; template words are merged
    pieces = tok.convert_ids_to_tokens(tok("Reverse the word kzq.", add_special_tokens=False)["input_ids"])
    assert pieces == ["Reverse", "Ġthe", "Ġword", "Ġ", "k", "z", "q", "."]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def _digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != "build.json"}


def test_same_seed_same_bytes(tmp_path):
    final = tmp_path / "final"  # same target path, so that lm-eval files match too
    a, b, c = (tmp_path / n for n in "abc")
    for d, seed in ((a, 0), (b, 0), (c, 1)):
        d.mkdir()
        build(d, seed, SMALL, final=final)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert "model/model.safetensors" in da and da == db
    assert da["model/model.safetensors"] != dc["model/model.safetensors"]


def test_ensure_tiny_caches_and_is_atomic(tmp_path, monkeypatch):
    import harness.tiny.build as tb

    calls = []
    real_build = tb.build

    def failing_build(out, *a, **kw):
        calls.append(out)
        (Path(out) / "partial").write_text("x")
        raise RuntimeError("crash")

    monkeypatch.setattr(tb, "build", failing_build)
    with pytest.raises(RuntimeError):
        ensure_tiny(0, SMALL)
    root = tb.cache_root() / "tiny"
    assert not (root / cache_key(0, SMALL)).exists()          # a crashed build never looks finished
    assert not [p for p in root.iterdir() if p.is_dir()]       # and leaves no temp directory

    monkeypatch.setattr(tb, "build", lambda out, *a, **kw: (calls.append(out), real_build(out, *a, **kw)))
    path = ensure_tiny(0, SMALL)
    assert path == root / cache_key(0, SMALL) and (path / "build.json").exists()
    assert ensure_tiny(0, SMALL) == path and len(calls) == 2   # second call: cached, no build
    assert cache_key(1, SMALL) != cache_key(0, SMALL) != cache_key(0, TinyParams())
    for name, rel in FILES.items():
        assert resolve(f"tiny:{name}", params=SMALL) == path / rel
        assert (path / rel).exists(), name
    assert resolve("tiny", params=SMALL) == path / "model"
    assert str(path / "eval.jsonl") in (path / "lm_eval" / "tiny_gen.yaml").read_text()
    with pytest.raises(ValueError, match="unknown tiny-world file"):
        resolve("tiny:nope", params=SMALL)
    with pytest.raises(ValueError, match="not a tiny-world reference"):
        resolve("gpt2")


def test_concurrent_ensure_tiny_builds_once(monkeypatch):
    import threading

    import harness.tiny.build as tb

    calls, real_build = [], tb.build

    def slow_build(out, *a, **kw):
        calls.append(out)
        return real_build(out, *a, **kw)

    monkeypatch.setattr(tb, "build", slow_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_tiny(2, SMALL))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3
