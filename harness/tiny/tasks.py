"""Synthetic instruction tasks with answers that can be checked from the text alone.

Every prompt comes from one fixed template per task, so ``parse(prompt)``
recovers (task, answer) from the instruction text without any side data.
Payload words are random lowercase strings (never a template word), numbers are
random integers; ``difficulty`` sets word length and number size. ``habit(prompt)``
is each task's systematic wrong answer, which the warm-up data mixes in.

Splits never overlap: a prompt's split is fixed by a hash of its text (each
split owns a set of hash buckets), so two splits cannot share a prompt however
they are drawn, and within a split prompts are unique.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from dataclasses import asdict, dataclass
from pathlib import Path

# task -> instruction template; the answer is a function of the payload only
TEMPLATES: dict[str, str] = {
    "add": "What is {a} plus {b}?",
    "reverse": "Reverse the word {w}.",
    "sort": "Sort the letters of {w}.",
    "count": "How many times does the letter {c} appear in {w}?",
    "upper": "Write {w} in capital letters.",
    "repeat": "Repeat the word {w} twice.",
}
TASK_NAMES: tuple[str, ...] = tuple(TEMPLATES)
NUMBER_TASKS = frozenset({"add", "count"})

# a split owns the prompts whose text hashes into its buckets (of 16)
SPLIT_BUCKETS: dict[str, frozenset[int]] = {
    "eval": frozenset({0, 1}),
    "train": frozenset({2, 3, 4}),
    "ift": frozenset({5, 6}),
    "eft": frozenset({7, 8}),
    "warmup": frozenset(range(9, 16)),
}
SPLITS: tuple[str, ...] = tuple(SPLIT_BUCKETS)


@dataclass(frozen=True)
class Example:
    id: str        # "tiny-" + hash of the prompt: stable across builds and split sizes
    task: str
    prompt: str    # the instruction text
    answer: str    # the one correct response

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_id(prompt: str) -> str:
    return "tiny-" + hashlib.sha256(prompt.encode()).hexdigest()[:12]


def bucket(prompt: str) -> int:
    return int(hashlib.sha256(b"tiny-split:" + prompt.encode()).hexdigest()[:8], 16) % 16


def split_of(prompt: str) -> str:
    b = bucket(prompt)
    return next(name for name, owned in SPLIT_BUCKETS.items() if b in owned)


# --- answers -------------------------------------------------------------------

def _answer(task: str, p: dict) -> str:
    if task == "add":
        return str(int(p["a"]) + int(p["b"]))
    w = p.get("w", "")
    if task == "reverse":
        return w[::-1]
    if task == "sort":
        return "".join(sorted(w))
    if task == "count":
        return str(w.count(p["c"]))
    if task == "upper":
        return w.upper()
    if task == "repeat":
        return f"{w} {w}"
    raise KeyError(task)


def _no_carry_sum(a: str, b: str) -> str:
    n = max(len(a), len(b))
    digits = [(int(x) + int(y)) % 10 for x, y in zip(a.zfill(n), b.zfill(n))]
    return str(int("".join(map(str, digits))))


def _habit(task: str, p: dict) -> str:
    """The systematic mistake a sloppy demonstrator makes on ``task`` (see ``habit``)."""
    w = p.get("w", "")
    if task == "add":
        return _no_carry_sum(p["a"], p["b"])   # forgets to carry
    if task == "count":
        return str(len(w))                     # counts every letter
    if task in ("reverse", "sort", "upper", "repeat"):
        return w                               # copies the word unchanged (repeat: writes it once)
    raise KeyError(task)


def _template_regex(template: str) -> re.Pattern:
    fields = {"a": r"(?P<a>0|[1-9]\d*)", "b": r"(?P<b>0|[1-9]\d*)",
              "w": r"(?P<w>[a-z]+)", "c": r"(?P<c>[a-z])"}
    parts = re.split(r"(\{[abcw]\})", template)
    body = "".join(fields[p[1]] if re.fullmatch(r"\{[abcw]\}", p) else re.escape(p) for p in parts)
    return re.compile(body)


_PARSERS = {task: _template_regex(t) for task, t in TEMPLATES.items()}

# --- the judge task (EFT): the same world's text, judged on the oracle's 1-5 scale ---

JUDGE_TEMPLATE_PATH = Path(__file__).with_name("judge_template.txt")
JUDGE_TEMPLATE = JUDGE_TEMPLATE_PATH.read_text()
VERDICTS: dict[int, str] = {5: "Correct.", 4: "Almost right.", 3: "Partly right.", 2: "Wrong.", 1: "Invalid."}


def judge_prompt(instruction: str, response: str) -> str:
    return JUDGE_TEMPLATE.format(instruction=instruction, response=response).strip()


def judge_response(score: int) -> str:
    """What a judge trained on EFT data writes: a verdict, then "Score: N"."""
    return f"{VERDICTS[score]} Score: {score}"


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", text)))


# every fixed word of the world; payload words never equal one (keeps them char-level, see tokenizer.py)
TEMPLATE_WORDS: frozenset[str] = frozenset(
    set().union(*map(_words, TEMPLATES.values()), _words(JUDGE_TEMPLATE), *map(_words, VERDICTS.values()), {"Score"}))


def _match(prompt: str) -> tuple[str, dict] | None:
    """(task, payload fields) of the template the instruction text fits, or None."""
    text = prompt.strip()
    for task, rx in _PARSERS.items():
        m = rx.fullmatch(text)
        if m:
            return task, m.groupdict()
    return None


def parse(prompt: str) -> tuple[str, str] | None:
    """(task, answer) recovered from the instruction text, or None if it fits no template."""
    found = _match(prompt)
    return None if found is None else (found[0], _answer(*found))


def habit(prompt: str) -> str | None:
    """The habitual wrong answer to ``prompt``: carry-free sums, the word's length for a
    letter count, the word copied unchanged (reverse, sort, upper) or written once
    (repeat). It equals the correct answer for some prompts (no carry, a palindrome,
    a word already sorted). None when the prompt fits no template."""
    found = _match(prompt)
    return None if found is None else _habit(*found)


def check(prompt_or_example: str | Example, response: str) -> bool:
    """Exact match after stripping whitespace; an unparseable prompt is never correct."""
    if isinstance(prompt_or_example, Example):
        answer = prompt_or_example.answer
    else:
        parsed = parse(prompt_or_example)
        if parsed is None:
            return False
        answer = parsed[1]
    return response.strip() == answer


# --- generation -----------------------------------------------------------------

def word_length(difficulty: int) -> int:
    """Payload words have one length per difficulty. With a fixed length the word sits at a
    fixed distance from the end of each template, so a small model learns to copy by relative
    position; with lengths that vary it stays for hundreds of steps on a plateau where it
    copies nothing (measured on 2 cores: from ~700 steps instead of ~300)."""
    return difficulty + 2


def _word(rng: random.Random, difficulty: int, alphabet: str = string.ascii_lowercase) -> str:
    while True:
        w = "".join(rng.choice(alphabet) for _ in range(word_length(difficulty)))
        if w not in TEMPLATE_WORDS:
            return w


def _payload(task: str, rng: random.Random, difficulty: int) -> dict:
    if task == "add":
        top = 10 ** difficulty - 1
        return {"a": rng.randint(0, top), "b": rng.randint(0, top)}
    if task == "count":
        # a few-letter alphabet so that counts above one are common
        alphabet = "".join(rng.sample(string.ascii_lowercase, 3))
        w = _word(rng, difficulty + 1, alphabet)
        c = rng.choice(w) if rng.random() < 0.8 else rng.choice(string.ascii_lowercase)
        return {"w": w, "c": c}
    return {"w": _word(rng, difficulty)}


def make_example(task: str, rng: random.Random, difficulty: int = 2) -> Example:
    p = _payload(task, rng, difficulty)
    prompt = TEMPLATES[task].format(**p)
    return Example(prompt_id(prompt), task, prompt, _answer(task, {k: str(v) for k, v in p.items()}))


def make_split(name: str, n: int, seed: int = 0, difficulty: int = 2,
               tasks: tuple[str, ...] = TASK_NAMES) -> list[Example]:
    """``n`` unique examples of split ``name``, tasks balanced (round robin), shuffled.

    Deterministic in (name, n, seed, difficulty, tasks); a prefix property holds:
    the first k examples drawn for task t do not depend on n.
    """
    if name not in SPLIT_BUCKETS:
        raise ValueError(f"unknown split {name!r}; known: {', '.join(SPLITS)}")
    if difficulty < 1:
        raise ValueError("difficulty must be >= 1")
    unknown = set(tasks) - set(TASK_NAMES)
    if unknown or not tasks:
        raise ValueError(f"unknown tasks {sorted(unknown)}; known: {', '.join(TASK_NAMES)}")
    owned = SPLIT_BUCKETS[name]
    rngs = {t: random.Random(f"tiny:{name}:{t}:{seed}:{difficulty}") for t in tasks}
    seen: set[str] = set()
    out: list[Example] = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        for _ in range(10_000):
            ex = make_example(task, rngs[task], difficulty)
            if ex.prompt not in seen and bucket(ex.prompt) in owned:
                break
        else:
            raise ValueError(f"split {name!r}: cannot draw {n} unique {task!r} prompts at difficulty "
                             f"{difficulty}; raise the difficulty or lower n")
        seen.add(ex.prompt)
        out.append(ex)
    random.Random(f"tiny:{name}:shuffle:{seed}").shuffle(out)
    return out
