"""How a row's numbers were made, per evaluation, as the leaderboard tells them apart.

A protocol belongs to a scope: "alpaca_eval" (every ``alpaca_eval/*`` metric), "mt_bench"
(every ``mt_bench/*`` metric) or "lm_eval/<task>" (the ``lm_eval/<task>/*`` metrics of one
lm-eval task). A results row carries its records in ``row["protocol"]``:

- ``["alpaca_eval"]``: the ``protocol`` record of its evaluation's ``alpaca_eval/metrics.json``
  (harness.evaluate.alpaca.protocol_record; for an imported published system, the one
  ``write_published_run`` derives from its annotations file). Two rows' win rates are
  comparable only when these are the same (``identity``): the annotator (an alpaca_eval
  annotator config, or the harness rubric with its template), the judge model and the
  endpoint that served it (base URL and served model: a local server under a GPT-4 name
  is not GPT-4), whose answers are the reference and which generator wrote them, the
  instruction set, and the cap on the model's answers when it is below alpaca_eval's
  2048 (a cap at or above it, or none recorded, is "uncut"). The number of items judged
  is not part of it: it is the row's n and coverage (a published system with 803 of 805
  instructions annotated ranks with the others).
- ``["mt_bench"]``: the ``protocol`` record of ``mt_bench/metrics.json``
  (harness.evaluate.mt_bench.protocol_record; for imported FastChat judgments, the one
  ``import_judgments`` derives). Its identity: the judge model and endpoint, the judge prompts'
  and (when read) the reference answers' sha256, the questions asked ("all" or their ids), the
  answer cap when below FastChat's 1024, and the per-category temperatures; the label reads
  "MT-Bench (gpt-4 judge)" at OpenAI's API, "MT-Bench judged by <model> at <url>" elsewhere.
- ``["lm_eval"]["<task>"]``: the task's shots, chat template, few-shot as multi-turn,
  system instruction, lm-eval version, task version and backend (eval.backend, lm-eval's model
  class: "hf" or "vllm"; a record without one is "hf"); all of them are the identity.

A row with metrics of a scope but no record for it (written before rows carried one) has
the protocol ``UNKNOWN``; a row without metrics of a scope has none there.

``labels`` names each protocol of a scope for display, shortest first: "AlpacaEval 2.0
(weighted_alpaca_eval_gpt4_turbo vs gpt4_1106_preview)" (the official annotator at
OpenAI's API), "weighted_alpaca_eval_gpt4_turbo judged by gpt-4-1106-preview at
http://127.0.0.1:8000/v1 (vs gpt4_1106_preview)" (any other endpoint), "harness rubric:
oracle vs tiny_reference", "head-to-head vs iteration 0 (oracle)", "5-shot, chat template,
no system prompt, lm-eval 0.4.9, task version 3" (", vllm backend" added through vLLM); where two protocols of one table would
read the same, their labels name the reference generator and instruction set, and then
a short hash of the protocol. ``difference`` says in words what tells two records apart.
Not here: how the table splits its columns by protocol (harness.report.table).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping, Sequence

from harness.config.annotator_configs import AE2, ANSWER_TOKENS, HUB_SET, OPENAI_API, RUBRIC, official_endpoint

AE2_REFERENCE = "gpt4_1106_preview"  # AlpacaEval 2.0's reference answers (GPT-4 Turbo)
AE_SET_SIZE = 805  # harness.evaluate.alpaca's (the report modules do not import the evaluation code)
UNKNOWN = "unknown protocol"
PREFIX = "alpaca_eval/"  # the metrics an AlpacaEval protocol is about
AE_SCOPE = "alpaca_eval"
LM_PREFIX = "lm_eval/"  # "lm_eval/<task>/<metric>": the metrics of the scope "lm_eval/<task>"
MT_SCOPE, MT_PREFIX = "mt_bench", "mt_bench/"  # every "mt_bench/*" metric: the scope "mt_bench"
MT_ANSWER_TOKENS = 1024  # FastChat's cap on an MT-Bench answer (harness.evaluate.mt_bench.ANSWER_TOKENS)
PUBLISHED_KIND = "published annotations"  # endpoint_kind of an imported published system's record

# what an lm-eval task's protocol is (the record's fields, in the order labels name them); "backend" is
# lm-eval's model class (eval.backend: vLLM's numbers can differ slightly from transformers')
LM_FIELDS = ("num_fewshot", "apply_chat_template", "fewshot_as_multiturn", "system_instruction", "lm_eval_version",
             "task_version", "backend")
LM_BACKEND = "hf"  # the backend of a record without one: every lm-eval number before eval.backend existed
# the identity's fields in words, for ``difference``
_WORDS = {"annotator": "annotator", "judge_model": "judge model", "endpoint": "judge endpoint",
          "reference": "reference", "instructions": "instruction set", "generator": "reference generator",
          "max_new_tokens": "answer cap (max_new_tokens)", "template_hash": "rubric template",
          "num_fewshot": "num_fewshot", "apply_chat_template": "apply_chat_template",
          "fewshot_as_multiturn": "fewshot_as_multiturn", "system_instruction": "system instruction",
          "lm_eval_version": "lm-eval version", "task_version": "task version", "backend": "lm-eval backend",
          "prompts_sha256": "judge prompts",
          "reference_sha256": "reference answers", "questions": "questions", "temperatures": "temperatures"}


def scope_of(key: str) -> str | None:
    """The scope of a metric key ("alpaca_eval", "lm_eval/<task>"), None for any other."""
    if key.startswith(PREFIX):
        return AE_SCOPE
    if key.startswith(MT_PREFIX):
        return MT_SCOPE
    parts = key.split("/")
    if key.startswith(LM_PREFIX) and len(parts) >= 3 and parts[1]:
        return LM_PREFIX + parts[1]
    return None


def has_scope(row: dict, scope: str = AE_SCOPE) -> bool:
    return any(scope_of(k) == scope for k in row["metrics"])


def record(row: dict, scope: str = AE_SCOPE) -> dict | None:
    """The row's protocol record of ``scope`` (None: none recorded, or not an object)."""
    p = row.get("protocol") if isinstance(row.get("protocol"), dict) else {}
    if scope in (AE_SCOPE, MT_SCOPE):
        rec = p.get(scope)
    else:
        tasks = p.get("lm_eval")
        rec = tasks.get(scope[len(LM_PREFIX):]) if isinstance(tasks, dict) else None
    return rec if isinstance(rec, dict) and rec else None


