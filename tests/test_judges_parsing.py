"""Strict score parsing, judge templates, and averaging of judge samples."""

import math

import pytest

from harness.config.experiment import JudgeSection
from harness.judges import judge_scale
from harness.judges.parsing import (BUILTIN_TEMPLATE, BUILTIN_TEMPLATES, ERROR_PREFIX, fill_template, is_error,
                                    load_judge_template, load_template, parse_score, verdict_from_samples)
from harness.tiny.build import resolve as tiny_resolve

VALID = [
    ("Score: 4", 4),
    ("score: 4", 4),
    ("SCORE: 2", 2),
    ("Score: 4/5", 4),
    ("Score: 4 / 5", 4),
    ("Score: 3 out of 5", 3),
    ("Score:4", 4),
    ("**Score:** 4", 4),
    ("**Score: 4**", 4),
    ("*Score*: 5", 5),
    ("Score: **3**", 3),
    ("## Score: 1", 1),
    ("Score: 4.", 4),
    ("Score: 4.0", 4),
    ("Score: 2 points", 2),
    ("Score: 5\n\n  \n", 5),
    ("Score: `4`", 4),
    ("The response is relevant (+1) and covers most of the question (+1), but it misses the key "
     "formula and reads like a forum post.\n\nScore: 2", 2),
    ("Justification: clear, direct, well organised; slightly verbose.\nTotal score: 4", 4),
    # the judge restates the same score: not ambiguous
    ("I would give this Score: 3 since it is useful.\nScore: 3", 3),
    # an echoed format instruction with no number is not a score
    ('You asked me to conclude with "Score: <total points>".\nIt answers the question well.\nScore: 4', 4),
]

INVALID = [
    ("", "empty"),
    ("4", "bare digit, no label"),
    ("The answer deserves a 4.", "number without label"),
    ("I rate this four out of five.", "words"),
    ("Score: four", "word score"),
    ("Score:", "label without value"),
    ("Score: <total points>", "template echo only"),
    ("Score: 4.5", "non-integer"),
    ("Score: 3.75/5", "non-integer with denominator"),
    ("Score: -0", "signed zero is below the 1-5 range"),
    ("Score: 6", "above range"),
    ("Score: 10", "two digits, above range (not read as 1)"),
    ("Score: -1", "negative (not read as 1)"),
    ("Score: 7/10", "another scale"),
    ("Score: 4/10", "another scale, value in range"),
    ("Score: 3\n...on reflection...\nScore: 5", "two different scores"),
    ("Score: 4.5 at first, then\nScore: 4", "two different scores, one fractional"),
    ("Score: 3-4", "a range"),
    ("Score: 4 because it is relevant", "text after the score"),
    ("Score: 4\nThe response could be improved by adding examples.", "explanation after the score"),
    ("subscore: 4", "not the label"),
    ("Score = 4", "no colon"),
]


