"""The tiny world's rule-based grader (``harness.tiny.oracle.grade``) as a judge, and its
kind "oracle" (no options; grades 1-5). Not an LLM: it understands only the tiny world's
task prompts, and an item it cannot parse is a failed judgment."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from harness.judges.base import JudgeItem, Verdict
from harness.judges.kind import JudgeKind
from harness.config.registry import JUDGES
from harness.tiny import oracle as rules


class OracleJudge:
    """The Judge protocol over the tiny world's ``grade``: one deterministic sample per item."""

    name = "oracle"
    scale = (1.0, 5.0)

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        out = []
        for item in items:
            g = rules.grade_text(item.instruction, item.response)
            if g is None:
                out.append(Verdict(score=None, raw=("unparseable instruction",), scores=(None,)))
            else:
                s, reason = g
                out.append(Verdict(score=float(s), raw=(f"{reason}: {s}",), scores=(float(s),)))
        return out


def source_hash() -> str:
    """The oracle is code: its identity is the source of the tiny world's grading rules and
    task parser (harness/tiny/*.py)."""
    h = hashlib.sha256()
    for f in sorted(Path(rules.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


class Oracle(JudgeKind):
    name = OracleJudge.name

    def scale(self, options, where):
        return OracleJudge.scale

    def build(self, section, policy, seed_key):
        return OracleJudge(), {"oracle": f"{OracleJudge.__module__}.{OracleJudge.__qualname__}",
                               "source": source_hash()}


JUDGES.register(Oracle.name)(Oracle())
