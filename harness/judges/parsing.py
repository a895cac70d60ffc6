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

Score range: a template declares the range its scores take, and a judge parses
with exactly that range. The declaration is a front-matter block at the very top
of the template file, stripped before the template is used:

    ---
    scale: 0-5
    ---
    You are grading ...

``scale: LO-HI`` holds two integers, LO < HI; no other key is known (an unknown
key is an error, not ignored). A template without the block is read on the 1-5
scale. Built-in templates, selected as ``template = "builtin:<name>"`` in [judge.<kind>]:

- ``additive5`` (the default, ``""``): Self-Rewarding's additive rubric -- start
  from 0 and add a point per criterion met -- so 0-5; a 0 is the worst answer,
  not a parse failure.
- ``dno6``: a 6-point absolute scale (1-6), the scale of the DNO paper's
  annotator; the wording is ours.

``judge_scale`` in ``harness.judges`` gives a configured judge's range without
loading a model, so methods know it before candidates are built.

Group judging (several candidates of one prompt side by side, as the DNO paper's
annotator does): a *group template* has the placeholders {instruction} and
{responses} (the candidates, numbered, each in ``<answer N>`` tags) and the same
front matter; built-ins ``additive5_group`` and ``dno6_group`` are the group forms
of the two built-in templates (``group_template_ref`` finds them). A group answer
must END with one line "Score N: <integer>" per candidate, N = 1..K; it is parsed
strictly by ``parse_group_scores``: every candidate exactly one valid score (a
restated line with the same value is fine), no number outside 1..K, nothing after
the last score line but whitespace/punctuation -- else the whole answer is a
failure for every candidate (counted, never guessed).

Transport-level failures (timeouts, HTTP errors, malformed replies) are recorded
in a verdict's ``raw`` with ``ERROR_PREFIX``, so caches can tell "the judge
answered something unparsable" (a judgment, kept) from "no answer was obtained"
(retried on the next run).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from harness.judges.base import Verdict
from harness.store.files import special_file

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


def verdict_from_samples(raws: Sequence[str], lo: int = 1, hi: int = 5,
                         truncated: Sequence[bool] = ()) -> Verdict:
    """One verdict from a judge's J raw answers: score = mean of the parsable
    samples, None when none parse (error entries never parse). ``truncated``: per
    sample, whether the answer was cut at the token limit (kept for the counts)."""
    scores = tuple(None if is_error(r) else parse_score(r, lo, hi) for r in raws)
    valid = [s for s in scores if s is not None]
    mean = math.fsum(valid) / len(valid) if valid else None
    return Verdict(score=mean, raw=tuple(raws), scores=scores, truncated=tuple(bool(t) for t in truncated))


# ---- templates -------------------------------------------------------------

BUILTIN_TEMPLATES: dict[str, Path] = {"additive5": Path(__file__).with_name("rubric.txt"),
                                      "dno6": Path(__file__).with_name("dno6.txt"),
                                      "additive5_group": Path(__file__).with_name("additive5_group.txt"),
                                      "dno6_group": Path(__file__).with_name("dno6_group.txt")}
BUILTIN_TEMPLATE = BUILTIN_TEMPLATES["additive5"]
BUILTIN_PREFIX = "builtin:"
DEFAULT_SCALE = (1, 5)   # a template without a scale declaration
_PLACEHOLDER = re.compile(r"\{(instruction|response)\}")
_GROUP_PLACEHOLDER = re.compile(r"\{(instruction|responses)\}")
_FRONT = re.compile(r"\A---[ \t]*\n(?P<body>.*?)^---[ \t]*\n", re.DOTALL | re.MULTILINE)
_SCALE = re.compile(r"\A(?P<lo>[-+]?\d+)[ \t]*(?:-|\.\.|to)[ \t]*(?P<hi>[-+]?\d+)\Z")


@dataclass(frozen=True)
class JudgeTemplate:
    """A judge prompt template without its front matter, and the score range it declares."""
    text: str
    lo: int = DEFAULT_SCALE[0]
    hi: int = DEFAULT_SCALE[1]
    source: str = ""

    @property
    def scale(self) -> tuple[float, float]:
        return float(self.lo), float(self.hi)


def template_path(ref: str = "", where: str = "judge.template") -> Path:
    """The file of a template reference: "" or "builtin:<name>" (the files next to this
    module), "tiny:<name>", or a path."""
    if not ref:
        return BUILTIN_TEMPLATE
    if ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_TEMPLATES:
            raise ValueError(f"{where}: unknown built-in judge template {ref!r}; known: "
                             + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_TEMPLATES))
        return BUILTIN_TEMPLATES[name]
    from harness.models.sources import resolve_ref

    return Path(resolve_ref(ref))


def split_front_matter(text: str, where: str = "judge.template") -> tuple[dict, str]:
    """({key: value}, body) of a template; ({}, text) when it has no front matter."""
    m = _FRONT.match(text)
    if m is None:
        return {}, text
    meta = {}
    for line in m.group("body").splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"{where}: front-matter line {line!r} is not 'key: value'")
        meta[key.strip()] = value.strip()
    return meta, text[m.end():]


