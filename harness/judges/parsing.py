"""Judge prompt text in and out: rubric templates, and strict parsing of
LLM-as-a-judge answers that end in "Score: N".

A parse failure returns None and is counted by the caller (coverage); nothing is
ever guessed. The rules, each chosen so that a reader of the raw answer would
agree on the number:

- The answer must END with its score: the last "Score:" label, then an integer,
  then optionally "/<hi>", "out of <hi>" or "point(s)", then only trailing
  whitespace, "." / "!" and markdown emphasis (``*``, ``_``, backticks).
  "Score: 4 because ..." is a failure: text after the number may qualify or
  retract it.
- Label variants: any case, markdown around it ("**Score:** 4", "*Score*: 4",
  "Score: **4**", "## Score: 4"), a word before it ("Total score: 4"), no space
  after the colon ("Score:4"). A bare number without the label is a failure.
- Earlier "Score:" labels followed by a number must carry the same value
  (a judge restating its score is fine; "Score: 3 ... Score: 5" is ambiguous).
  Earlier labels followed by no number (an echoed "Score: <points>") are ignored.
- Integers only: the rubric adds whole points, so "4.5" means the judge did not
  follow it -> failure. An integral decimal ("4.0") is the integer 4.
- A denominator other than ``hi`` ("Score: 7/10" on a 1-5 scale) is another
  scale -> failure. Values outside [lo, hi] -> failure. Signs are read, so
  "-1" is out of range, never 1.

Transport-level failures (timeouts, HTTP errors, malformed replies) are recorded
in a verdict's ``raw`` with ``ERROR_PREFIX``, so caches can tell "the judge
answered something unparsable" (a judgment, kept) from "no answer was obtained"
(retried on the next run).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

from harness.judges.base import Verdict

ERROR_PREFIX = "[judge error] "

# "score" not glued to a preceding letter/digit ("subscore:" is not a label),
# markdown emphasis allowed between the word, the colon and the value.
_LABEL = re.compile(r"(?<![A-Za-z0-9])score[\s*_`]*:[ \t*_`]*", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_TAIL = re.compile(
    r"(?P<num>[-+]?\d+(?:\.\d+)?)"
    r"(?:[ \t]*(?:/|out[ \t]+of)[ \t]*(?P<den>\d+))?"
    r"(?:[ \t]+points?)?"
    r"[\s.!*_`]*\Z",
    re.IGNORECASE,
)


def is_error(raw: str) -> bool:
    """True for a raw entry that records a failure to obtain an answer at all."""
    return raw.startswith(ERROR_PREFIX)


def _as_int(token: str) -> int | None:
    value = float(token)
    return int(value) if value.is_integer() else None


def parse_score(text: str, lo: int = 1, hi: int = 5) -> int | None:
    """The single final integer score in ``text``, or None (a parse failure)."""
    if not isinstance(text, str):
        return None
    labels = list(_LABEL.finditer(text))
    if not labels:
        return None
    tail = _TAIL.match(text, labels[-1].end())
    if tail is None:
        return None  # the last label is not followed by a number that ends the answer
    if tail.group("den") is not None and int(tail.group("den")) != hi:
        return None
    score = _as_int(tail.group("num"))
    if score is None or not lo <= score <= hi:
        return None
    for label in labels[:-1]:
        m = _NUMBER.match(text, label.end())
        if m is not None and float(m.group()) != score:
            return None  # several different scores: ambiguous
    return score


def verdict_from_samples(raws: Sequence[str], lo: int = 1, hi: int = 5) -> Verdict:
    """One verdict from a judge's J raw answers: score = mean of the parsable
    samples, None when none parse (error entries never parse)."""
    scores = tuple(None if is_error(r) else parse_score(r, lo, hi) for r in raws)
    valid = [s for s in scores if s is not None]
    mean = math.fsum(valid) / len(valid) if valid else None
    return Verdict(score=mean, raw=tuple(raws), scores=scores)


# ---- templates -------------------------------------------------------------

BUILTIN_TEMPLATE = Path(__file__).with_name("rubric.txt")
_PLACEHOLDER = re.compile(r"\{(instruction|response)\}")


def load_template(ref: str = "", where: str = "judge.template") -> str:
    """Template text: "" = the built-in additive 5-point rubric; otherwise a file
    path or "tiny:<name>" (resolved by ``harness.sources.resolve_ref``).
    Raises ValueError naming ``where`` for a missing file or placeholder."""
    if not ref:
        path = BUILTIN_TEMPLATE
    else:
        from harness.sources import resolve_ref

        path = Path(resolve_ref(ref))
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{where}: cannot read judge template {str(path)!r}: {e.strerror}") from None
    found = set(_PLACEHOLDER.findall(text))
    missing = {"instruction", "response"} - found
    if missing:
        raise ValueError(f"{where}: judge template {str(path)!r} lacks placeholder(s) "
                         + ", ".join("{" + m + "}" for m in sorted(missing)))
    return text


def fill_template(template: str, instruction: str, response: str) -> str:
    """Substitute both placeholders in one pass. Not ``str.format``: templates may
    contain other braces, and a response containing "{instruction}" must stay as
    written rather than be substituted again. The template's surrounding
    whitespace (a file's final newline) is not part of the prompt."""
    values = {"instruction": instruction, "response": response}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template.strip())
