"""MT-Bench by FastChat's protocol (lm-sys/FastChat, fastchat/llm_judge, commit 0e6d3e4):
80 two-turn questions, each turn graded 1-10 by an LLM judge.

The data ships with the harness (``mt_bench_data/``: the questions, GPT-4's reference answers,
FastChat's judge prompts; see its SOURCE.txt), so MT-Bench runs offline against any
OpenAI-compatible judge endpoint ([eval.mt_bench.judge.openai]).

What is FastChat's, reproduced here line for line (``user_prompt``, ``judge_messages``,
``judge_body``, ``parse_rating``; the FastChat tier, tests/test_mt_bench_fastchat.py, runs FastChat's
own ``gen_judgment.py`` against the same endpoint on the same answers and finds the same requests,
judgments and ratings: ``harness.evaluate.crosscheck.fastchat_itself``):
- answers turn by turn, the second turn seeing the first (stripped) answer, at the per-category
  temperature of FastChat's ``temperature_config`` and at most ``max_new_tokens`` (1024) per turn;
- turn 1 graded with ``single-v1``, turn 2 with ``single-v1-multi-turn`` (both turns in the prompt);
  math, reasoning and coding (FastChat's ``NEED_REF_CATS``) with ``single-math-v1`` and
  ``single-math-v1-multi-turn``, filled with GPT-4's reference answers; the prompt's
  ``system_prompt`` as the system message (none when it is ""), the filled template as the user
  message; the request body of FastChat's ``chat_completion_openai`` (model, messages, n = 1,
  temperature 0, max_tokens 2048);
- the rating: the first ``[[x]]`` (``one_score_pattern``), else the first ``[x]``
  (``one_score_pattern_backup``), read with ``ast.literal_eval``; none found = -1 (invalid);
- score = the mean of the valid ratings over all turns; turn 1 / turn 2 / per-category means
  likewise (FastChat's show_result drops rating -1 before averaging).

Why not FastChat's module itself: ``fastchat.llm_judge.common`` imports ``anthropic`` and the
pre-1.0 ``openai`` API at the top, and ``fastchat.model.model_adapter`` (torch, psutil and the
model adapters) behind it; its ``chat_completion_openai`` calls ``openai.ChatCompletion``, which
openai >= 1 (the harness's environment, through alpaca_eval) removed. The code it would run
here is a few lines of prompt building and parsing, reproduced above.

Where the harness differs (failure behaviour, as the AlpacaEval stage): a judge call that got no
answer after the client's retries (timeouts, refused connections, 5xx, a malformed reply) is not
a judgment -- FastChat stores "$ERROR$" and rating -1 -- but is left out of the log and
``JudgeTransportError`` stops the evaluation once every other turn is done; a rerun asks only
those. An invalid rating (-1) is kept and counted (``mt_bench/n_invalid``) and asked again on a
rerun; valid judgments are reused while their prompt, judge model and endpoint are unchanged.
The model's answers use its own chat template (and ``data.system_prompt``), not FastChat's
conversation templates; the template's sha256 is in the protocol record.

Files under the evaluation's ``mt_bench/``: turn_1.jsonl / turn_2.jsonl (generation logs,
resumable per question), answers.jsonl (FastChat's model_answer format), judgments.jsonl
(the judge log), judgments.json (the judgments used, FastChat's model_judgment fields) and
metrics.json (metrics and the ``protocol`` record).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Sequence

from harness.store import cost
from harness.config.annotator_configs import OPENAI_API
from harness.config.eval_sections import MT_BENCH_TEMPERATURES, MtBenchSection
from harness.models.data import with_system
from harness.engines.generate import Prompt, Sampling, generate, is_cut
from harness.judges import CoverageError
from harness.judges.http import JudgeRequestError, OpenAIJudge
from harness.judges.parsing import ERROR_PREFIX
from harness.judges.judging import JudgeTransportError
from harness.store.files import JsonlLog, atomic_write_json, write_jsonl
from harness.evaluate.mt_bench_prompts import (FASTCHAT_COMMIT, JUDGE_MAX_TOKENS, JUDGE_TEMPERATURE, NEED_REF_CATS,
                                               PROMPTS, QUESTIONS, REFERENCE_MODEL, REFERENCES, file_sha256, judge_body,
                                               judge_messages, load_judge_prompts, load_questions, load_references,
                                               parse_rating, prompt_name, read_rows, user_prompt, valid)
from harness.evaluate.mt_bench_prompts import INVALID  # noqa: F401  (tests reach it through this module)

ANSWER_TOKENS = 1024  # FastChat's gen_model_answer --max-new-token default
N_QUESTIONS = 80
PREFIX = "mt_bench/"
SCORE, TURN_1, TURN_2 = "mt_bench/score", "mt_bench/turn_1", "mt_bench/turn_2"
N_INVALID, N_CUT = "mt_bench/n_invalid", "mt_bench/n_cut"


def temperatures(section: MtBenchSection) -> dict[str, float]:
    """Per category: the section's temperature, FastChat's where it names none."""
    return {**MT_BENCH_TEMPERATURES, **section.temperatures}


# ---- answers ---------------------------------------------------------------------------------

def generate_answers(model, tokenizer, questions: Sequence[dict], section: MtBenchSection, out_dir: Path, *,
                     seed_key: tuple, batch_size: int, system_prompt: str = "",
                     generate_fn: Callable = generate) -> dict[int, list[dict]]:
    """{question id: [turn 1's sample, turn 2's sample]} (samples as ``generate`` returns them).
    Turn 1 for every question, then turn 2 with the first (stripped) answer in its chat, each
    category at its temperature (one ``generate_fn`` call per temperature and turn, seeds from
    ``seed_key``, the turn and the question id). Each turn's log (turn_<n>.jsonl, keyed by
    question id) is reused on a rerun, so an interrupted evaluation resumes per question."""
    temps = temperatures(section)
    system = with_system(system_prompt)
    samples: dict[int, list[dict]] = {q["question_id"]: [] for q in questions}
    for turn in (1, 2):
        log = JsonlLog(out_dir / f"turn_{turn}.jsonl")
        for temp in sorted({temps[q["category"]] for q in questions}):
            group = [q for q in questions if temps[q["category"]] == temp]
            prompts = []
            for q in group:
                chat = [{"role": "user", "content": q["turns"][0]}]
                if turn == 2:
                    chat += [{"role": "assistant", "content": samples[q["question_id"]][0]["text"].strip()},
                             {"role": "user", "content": q["turns"][1]}]
                prompts.append(Prompt(str(q["question_id"]), system + tuple(chat)))
            sampling = Sampling(temperature=temp, max_new_tokens=section.max_new_tokens)
            got = generate_fn(model, tokenizer, prompts, sampling,
                              seed_key=(*seed_key, "mt_bench", turn), batch_size=batch_size, log=log,
                              desc=f"mt_bench turn {turn}")
            for q in group:
                samples[q["question_id"]].append(got[str(q["question_id"])]["samples"][0])
    return samples


def answer_records(questions: Sequence[dict], samples: dict[int, list[dict]], model_id: str) -> list[dict]:
    """The answers in FastChat's model_answer format (what its gen_judgment reads); each turn
    stripped as FastChat's gen_model_answer stores it."""
    return [{"question_id": q["question_id"], "answer_id": f"{model_id}/{q['question_id']}", "model_id": model_id,
             "choices": [{"index": 0, "turns": [s["text"].strip() for s in samples[q["question_id"]]]}],
             "tstamp": 0.0} for q in questions]


