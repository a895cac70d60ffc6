"""MT-Bench's data and FastChat's judge protocol as FastChat writes them: the shipped questions,
GPT-4's reference answers and the judge prompts (``mt_bench_data/``, FastChat commit
``FASTCHAT_COMMIT``), which prompt a turn gets, the judge's messages and request, and the
rating parsed from a judgment. No model, no endpoint: answering and grading are
``harness.evaluate.mt_bench``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Sequence


DATA = Path(__file__).resolve().parent / "mt_bench_data"


QUESTIONS, REFERENCES, PROMPTS = DATA / "question.jsonl", DATA / "reference_answer" / "gpt-4.jsonl", \
    DATA / "judge_prompts.jsonl"


FASTCHAT_COMMIT = "0e6d3e4"


REFERENCE_MODEL = "gpt-4"  # whose reference answers the math, reasoning and coding prompts hold


NEED_REF_CATS = ("math", "reasoning", "coding")  # FastChat's NEED_REF_CATS (its arena-hard-200 is not MT-Bench's)


ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")  # FastChat's one_score_pattern


ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")  # FastChat's one_score_pattern_backup


JUDGE_TEMPERATURE, JUDGE_MAX_TOKENS = 0, 2048  # run_judge_single's chat_completion_openai arguments


INVALID = -1  # FastChat's rating of a judgment without one


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_questions(question_ids: Sequence[int] = (), limit: int = 0) -> list[dict]:
    """The shipped questions ({question_id, category, turns}) in file order: those of
    ``question_ids`` (all when empty), then the first ``limit`` (0 = all). An id MT-Bench does
    not have is a ValueError naming it."""
    rows = read_rows(QUESTIONS)
    if question_ids:
        known = {q["question_id"] for q in rows}
        unknown = [i for i in question_ids if i not in known]
        if unknown:
            raise ValueError(f"eval.mt_bench.question_ids: no MT-Bench question {unknown[0]} "
                             f"(ids are {min(known)}-{max(known)})")
        rows = [q for q in rows if q["question_id"] in set(question_ids)]
    return rows[:limit or None]


def load_references() -> dict[int, dict]:
    """GPT-4's reference answers by question id (FastChat's model_answer records)."""
    return {r["question_id"]: r for r in read_rows(REFERENCES)}


def load_judge_prompts() -> dict[str, dict]:
    """FastChat's judge prompts by name (its ``load_judge_prompts``)."""
    return {r["name"]: r for r in read_rows(PROMPTS)}


def prompt_name(category: str, turn: int) -> str:
    """The judge prompt FastChat's ``make_judge_single`` gives a turn of a question."""
    return ("single-math-v1" if category in NEED_REF_CATS else "single-v1") + ("-multi-turn" if turn == 2 else "")


def user_prompt(template: dict, question: dict, answers: Sequence[str], reference: dict | None, turn: int) -> str:
    """The judge's user message: ``run_judge_single``'s ``prompt_template.format(...)``.
    ``reference``: the reference answer record (reference-guided prompts), else None."""
    kwargs = {}
    if reference is not None:
        kwargs["ref_answer_1"] = reference["choices"][0]["turns"][0]
        if turn == 2:
            kwargs["ref_answer_2"] = reference["choices"][0]["turns"][1]
    if turn == 2:
        return template["prompt_template"].format(question_1=question["turns"][0], question_2=question["turns"][1],
                                                  answer_1=answers[0], answer_2=answers[1], **kwargs)
    return template["prompt_template"].format(question=question["turns"][0], answer=answers[0], **kwargs)


def judge_messages(template: dict, text: str) -> list[dict]:
    """The chat FastChat sends (its "chatgpt" conversation with the prompt's system message,
    ``to_openai_api_messages``): no system message when the prompt's is ""."""
    system = template["system_prompt"]
    return ([{"role": "system", "content": system}] if system != "" else []) + [{"role": "user", "content": text}]


def judge_body(model: str, messages: list[dict]) -> dict:
    """The request of FastChat's ``chat_completion_openai(model, conv, temperature=0, max_tokens=2048)``."""
    return {"model": model, "messages": messages, "n": 1, "temperature": JUDGE_TEMPERATURE,
            "max_tokens": JUDGE_MAX_TOKENS}


def parse_rating(judgment: str) -> int | float:
    """FastChat's rating of a judgment: ``[[x]]``, else ``[x]``, as a Python literal; -1 without one."""
    match = re.search(ONE_SCORE, judgment) or re.search(ONE_SCORE_BACKUP, judgment)
    return ast.literal_eval(match.groups()[0]) if match else INVALID


def valid(score) -> bool:
    """A rating that counts: a finite number other than FastChat's -1."""
    return isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score) \
        and score != INVALID