@pytest.mark.parametrize("text,expected", VALID)
def test_valid_scores_parse(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize("text,why", INVALID)
def test_malformed_ambiguous_or_out_of_range_is_failure(text, why):
    assert parse_score(text) is None, why


def test_custom_range():
    assert parse_score("Score: 9/10", lo=0, hi=10) == 9
    assert parse_score("Score: 0", lo=0, hi=10) == 0
    assert parse_score("Score: 0", lo=1, hi=5) is None   # below a 1-5 range
    assert parse_score("Score: 6", lo=1, hi=6) == 6 and parse_score("Score: 6/6", lo=1, hi=6) == 6
    assert parse_score("Score: 9/5", lo=0, hi=10) is None
    assert parse_score(None) is None  # type: ignore[arg-type]


def test_verdict_from_samples_averages_valid_only():
    v = verdict_from_samples(["Score: 4", "Score: 5", "no idea"])
    assert v.score == 4.5 and v.scores == (4, 5, None) and v.raw == ("Score: 4", "Score: 5", "no idea")
    none = verdict_from_samples(["meh", "Score: 9"])
    assert none.score is None and not none.ok and none.scores == (None, None)
    # an error entry never parses, even when the error text holds something score-like
    err = verdict_from_samples([ERROR_PREFIX + "malformed reply: Score: 5"])
    assert err.score is None and is_error(err.raw[0])
    assert math.isclose(verdict_from_samples(["Score: 1", "Score: 2", "Score: 2"]).score, 5 / 3)


def test_builtin_rubric_is_additive_zero_to_five():
    tpl = load_judge_template("")
    assert load_judge_template("builtin:additive5") == tpl
    # the rubric starts from 0 and adds up to five points: its scale is 0-5, declared in its front matter
    assert "Start from 0" in tpl.text and tpl.text.count("+1") == 5
    assert (tpl.lo, tpl.hi) == (0, 5) and tpl.scale == (0.0, 5.0)
    raw = BUILTIN_TEMPLATE.read_text()
    assert raw.startswith("---\nscale: 0-5\n---\n") and tpl.text == raw.split("---\n", 2)[2]
    assert load_template("") == tpl.text and not tpl.text.startswith("---")
    assert "{instruction}" in tpl.text and "{response}" in tpl.text
    assert tpl.text.rstrip().endswith("Score: <points>")
    # the worst answer parses as 0 on the rubric's own scale (a failure on 1-5 dropped it from pairing)
    assert verdict_from_samples(["No point earned.\nScore: 0"], tpl.lo, tpl.hi).score == 0


def test_builtin_dno6_is_a_six_point_scale():
    tpl = load_judge_template("builtin:dno6")
    assert (tpl.lo, tpl.hi) == (1, 6)
    assert set(BUILTIN_TEMPLATES) == {"additive5", "dno6", "additive5_group", "dno6_group"}
    for name in ("additive5", "dno6"):  # each group form scores on its pointwise template's scale
        group = load_judge_template(f"builtin:{name}_group", group=True)
        assert group.scale == load_judge_template(f"builtin:{name}").scale and "{responses}" in group.text
    assert all(f"{k} - " in tpl.text for k in range(1, 7)) and "{instruction}" in tpl.text
    assert parse_score("Score: 6", tpl.lo, tpl.hi) == 6 and parse_score("Score: 0", tpl.lo, tpl.hi) is None
    with pytest.raises(ValueError, match=r"judge\.template.*unknown built-in.*builtin:dno6"):
        load_judge_template("builtin:dno7")


def test_scale_front_matter(tmp_path):
    def tpl(text):
        path = tmp_path / "t.txt"
        path.write_text(text)
        return str(path)

    assert load_judge_template(tpl("Q {instruction} A {response}")).scale == (1.0, 5.0)  # undeclared: 1-5
    got = load_judge_template(tpl("---\nscale: 0..10\n---\nQ {instruction} A {response}\n"))
    assert (got.lo, got.hi, got.text) == (0, 10, "Q {instruction} A {response}\n")
    assert load_judge_template(tpl("---\nscale: -2 to 2\n---\n{instruction}{response}")).scale == (-2.0, 2.0)
    for bad, why in (("---\nscale: 5-1\n---\n", "LO < HI"), ("---\nscale: 1-5.5\n---\n", "LO < HI"),
                     ("---\nrange: 1-5\n---\n", "unknown front-matter key"),
                     ("---\njust text\n---\n", "not 'key: value'")):
        with pytest.raises(ValueError, match=why):
            load_judge_template(tpl(bad + "{instruction} {response}"))


def test_judge_scale_is_known_without_a_model(tmp_path):
    assert judge_scale(JudgeSection.of("oracle")) == (1.0, 5.0)
    assert judge_scale(JudgeSection.of("self")) == (0.0, 5.0)
    assert judge_scale(JudgeSection.of("openai", model="m", template="builtin:dno6")) == (1.0, 6.0)
    assert judge_scale(JudgeSection.of("hf", model="m", template="tiny:judge_template")) == (1.0, 5.0)
    assert judge_scale(JudgeSection.of("reward_model", model="m")) == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="no judge"):
        judge_scale(JudgeSection.of("none"))


def test_fill_template_substitutes_once_and_keeps_braces():
    tpl = "JSON example: {\"a\": 1}\nQ: {instruction}\nA: {response}.\n"
    out = fill_template(tpl, "print {x} for {response}", "use {instruction} here")
    assert out == "JSON example: {\"a\": 1}\nQ: print {x} for {response}\nA: use {instruction} here."
    # same text as str.format (+ strip) where that works, e.g. the tiny world's own judge prompts
    tpl2 = "Rate it.\nTask: {instruction}\nAnswer: {response}\nGive a score.\n"
    assert fill_template(tpl2, "add 2 and 3", "5") == tpl2.format(instruction="add 2 and 3", response="5").strip()


def test_template_file_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"judge\.template.*cannot read"):
        load_template(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text("Rate {instruction} only.")
    with pytest.raises(ValueError, match=r"judge\.template.*\{response\}"):
        load_template(str(bad))
    good = tmp_path / "good.txt"
    good.write_text("Q {instruction} A {response}")
    assert load_template(str(good)) == "Q {instruction} A {response}"


def test_tiny_template_ref_resolves():
    text = load_template("tiny:judge_template")
    assert text == tiny_resolve("tiny:judge_template").read_text()
    assert "{instruction}" in text and "{response}" in text


def test_a_judge_template_that_is_a_fifo_is_refused_unread(tmp_path):
    import os

    os.mkfifo(tmp_path / "t.txt")  # opening it would wait for a writer forever
    with pytest.raises(ValueError, match=r"judge.template: judge template '.*t.txt' is a FIFO, not a regular file"):
        load_judge_template(str(tmp_path / "t.txt"))