# ---- judging ---------------------------------------------------------------------------------

class Grader:
    """FastChat's single-answer grading against one OpenAI-compatible endpoint, over the
    harness's HTTP client (``harness.judges.http.OpenAIJudge.request``: timeouts, retries with
    backoff, the key from an environment variable)."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 max_retries: int = 3, concurrency: int = 8, max_reply_bytes: int = 1 << 20, backoff_s: float = 1.0):
        self.client = OpenAIJudge(base_url, model, template="", lo=1, hi=10, api_key_env=api_key_env,
                                  timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s,
                                  max_new_tokens=JUDGE_MAX_TOKENS, max_reply_bytes=max_reply_bytes,
                                  name=f"mt_bench:{model}")
        self.base_url, self.model, self.concurrency = self.client.base_url, model, max(1, concurrency)
        self.prompts = load_judge_prompts()

    @classmethod
    def of(cls, section: MtBenchSection, backoff_s: float = 1.0) -> Grader:
        """The grader of a section's openai judge ([eval.mt_bench.judge.openai]; batch_size = concurrency)."""
        if section.judge.name != "openai":
            raise ValueError('eval.mt_bench.judge.name: MT-Bench needs an OpenAI-compatible endpoint '
                             f'(name = "openai"), got {section.judge.name!r}')
        o = section.judge.options
        return cls(o.base_url, o.model, api_key_env=o.api_key_env, timeout_s=o.timeout_s, max_retries=o.max_retries,
                   concurrency=section.judge.batch_size, max_reply_bytes=o.max_reply_bytes, backoff_s=backoff_s)

    def identity(self) -> dict:
        return {"base_url": self.base_url, "model": self.model, "prompts_sha256": file_sha256(PROMPTS)}

    def ask(self, messages: list[dict]) -> tuple[str | None, str]:
        """(the judgment text, "") or (None, why) when no answer was obtained (transport error or
        malformed reply). A reply over max_reply_bytes is an answer without a rating (its text
        says so). A non-retryable HTTP error raises ``JudgeRequestError``."""
        reply, why = self.client.request(judge_body(self.model, messages))
        if reply is not None:
            cost.add(judge_calls=1)  # an answered call (its tokens were counted by the client)
        if reply is None:
            return (None, why) if why.startswith(ERROR_PREFIX) else (why, "")
        try:
            content = json.loads(reply)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None, f"{ERROR_PREFIX}malformed reply: {reply[:2000]}"
        if not isinstance(content, str):
            return None, f"{ERROR_PREFIX}malformed reply (content is not text): {reply[:2000]}"
        return content, ""