def _generators(rec: dict) -> list[str]:
    g = (rec.get("reference") or {}).get("generator")
    return [str(x) for x in g] if isinstance(g, list) else [] if g is None else [str(g)]


def endpoint(rec: dict) -> dict | None:
    """The judge's endpoint {"base_url", "model"} (None: no HTTP judge, e.g. the oracle). Records
    written before they named it: a published system's is OpenAI's API, an annotator's its
    ``base_url`` and judge model, a rubric judge's its chat URL."""
    if "endpoint" in rec:
        ep = rec["endpoint"]
    elif rec.get("endpoint_kind") == PUBLISHED_KIND:
        ep = {"base_url": OPENAI_API, "model": rec.get("judge_model")}
    elif rec.get("base_url"):
        url = str(rec["base_url"]).removesuffix("/chat/completions")
        ep = {"base_url": url, "model": rec.get("judge_model") if rec.get("annotator") != RUBRIC else None}
    else:
        ep = None
    if not isinstance(ep, dict) or not ep.get("base_url"):
        return None
    return {"base_url": str(ep["base_url"]).rstrip("/"), "model": ep.get("model")}


def answer_cap(rec: dict) -> int | None:
    """The cap on the model's answers when it cuts below alpaca_eval's own (None: uncut, or not recorded)."""
    cap = rec.get("max_new_tokens")
    return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap < ANSWER_TOKENS else None


def _key(rec: dict, scope: str) -> dict:
    """The fields that make two records of ``scope`` the same protocol."""
    if scope == MT_SCOPE:
        return _mt_key(rec)
    if scope != AE_SCOPE:
        return {**{f: rec.get(f) for f in LM_FIELDS}, "backend": rec.get("backend") or LM_BACKEND}
    ref = rec.get("reference") or {}
    key = {"annotator": rec.get("annotator"), "judge_model": rec.get("judge_model"), "endpoint": endpoint(rec),
           "reference": ref.get("reference"), "instructions": ref.get("instructions"),
           "generator": _generators(rec), "max_new_tokens": answer_cap(rec)}
    if rec.get("annotator") == RUBRIC:  # the rubric's prompt is the judge's template
        key["template_hash"] = rec.get("template_hash")
    return key


