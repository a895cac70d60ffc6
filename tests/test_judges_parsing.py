"""Strict score parsing, judge templates, and averaging of judge samples."""

import math

import pytest

from harness.judges.parsing import (BUILTIN_TEMPLATE, ERROR_PREFIX, fill_template, is_error, load_template,
                                    parse_score, verdict_from_samples)

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
    ("Score: 0", "below range"),
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


def test_builtin_rubric_is_additive_five_point():
    text = load_template("")
    assert text == BUILTIN_TEMPLATE.read_text()
    assert "{instruction}" in text and "{response}" in text
    assert text.rstrip().endswith("Score: <points>")
    assert text.count("+1") == 5


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
    tiny = pytest.importorskip("harness.tiny")
    if not hasattr(tiny, "resolve"):
        pytest.skip("harness.tiny.resolve not available")
    text = load_template("tiny:judge_template")
    assert "{instruction}" in text and "{response}" in text