def grade(grader: Grader, questions: Sequence[dict], answers: dict[int, list[str]], model_id: str,
          log: JsonlLog | None = None) -> list[dict]:
    """Both turns of every question judged (records in question order, turn 1 first), with
    FastChat's model_judgment fields (question_id, model, judge = [judge model, prompt name],
    user_prompt, judgment, score, turn) plus ``id`` ("<question id>/turn_<n>"), ``category`` and
    ``key``. Valid records of ``log`` with the same key are reused; see the module doc for
    invalid ratings and transport errors."""
    refs = load_references()
    ident = grader.identity()
    jobs = []
    for q in questions:
        qid = q["question_id"]
        for turn in (1, 2):
            name = prompt_name(q["category"], turn)
            template = grader.prompts[name]
            ref = refs.get(qid) if q["category"] in NEED_REF_CATS else None
            if q["category"] in NEED_REF_CATS and ref is None:
                raise ValueError(f"MT-Bench question {qid} ({q['category']}) has no reference answer")
            text = user_prompt(template, q, answers[qid], ref, turn)
            key = hashlib.sha256(json.dumps([text, name, ident], sort_keys=True).encode()).hexdigest()[:16]
            jobs.append({"id": f"{qid}/turn_{turn}", "question_id": qid, "turn": turn, "category": q["category"],
                         "name": name, "template": template, "text": text, "key": key})
    keys = {j["id"]: j["key"] for j in jobs}
    done = {rid: rec for rid, rec in (log.records.items() if log is not None else ())
            if rid in keys and rec.get("key") == keys[rid] and valid(rec.get("score"))}
    todo = [j for j in jobs if j["id"] not in done]
    missing: list[tuple[str, str]] = []
    fatal: JudgeRequestError | None = None
    with ThreadPoolExecutor(max_workers=grader.concurrency) as pool:
        futures = {pool.submit(grader.ask, judge_messages(j["template"], j["text"])): j for j in todo}
        for fut in as_completed(futures):  # each judgment is logged as it comes: a killed run keeps them
            j = futures[fut]
            try:
                judgment, why = fut.result()
            except JudgeRequestError as e:  # the same for every request (a bad key, an unknown model)
                fatal = fatal or e
                for other in futures:
                    other.cancel()
                continue
            except CancelledError:
                continue
            if judgment is None:
                missing.append((j["id"], why))
                continue
            rec = {"id": j["id"], "key": j["key"], "question_id": j["question_id"], "model": model_id,
                   "judge": [grader.model, j["name"]], "user_prompt": j["text"], "judgment": judgment,
                   "score": parse_rating(judgment), "turn": j["turn"], "category": j["category"],
                   "tstamp": time.time()}
            if log is not None:
                log.append([rec])
            done[rec["id"]] = rec
    if fatal is not None:
        raise fatal
    if missing:
        raise JudgeTransportError(f"MT-Bench judging of {model_id}", f"{len(missing)} of {len(jobs)} turns", missing)
    return [done[j["id"]] for j in jobs]