def mt_answer_cap(rec: dict) -> int | None:
    """The cap on an MT-Bench answer when it cuts below FastChat's 1024 (None: FastChat's or above,
    or not recorded, as for published judgments)."""
    cap = rec.get("max_new_tokens")
    return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap < MT_ANSWER_TOKENS else None


def _mt_key(rec: dict) -> dict:
    """An MT-Bench protocol: the judge model and its endpoint, the judge prompts, the reference
    answers (when read), the questions asked, the answer cap below FastChat's and the temperatures."""
    return {"judge_model": rec.get("judge_model"), "endpoint": endpoint(rec),
            "prompts_sha256": rec.get("prompts_sha256"),
            "reference_sha256": rec.get("reference_sha256") if rec.get("reference_answers") else None,
            "questions": rec.get("questions"), "max_new_tokens": mt_answer_cap(rec),
            "temperatures": rec.get("temperatures")}


def _mt_label(rec: dict, detail: int) -> str:
    """"MT-Bench (gpt-4 judge)" at OpenAI's API, "MT-Bench judged by <model> at <url>" elsewhere;
    a question subset, a cap below FastChat's and (``detail``) the FastChat commit added."""
    judge = str(rec.get("judge_model") or "?")
    ep = endpoint(rec)
    text = f"MT-Bench ({judge} judge)" if ep is None or official_endpoint(ep["base_url"]) else \
        f"MT-Bench judged by {_judge(rec, judge)}"
    qs = rec.get("questions")
    if isinstance(qs, list):
        text += f", {len(qs)} of 80 questions"
    cap = mt_answer_cap(rec)
    if cap is not None:
        text += f", answers capped at {cap} tokens"
    if detail and rec.get("fastchat_commit"):
        text += f" (FastChat {rec['fastchat_commit']} prompts)"
    return text


def identity(rec: dict | None, scope: str = AE_SCOPE) -> str:
    """What makes two protocols the same, as one string (UNKNOWN for no record)."""
    return UNKNOWN if rec is None else json.dumps(_key(rec, scope), sort_keys=True, default=str)


def difference(a: dict | None, b: dict | None, scope: str = AE_SCOPE) -> str | None:
    """What tells two records of ``scope`` apart, in words ("judge model differs: gpt-4-1106-preview
    vs oracle"); None when they are the same protocol (two unrecorded ones included)."""
    if identity(a, scope) == identity(b, scope):
        return None
    if a is None or b is None:
        return f"protocol not recorded in {'A' if a is None else 'B'}"
    ka, kb = _key(a, scope), _key(b, scope)
    field = next(f for f in ka if ka[f] != kb.get(f))

    def text(v: Any) -> str:
        if isinstance(v, dict) and "base_url" in v:
            return f"{v.get('model')} at {v['base_url']}"
        return ", ".join(map(str, v)) if isinstance(v, list) else "none" if v is None else str(v)

    return f"{_WORDS.get(field, field)} differs: {text(ka[field])} vs {text(kb[field])}"


def _judge(rec: dict, name: str) -> str:
    """``name`` (the judge), with the endpoint serving it when that is not OpenAI's own API."""
    ep = endpoint(rec)
    if ep is None or official_endpoint(ep["base_url"]):
        return name
    return f"{ep.get('model') or name} at {ep['base_url']}"


def _short(text: str, most: int = 40) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"


def _lm_label(rec: dict) -> str:
    shots = rec.get("num_fewshot")
    parts = [f"{shots}-shot" if shots is not None else "shots ?",
             "chat template" if rec.get("apply_chat_template") else "no chat template"]
    if rec.get("fewshot_as_multiturn"):
        parts.append("few-shot as multi-turn")
    system = rec.get("system_instruction")
    parts.append(f"system prompt {_short(str(system))!r}" if system else "no system prompt")
    if rec.get("lm_eval_version"):
        parts.append(f"lm-eval {rec['lm_eval_version']}")
    if rec.get("task_version") is not None:
        parts.append(f"task version {rec['task_version']}")
    if (rec.get("backend") or LM_BACKEND) != LM_BACKEND:  # transformers' numbers keep their labels
        parts.append(f"{rec['backend']} backend")
    return ", ".join(parts)


