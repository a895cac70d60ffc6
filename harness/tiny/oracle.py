"""The tiny world's rule-based judge: exact answers score 5, near misses 3-4,
an answer of the right kind 2, anything else 1. A longer reply whose final
answer-shaped token is the correct answer ("The sum of 3 and 5 is 8.") scores 4:
right, but not in the requested form. That is how a real chat model, which
rarely answers with the bare answer, gets credit for a correct answer.

Graded partial credit keeps score margins meaningful (DNO keeps only pairs with
a large margin). Everything here is a pure function of (instruction text,
response text): deterministic, no model, no side data.
"""

from __future__ import annotations

import random
import re
import string

from harness.tiny.tasks import NUMBER_TASKS, Example, parse

_INT = re.compile(r"0|[1-9]\d*")
_ANY_INT = re.compile(r"(?<![\d.])\d+(?![\d.]\d)")
_WORD = re.compile(r"[A-Za-z]+")
_CLOSE = {"add": 10, "count": 2}  # a number this near the answer is "close"
# the form of a correct answer, per task: a response of this form is "the right kind"
_FORM = {
    "reverse": re.compile(r"[a-z]+"),
    "sort": re.compile(r"[a-z]+"),
    "upper": re.compile(r"[A-Z]+"),
    "repeat": re.compile(r"[a-z]+ [a-z]+"),
}


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _final_answer(task: str, response: str) -> str | None:
    """The last answer-shaped token of a longer reply (two words for "repeat")."""
    if task in NUMBER_TASKS:
        numbers = _ANY_INT.findall(response)
        return numbers[-1] if numbers else None
    words = _WORD.findall(response)
    n = 2 if task == "repeat" else 1
    return " ".join(words[-n:]) if len(words) >= n else None


def grade(task: str, answer: str, response: str) -> tuple[int, str]:
    """(score 1..5, reason) of ``response`` for a task whose correct answer is ``answer``."""
    score, reason = _grade_bare(task, answer, response)
    if score == 1 and response.strip() and _final_answer(task, response) == answer:
        return 4, "correct answer in a longer reply"
    return score, reason


def _grade_bare(task: str, answer: str, response: str) -> tuple[int, str]:
    r = response.strip()
    if r == answer:
        return 5, "exact"
    if not r:
        return 1, "empty"
    if task in NUMBER_TASKS:
        if not _INT.fullmatch(r):
            return 1, "not a number"
        diff = abs(int(r) - int(answer))
        multi = len(answer) > 1  # digit typos only mean "near" for multi-digit answers
        if diff == 1:
            return 4, "off by one"
        if multi and len(r) == len(answer) and sum(x != y for x, y in zip(r, answer)) == 1:
            return 4, "one digit wrong"
        if diff <= _CLOSE[task] or (multi and edit_distance(r, answer) == 1):
            return 3, "close"
        return 2, "a number"
    d = edit_distance(r, answer)
    if d == 1:
        return 4, "one edit away"
    if d == 2 or sorted(r) == sorted(answer) or r.lower() == answer.lower():
        return 3, "close"
    form = _FORM[task]
    if form.fullmatch(r) and len(answer) / 2 <= len(r) <= 2 * len(answer):
        return 2, "right kind"
    return 1, "wrong kind"


def grade_text(instruction: str, response: str) -> tuple[int, str] | None:
    """Grade from the instruction text alone; None when it fits no task template."""
    parsed = parse(instruction)
    if parsed is None:
        return None
    return grade(parsed[0], parsed[1], response)


# --- responses of a chosen score (EFT data, imperfect references) -------------------

def _mutate(task: str, answer: str, rng: random.Random) -> str:
    """One random corruption of the answer, small or large."""
    kind = rng.random()
    if task in NUMBER_TASKS:
        a = int(answer)
        if kind < 0.3:
            return str(max(0, a + rng.choice((-1, 1))))
        if kind < 0.6:
            return str(max(0, a + rng.randint(-10, 10)))
        if kind < 0.85:
            return str(rng.randint(0, max(9, 2 * a)))
        return rng.choice(["", "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 5)))])
    chars = string.ascii_uppercase if task == "upper" else string.ascii_lowercase
    s = list(answer)
    if kind < 0.55:  # a few point edits
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(s) + 1)
            op = rng.choice(("sub", "del", "ins"))
            if op == "ins" or not s:
                s.insert(i, rng.choice(chars))
            elif i < len(s):
                s[i] = rng.choice(chars) if op == "sub" else ""
        return "".join(s)
    if kind < 0.7:  # right letters, wrong order
        rng.shuffle(s)
        return "".join(s)
    if kind < 0.85:  # a random answer of the right kind
        n = max(1, len(answer.replace(" ", "")) // (2 if task == "repeat" else 1))
        w = "".join(rng.choice(chars) for _ in range(n))
        return f"{w} {w}" if task == "repeat" else w
    return rng.choice(["", str(rng.randint(0, 99)), answer.swapcase(), answer[: len(answer) // 2] + "?"])


def response_with_score(ex: Example, score: int, rng: random.Random, tries: int = 200) -> str | None:
    """A response that ``grade`` scores exactly ``score`` (None if none was found)."""
    if score == 5:
        return ex.answer
    for _ in range(tries):
        r = _mutate(ex.task, ex.answer, rng)
        if grade(ex.task, ex.answer, r)[0] == score:
            return r
    return None
