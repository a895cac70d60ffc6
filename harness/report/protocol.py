"""How a row's AlpacaEval numbers were made, as the leaderboard tells them apart.

A results row carries ``row["protocol"]["alpaca_eval"]``: the ``protocol`` record of its
evaluation's ``alpaca_eval/metrics.json`` (harness.evaluate.alpaca.protocol_record; for
an imported published system, the one ``write_published_run`` derives from its
annotations file). Two rows' win rates are comparable only when their protocols are the
same (``identity``): the annotator (an alpaca_eval annotator config, or the harness
rubric with its judge and template), the judge model, whose answers are the reference
(the instructions file's, or the run's own iteration 0) and which generator wrote them,
the instruction set and its size. A row with AlpacaEval metrics but no record (written
before rows carried one) has the protocol ``UNKNOWN``; a row without AlpacaEval metrics
has none.

``labels`` names each protocol for display, shortest first: "AlpacaEval 2.0
(weighted_alpaca_eval_gpt4_turbo vs gpt4_1106_preview)", "harness rubric: oracle vs
tiny_reference", "head-to-head vs iteration 0 (oracle)"; where two protocols of one table
would read the same, their labels name the reference generator and instruction set, and
then a short hash of the protocol. Not here: how the table splits its columns by
protocol (harness.report.table).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

from harness.annotator_configs import AE2, HUB_SET, RUBRIC

AE2_REFERENCE = "gpt4_1106_preview"  # AlpacaEval 2.0's reference answers (GPT-4 Turbo)
AE_SET_SIZE = 805  # harness.evaluate.alpaca's (the report modules do not import the evaluation code)
UNKNOWN = "unknown protocol"
PREFIX = "alpaca_eval/"  # the metrics a protocol is about


def has_alpaca_eval(row: dict) -> bool:
    return any(k.startswith(PREFIX) for k in row["metrics"])


def record(row: dict) -> dict | None:
    """The row's AlpacaEval protocol record (None: none recorded, or not an object)."""
    p = (row.get("protocol") or {}) if isinstance(row.get("protocol"), dict) else {}
    rec = p.get("alpaca_eval")
    return rec if isinstance(rec, dict) and rec else None


def _generators(rec: dict) -> list[str]:
    g = (rec.get("reference") or {}).get("generator")
    return [str(x) for x in g] if isinstance(g, list) else [] if g is None else [str(g)]


def identity(rec: dict | None) -> str:
    """What makes two protocols the same, as one string (UNKNOWN for no record)."""
    if rec is None:
        return UNKNOWN
    ref = rec.get("reference") or {}
    key = {"annotator": rec.get("annotator"), "judge_model": rec.get("judge_model"),
           "reference": ref.get("reference"), "instructions": ref.get("instructions"),
           "generator": _generators(rec), "n_instructions": rec.get("n_instructions")}
    if rec.get("annotator") == RUBRIC:  # the rubric's prompt is the judge's template
        key["template_hash"] = rec.get("template_hash")
    return json.dumps(key, sort_keys=True, default=str)


def label(rec: dict | None, detail: int = 0) -> str:
    """A protocol's display name; ``detail`` 1 adds the reference generator and instruction
    set where the short name leaves them out."""
    if rec is None:
        return UNKNOWN
    ann = str(rec.get("annotator") or "?")
    ref = rec.get("reference") or {}
    judge = rec.get("judge_model") or rec.get("endpoint_kind") or "?"
    gens = ", ".join(_generators(rec)) or "?"
    instructions = ref.get("instructions")
    n = rec.get("n_instructions")
    if ref.get("reference") == "iteration0":
        text = f"head-to-head vs {gens if detail else 'iteration 0'} ({judge if ann == RUBRIC else ann})"
    elif ann == RUBRIC:
        text = f"harness rubric: {judge} vs {gens}"
    else:
        name = ("AlpacaEval 2.0" if ann == AE2 and gens == AE2_REFERENCE else "AlpacaEval") \
            if instructions == HUB_SET else "alpaca_eval annotator"
        models = rec.get("config_model_name") or []
        text = f"{name} ({ann} vs {gens}" + (f", judged by {judge}" if models and judge not in models else "") + ")"
    if instructions == HUB_SET and isinstance(n, int) and n != AE_SET_SIZE:
        text += f", {n} instructions"
    if detail and instructions and instructions != HUB_SET:
        text += f" on {instructions}"
    return text


def labels(records: Sequence[dict | None]) -> dict[str, str]:
    """{identity: label} for these protocols, every label distinct."""
    recs: dict[str, dict | None] = {}
    for r in records:
        recs.setdefault(identity(r), r)
    for detail in (0, 1):
        out = {k: label(r, detail) for k, r in recs.items()}
        if len(set(out.values())) == len(out):
            return out
    counts: dict[str, int] = {}
    for v in out.values():
        counts[v] = counts.get(v, 0) + 1
    return {k: v + f" #{hashlib.sha256(k.encode()).hexdigest()[:7]}" if counts[v] > 1 else v for k, v in out.items()}


def row_labels(rows: Sequence[dict]) -> list[Any]:
    """Each row's protocol label (None for a row without AlpacaEval metrics)."""
    recs = [record(r) if has_alpaca_eval(r) else None for r in rows]
    named = labels([rec for rec, r in zip(recs, rows) if has_alpaca_eval(r)])
    return [named[identity(rec)] if has_alpaca_eval(r) else None for rec, r in zip(recs, rows)]