# ---- metrics and protocol --------------------------------------------------------------------

def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def compute_metrics(judgments: Sequence[dict]) -> dict[str, float | int | None]:
    """Flat metrics of judgments (FastChat's model_judgment records): the means of the valid
    ratings over all turns, per turn and per category (None where a part has none), and counts."""
    ok = [j for j in judgments if valid(j.get("score"))]
    out: dict[str, float | int | None] = {
        SCORE: _mean([j["score"] for j in ok]),
        TURN_1: _mean([j["score"] for j in ok if j.get("turn") == 1]),
        TURN_2: _mean([j["score"] for j in ok if j.get("turn") == 2])}
    for cat in MT_BENCH_TEMPERATURES:
        if any(j.get("category") == cat for j in judgments):
            out[f"{PREFIX}{cat}"] = _mean([j["score"] for j in ok if j.get("category") == cat])
    out.update({"mt_bench/n_turns": len(judgments), N_INVALID: len(judgments) - len(ok),
                "mt_bench/n_questions": len({j.get("question_id") for j in judgments}),
                "mt_bench/coverage": len(ok) / len(judgments) if judgments else None})
    return out


def data_identity(questions: Sequence[dict]) -> dict:
    """The shipped data's source and digests, and which questions were asked ("all" or the ids)."""
    ids = [q["question_id"] for q in questions]
    return {"fastchat_commit": FASTCHAT_COMMIT, "prompts_sha256": file_sha256(PROMPTS),
            "reference_sha256": file_sha256(REFERENCES), "questions_sha256": file_sha256(QUESTIONS),
            "questions": "all" if len(ids) == N_QUESTIONS else ids}


def protocol_record(section: MtBenchSection, grader: Grader, questions: Sequence[dict], metrics: dict,
                    tokenizer=None, system_prompt: str = "") -> dict:
    """How this evaluation's numbers were made (``metrics.json`` "protocol"; the table's scope
    "mt_bench", harness.report.protocol)."""
    template = getattr(tokenizer, "chat_template", None)
    uses_refs = any(q["category"] in NEED_REF_CATS for q in questions)
    return {"benchmark": "mt_bench", "judge_model": grader.model,
            "endpoint": {"base_url": grader.base_url, "model": grader.model},
            "endpoint_kind": "openai:chat/completions",
            "prompt_set": "FastChat single-v1, single-v1-multi-turn, single-math-v1, single-math-v1-multi-turn",
            **data_identity(questions),
            "reference_answers": REFERENCE_MODEL if uses_refs else None,
            "judge_temperature": JUDGE_TEMPERATURE, "judge_max_tokens": JUDGE_MAX_TOKENS,
            "max_new_tokens": section.max_new_tokens, "temperatures": temperatures(section),
            "chat_template": {"source": "model", "sha256": hashlib.sha256(template.encode()).hexdigest()
                              if isinstance(template, str) else None},
            "system_prompt": system_prompt or None,
            "n": metrics["mt_bench/n_turns"] - metrics[N_INVALID], "n_turns": metrics["mt_bench/n_turns"]}


