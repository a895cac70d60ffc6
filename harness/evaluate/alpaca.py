"""AlpacaEval-style win rate of the policy against reference outputs, and import
of published AlpacaEval results so the leaderboard can show them beside ours.

Two annotation protocols (``eval.alpaca_eval.annotator``):
- an alpaca_eval annotator config (``weighted_alpaca_eval_gpt4_turbo`` = AlpacaEval 2.0,
  the default for the hub set; ``alpaca_eval_gpt4`` = 1.0; ...): both outputs in one
  prompt, alpaca_eval's order randomisation and completion parsing, through alpaca_eval's
  own annotator (``harness.evaluate.annotators``) against the endpoint of the section's
  openai judge; ``annotate_alpaca_eval`` below;
- ``harness_rubric``: the section's judge scores each answer alone with the harness's
  rubric and the preference compares the two scores, with our position control
  (``annotate``; the tiny world's oracle, the default for other instruction files).
Each evaluation's ``metrics.json`` holds a ``protocol`` record (``protocol_record``).

Answers are greedy, capped at ``eval.alpaca_eval.max_new_tokens`` (default 2048, as
alpaca_eval's model configs; never ``generation.max_new_tokens``); ``alpaca_eval/n_cut``
counts the answers that reached the cap, and the cap is in the protocol record.

Conventions are AlpacaEval's: output_1 is the reference, output_2 the model,
``preference`` is in [1, 2] with 2 = the model wins and 1.5 = a draw. Every
statistic (win rate, standard error, wins, draws, discrete win rate, and the
length-controlled win rate when its data is present) comes from
``alpaca_eval.metrics``; ``avg_length`` is the one expression
``alpaca_eval.main.evaluate`` computes inline (mean characters of the model's
outputs, truncated to int), repeated here verbatim.

Why not ``alpaca_eval.main.evaluate`` end-to-end: its annotation goes through
its own annotator pipeline (prompt templates, completion parsers, and a cache
that fails under pandas 3), while our annotations come from the harness Judge
interface (local models, endpoints, the tiny world's oracle), with coverage
counted and position bias controlled here. The metric functions it applies
to annotations are the ones called below.

Coverage: an instruction whose judgment failed (an unparsable or over-long answer, or
a preference or log-probability that cannot be) keeps ``preference: null`` in
annotations.json; alpaca_eval drops it from its statistics (its ``n_total``
counts annotated rows). ``alpaca_eval/coverage`` = n_total / n_instructions,
and ``CoverageError`` is raised below ``min_coverage`` after the files are
written, so the failed run can be inspected. A failed annotation is never
reused: a rerun over the same annotations log asks again for exactly those
instructions (``_reusable``) and keeps every valid one. A judge call that got no answer at
all (transport errors) is not a failed judgment: that instruction is left out of
the annotations log and ``JudgeTransportError`` (a ``CoverageError``) stops the
evaluation before annotations.json is written; a rerun judges only those.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Sequence

from harness.config.annotator_configs import official_endpoint
from harness.config.eval_sections import AlpacaEvalSection
from harness.models.data import with_system
from harness.evaluate.alpaca_instructions import instructions_identity, section_instructions
from harness.evaluate.annotators import RUBRIC, AlpacaEvalAnnotator, AnnotatorTransportError, Endpoint, resolve_protocol
from harness.engines.generate import Prompt, Sampling, generate, request_seed
from harness.judges import CoverageError  # one error type for every coverage check
from harness.judges import policy_aside
from harness.judges.base import Judge, JudgeItem, checked, compare, preference
from harness.judges.parsing import is_error
from harness.judges.judging import JudgeTransportError
from harness.store.files import JsonlLog, atomic_write_json

from .alpaca_metrics import AE_SET_SIZE, LC_FILE, LC_REPO, METRICS, compute_metrics  # noqa: F401  (re-exported)

N_CUT = "alpaca_eval/n_cut"  # the model's answers that reached the cap (eval.alpaca_eval.max_new_tokens)


def _meta(row: dict) -> dict:
    """Extra fields of an instruction row, for rule-based judges (the tiny oracle)."""
    return {k: v for k, v in row.items() if k not in ("instruction", "output", "generator")}


def _preference(p) -> float | None:
    """A preference as alpaca_eval defines it (a finite number in [1, 2], or 0: its other
    encoding of a draw), or None: a value that cannot be is a failed judgment, never clipped."""
    ok = isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and (1.0 <= p <= 2.0 or p == 0)
    return float(p) if ok else None


def _reusable(log: JsonlLog | None, by_id: dict[str, dict], key: Callable[[dict], str]) -> dict[str, dict]:
    """The records of ``log`` to reuse: same inputs (``key``) and a valid preference. A failed
    annotation (preference None) is left out, so a rerun asks again for it."""
    return {pid: rec for pid, rec in (log.records.items() if log is not None else ())
            if pid in by_id and rec.get("key") == key(by_id[pid]) and _preference(rec.get("preference")) is not None}


def _checked(judge: Judge, prefs: list, n: int) -> list:
    if len(prefs) != n:
        raise ValueError(f"judge {judge.name!r} returned {len(prefs)} preferences for {n} pairs")
    return prefs


def _compare(judge: Judge, firsts: Sequence[JudgeItem], seconds: Sequence[JudgeItem]
             ) -> tuple[list[float | None], list[str | None]]:
    """Preferences (as ``judges.base.compare``) and, per pair, the judge's first transport
    error (None when it answered). A pointwise judge's verdicts are kept to tell "no answer
    was obtained" (retried on a rerun) from "the answer did not parse" (a failed judgment);
    a judge with a native ``compare`` reports its own failures as None preferences."""
    n = len(firsts)
    if getattr(judge, "compare", None) is not None:
        return _checked(judge, compare(judge, firsts, seconds), n), [None] * n
    verdicts = judge.score(list(firsts) + list(seconds))
    if len(verdicts) != 2 * n:
        raise ValueError(f"judge {judge.name!r} returned {len(verdicts)} verdicts for {2 * n} items")
    verdicts = [checked(v, judge.scale) for v in verdicts]  # a score that cannot be is a failure
    pairs = [(verdicts[i], verdicts[n + i]) for i in range(n)]
    errors = [next((r for v in pair for r in v.raw if is_error(r)), None) for pair in pairs]
    return [preference(a, b) for a, b in pairs], errors


def annotate(judge: Judge, rows: Sequence[dict], outputs: dict[str, str], position: str,
             seed_key: tuple, generator: str, log: JsonlLog | None = None,
             chunk: int = 32) -> list[dict]:
    """AlpacaEval-format annotations, reference = output_1, model = output_2.

    position "random": a per-instruction seeded coin decides which answer the judge
    sees first; a preference given with the model first is mapped back (p -> 3 - p).
    position "both": the judge sees both orders; preference = their mean, None
    unless both orders got a valid judgment. Records are appended to ``log`` per
    chunk and reused on a rerun only when their inputs (texts, judge) are identical and
    the preference is valid: a failed judgment is asked again.

    An instruction whose judge call got no answer (transport errors: timeouts, refused
    connections, 5xx after retries) is not annotated at all -- never written as a
    failed judgment -- and ``JudgeTransportError`` is raised once every other
    instruction is done, so a rerun asks the judge again for exactly those. An answer
    that does not parse is a judgment: ``preference`` None, kept and counted.
    """
    def key(row: dict) -> str:
        blob = json.dumps([row["instruction"], row["output"], outputs[row["id"]], judge.name, position,
                           list(seed_key)], default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    by_id = {r["id"]: r for r in rows}
    done = _reusable(log, by_id, key)
    todo = [r for r in rows if r["id"] not in done]
    missing: list[tuple[str, str]] = []  # (instruction id, transport error): not annotated
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        ref = [JudgeItem(r["id"], r["instruction"], r["output"], _meta(r)) for r in part]
        mod = [JudgeItem(r["id"], r["instruction"], outputs[r["id"]], _meta(r)) for r in part]
        if position == "both":
            fwd, fwd_err = _compare(judge, ref, mod)
            back, back_err = _compare(judge, mod, ref)
            prefs = [None if a is None or b is None else (a + (3.0 - b)) / 2 for a, b in zip(fwd, back)]
            raws = [[a, b] for a, b in zip(fwd, back)]
            errors = [a or b for a, b in zip(fwd_err, back_err)]
            placed = ["both"] * len(part)
        else:
            swap = [request_seed(*seed_key, "alpaca_eval_position", r["id"]) & 1 == 1 for r in part]
            firsts = [m if s else f for f, m, s in zip(ref, mod, swap)]
            seconds = [f if s else m for f, m, s in zip(ref, mod, swap)]
            got, errors = _compare(judge, firsts, seconds)
            prefs = [None if p is None else (3.0 - p if s else float(p)) for p, s in zip(got, swap)]
            raws = [[p] for p in got]
            placed = ["model_first" if s else "reference_first" for s in swap]
        records = []
        for r, p, raw, where, error in zip(part, prefs, raws, placed, errors):
            if error is not None:
                missing.append((r["id"], error))
                continue
            p = _preference(p)  # out-of-range judge output is a failure, never clipped
            records.append({
                "id": r["id"], "key": key(r), "instruction": r["instruction"], "dataset": r.get("dataset"),
                "output_1": r["output"], "generator_1": r.get("generator", "reference"),
                "output_2": outputs[r["id"]], "generator_2": generator,
                "annotator": judge.name, "preference": p, "position": where, "raw_preferences": raw})
        if log is not None:
            log.append(records)
        done.update((rec["id"], rec) for rec in records)
    if missing:
        raise JudgeTransportError(f"AlpacaEval annotation of {generator}", f"{len(missing)} of {len(rows)} instructions",
                                  missing)
    return [done[r["id"]] for r in rows]


def _ae_pair(row: dict, output: str, generator: str) -> tuple[dict, dict]:
    """(reference, model) rows of one instruction as ``alpaca_eval.main.evaluate`` reads
    them from a reference file and a model-outputs file."""
    extra = {"dataset": row["dataset"]} if row.get("dataset") is not None else {}
    return ({"instruction": row["instruction"], "output": row["output"],
             "generator": row.get("generator", "reference"), **extra},
            {"instruction": row["instruction"], "output": output, "generator": generator, **extra})


def annotate_alpaca_eval(annotator: AlpacaEvalAnnotator, rows: Sequence[dict], outputs: dict[str, str],
                         generator: str, log: JsonlLog | None = None, chunk: int = 32) -> list[dict]:
    """AlpacaEval annotations by alpaca_eval's own annotator, one instruction per call
    (``AlpacaEvalAnnotator.annotate``), up to the endpoint's concurrency at once. Records
    are alpaca_eval's rows (instruction, output_1 = reference, output_2 = model, generator_1/2,
    annotator, preference, preference_raw_completion, ...) plus ``id`` and ``key``; they are
    appended to ``log`` per chunk and reused when their inputs and the annotator's identity
    are unchanged and the preference is valid. A completion that does not parse (or whose
    preference or log-probabilities cannot be) is alpaca_eval's missing annotation:
    ``preference`` None, kept and counted, and asked again on a rerun. An instruction whose endpoint call got no answer
    is not annotated, and ``JudgeTransportError`` is raised once the others are done."""
    ident = annotator.identity()

    def key(row: dict) -> str:
        blob = json.dumps([row["instruction"], row["output"], row.get("generator"), outputs[row["id"]], generator,
                           ident], default=str, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    by_id = {r["id"]: r for r in rows}
    done = _reusable(log, by_id, key)
    todo = [r for r in rows if r["id"] not in done]
    missing: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, annotator.endpoint.concurrency)) as pool:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            futures = [pool.submit(annotator.annotate, *_ae_pair(r, outputs[r["id"]], generator)) for r in part]
            records = []
            for r, fut in zip(part, futures):
                try:
                    ann = fut.result()
                except AnnotatorTransportError as e:
                    missing.append((r["id"], str(e)))
                    continue
                records.append({"id": r["id"], "key": key(r), **ann, "preference": _preference(ann.get("preference"))})
            if log is not None:
                log.append(records)
            done.update((rec["id"], rec) for rec in records)
    if missing:
        raise JudgeTransportError(f"AlpacaEval annotation of {generator} by {annotator.name}",
                                  f"{len(missing)} of {len(rows)} instructions", missing)
    return [done[r["id"]] for r in rows]


def build_annotator(section: AlpacaEvalSection) -> AlpacaEvalAnnotator:
    """The section's alpaca_eval annotator, talking to the endpoint of its openai judge
    ([<section>.judge.openai]: base_url, model, api_key_env, timeout_s, max_retries,
    max_reply_bytes; the judge's batch_size = concurrent requests)."""
    name = resolve_protocol(section.annotator, section.instructions)
    if section.judge.name != "openai":
        raise ValueError(f"eval.alpaca_eval.annotator {name!r} needs an OpenAI-compatible endpoint: "
                         f"[<section>.judge] name = \"openai\" (got {section.judge.name!r})")
    o = section.judge.options
    return AlpacaEvalAnnotator(name, Endpoint(o.base_url, o.model, api_key_env=o.api_key_env, timeout_s=o.timeout_s,
                                              max_retries=o.max_retries, concurrency=section.judge.batch_size,
                                              max_reply_bytes=getattr(o, "max_reply_bytes", 1 << 20)))


def protocol_record(section: AlpacaEvalSection, annotations: Sequence[dict], metrics: dict, notes: dict,
                    judge: Judge | None = None, annotator: AlpacaEvalAnnotator | None = None,
                    max_new_tokens: int | None = None) -> dict:
    """How this evaluation's numbers were made (``metrics.json`` "protocol"). ``endpoint``: the
    judge's HTTP endpoint ({"base_url", "model"}; None for a judge that is not one, e.g. the
    oracle); ``max_new_tokens``: the cap on the model's answers (default: the section's).
    ``reference.hub``: the hub file's repo, revision, commit and sha256 (instructions = "alpaca_eval").
    ``cost.price_usd`` is alpaca_eval's price of the judge's tokens at OpenAI's own API only;
    at any other endpoint (a local server, whatever model name it serves) it is None."""
    if annotator is not None:
        usage = annotator.fn.usage
        endpoint = {"base_url": annotator.endpoint.base_url, "model": annotator.endpoint.model}
        prices = [a.get("preference_price_per_example") for a in annotations]
        price = sum(p for p in prices if isinstance(p, (int, float)) and math.isfinite(p)) \
            if official_endpoint(endpoint["base_url"]) else None
        how = {**annotator.protocol(), "position": "alpaca_eval (is_randomize_output_order, seeded by instruction)",
               "cost": {"calls": usage["calls"], "prompt_tokens": usage["prompt_tokens"],
                        "completion_tokens": usage["completion_tokens"], "price_usd": price}}
    else:
        tpl = getattr(judge, "template", None)
        name = getattr(judge, "name", "")
        base_url = getattr(judge, "base_url", None)
        endpoint = {"base_url": base_url, "model": getattr(judge, "model", None)} if isinstance(base_url, str) else None
        how = {"annotator": RUBRIC, "template_hash": hashlib.sha256(tpl.encode()).hexdigest() if isinstance(tpl, str)
               else None, "judge_model": name, "endpoint_kind": section.judge.name,
               "base_url": getattr(judge, "url", None), "position": section.position}
    lc = notes.get("length_controlled_data")
    return {**how, "endpoint": endpoint,
            "max_new_tokens": section.max_new_tokens if max_new_tokens is None else max_new_tokens,
            "reference": {"instructions": section.instructions, "reference": section.reference,
                          "generator": sorted({str(a.get("generator_1")) for a in annotations}),
                          **({"hub": hub} if (hub := instructions_identity(section)) else {})},
            "n": metrics["alpaca_eval/n_total"], "n_instructions": metrics["alpaca_eval/n_instructions"],
            "coverage": metrics["alpaca_eval/coverage"],
            "length_controlled": {"status": "computed", "df_gamed": {k: lc[k] for k in ("repo", "revision", "sha256")}}
            if lc else {"status": "unavailable", "reason": notes.get("length_controlled_winrate", "")},
            "alpaca_eval_version": version("alpaca-eval") if _installed("alpaca-eval") else None}


def run_alpaca_eval(model, tokenizer, section: AlpacaEvalSection, make_judge: Callable[[], Judge] | None,
                    out_dir: Path, *,
                    seed_key: tuple, generator: str, batch_size: int, max_new_tokens: int | None = None,
                    system_prompt: str = "", reference: dict[str, str] | None = None,
                    reference_name: str = "", annotator: AlpacaEvalAnnotator | None = None,
                    generate_fn: Callable = generate) -> dict[str, float | int | None]:
    """Greedy answers to the instructions, judged against the reference; see the module doc.
    ``reference`` ({instruction id: answer}) replaces the file's reference outputs; with
    ``section.reference == "iteration0"`` and no ``reference`` given, this model's own
    answers are the reference (iteration 0 of a head-to-head). ``make_judge()`` builds the
    judge that annotates under the harness_rubric protocol, called only once every answer is
    written, inside ``policy_aside`` (a judge that loads a model never sits beside the policy on
    the accelerator, and is freed before the policy returns); unused otherwise (None is fine).
    ``annotator``
    overrides the one built from the section (``build_annotator``); ``generate_fn``: the
    engine's generate (``harness.engines``) that writes the answers. ``max_new_tokens``
    caps the answers (default: ``section.max_new_tokens``); answers that reach it are
    counted in ``alpaca_eval/n_cut``, and the cap is in the protocol record."""
    out_dir = Path(out_dir)
    cap = section.max_new_tokens if max_new_tokens is None else max_new_tokens
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = section_instructions(section)
    system = with_system(system_prompt)
    prompts = [Prompt(r["id"], system + ({"role": "user", "content": r["instruction"]},)) for r in rows]
    gens = generate_fn(model, tokenizer, prompts, Sampling(temperature=0.0, max_new_tokens=cap),
                       seed_key=(*seed_key, "alpaca_eval"), batch_size=batch_size,
                       log=JsonlLog(out_dir / "generations.jsonl"), desc="alpaca_eval")
    outputs = {pid: rec["samples"][0]["text"] for pid, rec in gens.items()}
    if section.reference == "iteration0":
        own = reference is None
        reference = outputs if own else reference
        missing = [r["id"] for r in rows if r["id"] not in reference]
        if missing:
            raise ValueError(f"eval.alpaca_eval.reference: the iteration-0 answers lack {len(missing)} instructions "
                             f"(e.g. {missing[0]!r}); the instructions or limit changed since iteration 0")
        rows = [{**r, "output": reference[r["id"]], "generator": reference_name or generator} for r in rows]
    model_outputs = [{"instruction": r["instruction"], "output": outputs[r["id"]], "generator": generator,
                      "dataset": r.get("dataset")} for r in rows]
    atomic_write_json(out_dir / "model_outputs.json", model_outputs)
    log = JsonlLog(out_dir / "annotations.jsonl")

    def results(annotations: list[dict], judge: Judge | None, annotator: AlpacaEvalAnnotator | None):
        """annotations.json written; (metrics, notes, protocol record)."""
        atomic_write_json(out_dir / "annotations.json", annotations)
        metrics, info = compute_metrics(annotations, [m["output"] for m in model_outputs], len(rows))
        metrics[N_CUT] = sum(1 for r in rows if gens[r["id"]]["samples"][0].get("finish") == "length")
        return metrics, info, protocol_record(section, annotations, metrics, info, judge=judge, annotator=annotator,
                                              max_new_tokens=cap)

    if resolve_protocol(section.annotator, section.instructions) == RUBRIC:
        if make_judge is None:
            raise ValueError("eval.alpaca_eval: the harness_rubric protocol needs a judge")
        annotator = None
        with policy_aside(model, section.judge):
            judge = make_judge()  # after every answer: a judge model and the policy are never both on the GPU
            annotations = annotate(judge, rows, outputs, section.position, seed_key, generator, log=log,
                                   chunk=section.judge.batch_size)
            metrics, info, protocol = results(annotations, judge, None)
            who, position = judge.name, section.position
            del judge  # its last reference: policy_aside frees it before the policy returns
    else:
        annotator = annotator or build_annotator(section)
        annotations = annotate_alpaca_eval(annotator, rows, outputs, generator, log=log,
                                           chunk=max(32, annotator.endpoint.concurrency))
        who, position = annotator.name, "alpaca_eval"
        metrics, info, protocol = results(annotations, None, annotator)
    atomic_write_json(out_dir / "metrics.json", {"metrics": metrics, "notes": info, "judge": who,
                                                 "position": position, "generator": generator,
                                                 "protocol": protocol})
    if metrics["alpaca_eval/coverage"] < section.min_coverage:
        raise CoverageError(
            f"AlpacaEval: {metrics['alpaca_eval/n_total']}/{len(rows)} instructions got a valid judgment from "
            f"{'judge' if annotator is None else 'annotator'} {who!r} (coverage {metrics['alpaca_eval/coverage']:.3f} < "
            f"eval.alpaca_eval.min_coverage {section.min_coverage}); see {out_dir / 'annotations.json'}. Fix the "
            f"{'judge' if annotator is None else 'annotator endpoint'}, then rerun the same command: it asks again "
            f"for exactly the {len(rows) - metrics['alpaca_eval/n_total']} failed instructions and keeps the others")
    return metrics


# --- published systems ----------------------------------------------------------------------

def _installed(package: str) -> bool:
    try:
        version(package)
        return True
    except Exception:  # PackageNotFoundError: e.g. the harness run from a source checkout
        return False