def label(rec: dict | None, detail: int = 0, scope: str = AE_SCOPE) -> str:
    """A protocol's display name; ``detail`` 1 adds the reference generator and instruction
    set where the short name leaves them out (AlpacaEval)."""
    if rec is None:
        return UNKNOWN
    if scope == MT_SCOPE:
        return _mt_label(rec, detail)
    if scope != AE_SCOPE:
        return _lm_label(rec)
    ann = str(rec.get("annotator") or "?")
    ref = rec.get("reference") or {}
    judge = str(rec.get("judge_model") or rec.get("endpoint_kind") or "?")
    gens = ", ".join(_generators(rec)) or "?"
    instructions = ref.get("instructions")
    ep = endpoint(rec)
    official = ep is None or official_endpoint(ep["base_url"])
    if ref.get("reference") == "iteration0":
        who = _judge(rec, judge) if ann == RUBRIC or not official else ann
        text = f"head-to-head vs {gens if detail else 'iteration 0'} ({who})"
    elif ann == RUBRIC:
        text = f"harness rubric: {_judge(rec, judge)} vs {gens}"
    elif not official:  # never "AlpacaEval 2.0": a local server under a GPT-4 name is not GPT-4
        text = f"{ann} judged by {_judge(rec, judge)} (vs {gens})"
    else:
        name = ("AlpacaEval 2.0" if ann == AE2 and gens == AE2_REFERENCE else "AlpacaEval") \
            if instructions == HUB_SET else "alpaca_eval annotator"
        models = rec.get("config_model_name") or []
        text = f"{name} ({ann} vs {gens}" + (f", judged by {judge}" if models and judge not in models else "") + ")"
    cap = answer_cap(rec)
    if cap is not None:
        text += f", answers capped at {cap} tokens"
    if detail and instructions and instructions != HUB_SET:
        text += f" on {instructions}"
    return text


def labels(records: Sequence[dict | None], scope: str = AE_SCOPE) -> dict[str, str]:
    """{identity: label} for these protocols of ``scope``, every label distinct."""
    recs: dict[str, dict | None] = {}
    for r in records:
        recs.setdefault(identity(r, scope), r)
    for detail in (0, 1):
        out = {k: label(r, detail, scope) for k, r in recs.items()}
        if len(set(out.values())) == len(out):
            return out
    counts: dict[str, int] = {}
    for v in out.values():
        counts[v] = counts.get(v, 0) + 1
    return {k: v + f" #{hashlib.sha256(k.encode()).hexdigest()[:7]}" if counts[v] > 1 else v for k, v in out.items()}


def row_labels(rows: Sequence[dict], scope: str = AE_SCOPE) -> list[Any]:
    """Each row's protocol label of ``scope`` (None for a row without metrics of that scope)."""
    has = [has_scope(r, scope) for r in rows]
    recs = [record(r, scope) if h else None for r, h in zip(rows, has)]
    named = labels([rec for rec, h in zip(recs, has) if h], scope)
    return [named[identity(rec, scope)] if h else None for rec, h in zip(recs, has)]


def tag_protocols(labels_by_scope: Mapping[str, Iterable[Any]]) -> dict[str, dict[str, str]]:
    """{scope: {label: its tag "P1", "P2", ...}} for the scopes with more than one label
    (non-strings ignored), numbered over all of them in the given scope order, each scope's
    labels alphabetically: the tables' and the plots' one numbering."""
    out: dict[str, dict[str, str]] = {}
    n = 0
    for scope, values in labels_by_scope.items():
        found = sorted({v for v in values if isinstance(v, str)})
        if len(found) > 1:
            out[scope] = {label: f"P{n + i}" for i, label in enumerate(found, 1)}
            n += len(found)
    return out


def scopes(rows: Sequence[dict]) -> list[str]:
    """The scopes a table of these rows tells protocols apart in: "alpaca_eval" when a row has
    AlpacaEval metrics, then each lm-eval task (alphabetically) that some row recorded a
    protocol for (a task no row recorded has one, unknown, protocol: nothing to tell apart)."""
    out = [s for s in (AE_SCOPE, MT_SCOPE) if any(has_scope(r, s) for r in rows)]
    tasks = sorted({s for r in rows for s in map(scope_of, r["metrics"]) if s and s.startswith(LM_PREFIX)})
    return out + [s for s in tasks if any(record(r, s) is not None for r in rows if has_scope(r, s))]