def run_mt_bench(model, tokenizer, section: MtBenchSection, out_dir: Path, *, seed_key: tuple, model_id: str,
                 batch_size: int, system_prompt: str = "", grader: Grader | None = None,
                 generate_fn: Callable = generate) -> dict[str, float | int | None]:
    """Answers, judgments, metrics and the protocol record of one model (see the module doc).
    ``grader`` overrides the one built from the section (``Grader.of``). Raises
    ``JudgeTransportError`` when turns got no judge answer and ``CoverageError`` when fewer than
    ``section.min_coverage`` of the turns have a valid rating (after the files are written)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    questions = load_questions(section.question_ids, section.limit)
    samples = generate_answers(model, tokenizer, questions, section, out_dir, seed_key=seed_key,
                               batch_size=batch_size, system_prompt=system_prompt, generate_fn=generate_fn)
    answers = answer_records(questions, samples, model_id)
    write_jsonl(out_dir / "answers.jsonl", answers)
    grader = grader or Grader.of(section)
    judgments = grade(grader, questions, {a["question_id"]: a["choices"][0]["turns"] for a in answers}, model_id,
                      log=JsonlLog(out_dir / "judgments.jsonl"))
    atomic_write_json(out_dir / "judgments.json", judgments)
    metrics = compute_metrics(judgments)
    metrics[N_CUT] = sum(1 for turns in samples.values() for s in turns if is_cut(s))
    protocol = protocol_record(section, grader, questions, metrics, tokenizer, system_prompt)
    atomic_write_json(out_dir / "metrics.json", {"metrics": metrics, "model": model_id, "protocol": protocol})
    coverage = metrics["mt_bench/coverage"] or 0.0
    if coverage < section.min_coverage:
        raise CoverageError(f"MT-Bench: {protocol['n']}/{metrics['mt_bench/n_turns']} turns got a valid rating from "
                            f"{grader.model!r} (coverage {coverage:.3f} < eval.mt_bench.min_coverage "
                            f"{section.min_coverage}); see {out_dir / 'judgments.json'}. A rerun asks again for the "
                            "invalid ones and keeps the others")
    return metrics


# ---- published judgments ---------------------------------------------------------------------

def import_judgments(path: Path, model: str) -> tuple[dict, dict]:
    """(flat metrics, protocol record) of one model in a FastChat single-grading judgment file
    (``model_judgment/gpt-4_single.jsonl``: question_id, model, judge = [judge model, prompt
    name], score, turn, ...), its categories from the shipped questions. The judge is taken to
    have run at OpenAI's own API, on answers the harness did not cap (``max_new_tokens`` None)."""
    rows = [r for r in read_rows(Path(path)) if isinstance(r, dict)]
    models = sorted({str(r.get("model")) for r in rows})
    mine = [r for r in rows if r.get("model") == model]
    if not mine:
        raise ValueError(f"{path}: no judgments of model {model!r} (models: {', '.join(models) or 'none'})")
    cats = {q["question_id"]: q["category"] for q in load_questions()}
    seen: dict[tuple, dict] = {}
    for r in mine:
        if r.get("question_id") not in cats or r.get("turn") not in (1, 2):
            raise ValueError(f"{path}: a judgment of {model!r} names question {r.get('question_id')!r} turn "
                             f"{r.get('turn')!r}, not an MT-Bench turn")
        seen[(r["question_id"], r["turn"])] = {**r, "category": cats[r["question_id"]]}  # FastChat appends: last wins
    judgments = [seen[k] for k in sorted(seen)]
    metrics = compute_metrics(judgments)
    judges = sorted({str(r["judge"][0]) for r in judgments if isinstance(r.get("judge"), (list, tuple)) and r["judge"]})
    judge_model = judges[0] if len(judges) == 1 else "+".join(judges) or None
    qids = sorted({j["question_id"] for j in judgments})
    record = {"benchmark": "mt_bench", "judge_model": judge_model,
              "endpoint": {"base_url": OPENAI_API, "model": judge_model},
              "endpoint_kind": "published judgments", "prompt_set": "FastChat single-v1, single-v1-multi-turn, "
              "single-math-v1, single-math-v1-multi-turn", **data_identity([{"question_id": q} for q in qids]),
              "reference_answers": REFERENCE_MODEL, "judge_temperature": JUDGE_TEMPERATURE,
              "judge_max_tokens": JUDGE_MAX_TOKENS, "max_new_tokens": None, "temperatures": dict(MT_BENCH_TEMPERATURES),
              "n": metrics["mt_bench/n_turns"] - metrics[N_INVALID], "n_turns": metrics["mt_bench/n_turns"]}
    return metrics, record