def load_judge_template(ref: str = "", where: str = "judge.template", *, group: bool = False) -> JudgeTemplate:
    """The template of ``ref`` (see ``template_path``) with its declared score range.
    Raises ValueError naming ``where`` for a missing file, a missing placeholder or a
    bad declaration. ``group``: a group template ({instruction} and {responses})."""
    path = template_path(ref, where)
    kind = special_file(path)
    if kind:  # never opened: a FIFO or a device would hang the read
        raise ValueError(f"{where}: judge template {str(path)!r} is {kind}, not a regular file")
    try:
        raw = path.read_text()
    except OSError as e:
        raise ValueError(f"{where}: cannot read judge template {str(path)!r}: {e.strerror}") from None
    meta, text = split_front_matter(raw, where)
    unknown = sorted(set(meta) - {"scale"})
    if unknown:
        raise ValueError(f"{where}: judge template {str(path)!r} has unknown front-matter key(s) "
                         f"{', '.join(map(repr, unknown))}; known: 'scale'")
    lo, hi = DEFAULT_SCALE
    if "scale" in meta:
        m = _SCALE.match(meta["scale"])
        if m is None or int(m.group("lo")) >= int(m.group("hi")):
            raise ValueError(f"{where}: judge template {str(path)!r}: scale {meta['scale']!r} is not "
                             "'LO-HI' with integers LO < HI (e.g. 'scale: 0-5')")
        lo, hi = int(m.group("lo")), int(m.group("hi"))
    found = set((_GROUP_PLACEHOLDER if group else _PLACEHOLDER).findall(text))
    missing = {"instruction", "responses" if group else "response"} - found
    if missing:
        raise ValueError(f"{where}: judge template {str(path)!r} lacks placeholder(s) "
                         + ", ".join("{" + m + "}" for m in sorted(missing)))
    return JudgeTemplate(text, lo, hi, str(path))


def load_template(ref: str = "", where: str = "judge.template") -> str:
    """The text of ``load_judge_template`` (front matter stripped)."""
    return load_judge_template(ref, where).text


def fill_template(template: str, instruction: str, response: str) -> str:
    """Substitute both placeholders in one pass. Not ``str.format``: templates may
    contain other braces, and a response containing "{instruction}" must stay as
    written rather than be substituted again. The template's surrounding
    whitespace (a file's final newline) is not part of the prompt."""
    values = {"instruction": instruction, "response": response}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template.strip())


# ---- group judging -------------------------------------------------------------

def group_template_ref(template_ref: str, group_ref: str = "") -> str:
    """The group template to use: ``group_ref`` when given, else the group form of a
    built-in pointwise template ("" / additive5 -> additive5_group, dno6 -> dno6_group);
    a pointwise template from a file has none (ValueError: give one)."""
    if group_ref:
        return group_ref
    name = template_ref[len(BUILTIN_PREFIX):] if template_ref.startswith(BUILTIN_PREFIX) else template_ref
    name = name or "additive5"
    if f"{name}_group" in BUILTIN_TEMPLATES:
        return f"{BUILTIN_PREFIX}{name}_group"
    raise ValueError(f"the judge template {template_ref!r} has no built-in group form; set group_template "
                     "to a file with {instruction} and {responses}")


def fill_group_template(template: str, instruction: str, responses: Sequence[str]) -> str:
    """A group template with the candidates numbered 1..K in ``<answer N>`` tags."""
    block = "\n\n".join(f"<answer {i}>\n{r}\n</answer {i}>" for i, r in enumerate(responses, 1))
    values = {"instruction": instruction, "responses": block}
    return _GROUP_PLACEHOLDER.sub(lambda m: values[m.group(1)], template.strip())


_GROUP_LINE = re.compile(
    r"^[ \t#>*_`-]*score[ \t]+(?P<idx>\d+)[ \t*_`]*:[ \t*_`]*(?P<num>[-+]?\d+(?:\.\d+)?)"
    r"(?:[ \t]*(?:/|out[ \t]+of)[ \t]*(?P<den>\d+))?[ \t.!*_`]*$",
    re.IGNORECASE | re.MULTILINE)


def parse_group_scores(text: str, k: int, lo: int = 1, hi: int = 5) -> tuple[int, ...] | None:
    """The K scores of a group answer (see the module doc), or None: the group failed."""
    if not isinstance(text, str) or k < 1:
        return None
    lines = list(_GROUP_LINE.finditer(text))
    if not lines or text[lines[-1].end():].strip(" \t\n.!*_`"):
        return None  # no score lines, or text after the last one
    found: dict[int, int] = {}
    for m in lines:
        idx = int(m.group("idx"))
        if not 1 <= idx <= k:
            return None
        if m.group("den") is not None and int(m.group("den")) != hi:
            return None
        score = _as_int(m.group("num"))
        if score is None or not lo <= score <= hi:
            return None
        if found.setdefault(idx, score) != score:
            return None  # two different scores for one candidate: ambiguous
    if len(found) != k:
        return None
    return tuple(found[i] for i in range(1, k + 1))


def group_verdicts(raws: Sequence[str], k: int, lo: int, hi: int, truncated: Sequence[bool] = ()) -> list[Verdict]:
    """One verdict per candidate from a judge's J raw group answers: candidate i's score is
    the mean of its scores over the answers that parse (a failed answer fails every
    candidate); every verdict carries all the raw answers."""
    parsed = [None if is_error(r) else parse_group_scores(r, k, lo, hi) for r in raws]
    out = []
    for i in range(k):
        scores = tuple(None if p is None else p[i] for p in parsed)
        valid = [s for s in scores if s is not None]
        out.append(Verdict(score=math.fsum(valid) / len(valid) if valid else None, raw=tuple(raws),
                           scores=scores, truncated=tuple(bool(t) for t in truncated)))
    return out
