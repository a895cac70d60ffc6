"""The tiny world's data files: method inputs, judge training data and evaluation sets.

Every row is a pure function of (split examples, seed): the same build
parameters write the same bytes. JSONL rows are written with sorted keys.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from harness.store.files import write_jsonl
from harness.tiny import tasks
from harness.tiny.oracle import grade, response_with_score
from harness.tiny.tasks import NUMBER_TASKS, Example

LM_EVAL_TASKS = ("tiny_gen", "tiny_mc")


def judge_rows(examples: Sequence[Example], rng: random.Random,
               scores: Sequence[int] = (1, 2, 3, 4, 5)) -> list[dict]:
    """EFT rows: for each instruction, one candidate per score the oracle can reach,
    so that the judge sees the same instruction with better and worse answers."""
    rows = []
    for ex in examples:
        cands = [response_with_score(ex, s, rng) for s in scores]
        habit = tasks.habit(ex.prompt)
        if habit != ex.answer:  # the judge must learn to catch the habitual mistake too
            cands.append(habit)
        for cand in dict.fromkeys(cands):  # unique, in order
            if cand is None:
                continue
            s = grade(ex.task, ex.answer, cand)[0]
            prompt = tasks.judge_prompt(ex.prompt, cand)
            rows.append({"id": tasks.prompt_id(prompt), "prompt": prompt, "response": tasks.judge_response(s),
                         "instruction": ex.prompt, "candidate": cand, "score": s, "task": ex.task})
    return rows


def demonstration(ex: Example, rng: random.Random, accuracy: dict[str, float]) -> str:
    """What the world's demonstrators write: the correct answer with probability
    ``accuracy[task]``, otherwise the task's habitual mistake (``tasks.habit``)."""
    return ex.answer if rng.random() < accuracy[ex.task] else tasks.habit(ex.prompt)


def imperfect_reference(ex: Example, rng: random.Random, accuracy: float) -> str:
    """The correct answer with probability ``accuracy``, otherwise a near miss (score 3-4)."""
    if rng.random() < accuracy:
        return ex.answer
    for s in (4, 3):
        cand = response_with_score(ex, s, rng)
        if cand is not None:
            return cand
    return ex.answer


def distractors(ex: Example, rng: random.Random, k: int = 3) -> list[str]:
    """``k`` wrong answers of the same length and kind as the correct one."""
    a = ex.answer
    pool: list[str] = []
    if ex.task in NUMBER_TASKS:
        n = int(a)
        near = [n + d for d in (-1, 1, -2, 2, -10, 10, -3, 3, 11, -11)] + list(range(10)) + list(range(10, 100))
        pool = [str(x) for x in near if x >= 0 and len(str(x)) == len(a)]
    else:
        letters = sorted(set(a.replace(" ", "").lower())) or ["a"]
        upper = ex.task == "upper"
        for _ in range(60):
            s = list(a)
            i = rng.choice([j for j, c in enumerate(s) if c != " "])
            c = rng.choice("abcdefghijklmnopqrstuvwxyz" if rng.random() < 0.5 else "".join(letters))
            s[i] = c.upper() if upper else c
            pool.append("".join(s))
            word = [c for c in a if c != " "]
            rng.shuffle(word)
            w = "".join(word)
            pool.append(f"{w[: len(w) // 2]} {w[len(w) // 2:]}" if ex.task == "repeat" else w)
    seen, out = {a}, []
    for cand in pool:
        if cand not in seen and grade(ex.task, a, cand)[0] < 5:
            seen.add(cand)
            out.append(cand)
        if len(out) == k:
            break
    while len(out) < k:  # tiny answers: fall back to any distinct string of the same length
        cand = "".join(rng.choice("0123456789" if ex.task in NUMBER_TASKS else "xyz") for _ in a)
        if cand not in seen:
            seen.add(cand)
            out.append(cand)
    return out


def eval_rows(examples: Sequence[Example], rng: random.Random) -> list[dict]:
    rows = []
    for ex in examples:
        choices = distractors(ex, rng) + [ex.answer]
        rng.shuffle(choices)
        rows.append({**ex.to_dict(), "choices": choices, "label": choices.index(ex.answer)})
    return rows


def _yaml(task: str, data_file: Path, body: str) -> str:
    return (f"task: {task}\n"
            "dataset_path: json\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    test: {json.dumps(str(data_file))}\n"
            "test_split: test\n"
            'doc_to_text: "{{prompt}}"\n'
            + body)


def lm_eval_yamls(eval_file: Path) -> dict[str, str]:
    """lm-eval task files over ``eval_file`` (an absolute path)."""
    gen = _yaml("tiny_gen", eval_file, (
        "output_type: generate_until\n"
        'doc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n"
        '  until: ["\\n"]\n'  # lm-eval adds the eos token itself
        "  do_sample: false\n"
        "  max_gen_toks: 32\n"
        "metric_list:\n"
        "  - metric: exact_match\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        '    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]\n'
        "metadata:\n"
        "  version: 1.0\n"))
    mc = _yaml("tiny_mc", eval_file, (
        "output_type: multiple_choice\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "  - metric: acc_norm\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"))
    return {"tiny_gen": gen, "tiny_mc": mc}


def write_world_files(out: Path, final: Path, splits: dict[str, list[Example]], seed: int,
                      reference_accuracy: float, demo_accuracy: dict[str, float]) -> None:
    """All data files of a build into ``out``; paths inside files point at ``final``
    (the directory ``out`` will be renamed to).

    SPIN's SFT answers and DNO's teacher are correct (the "human" / stronger-teacher
    side of those methods). Self-Rewarding's seed instruction data (IFT) comes from the
    same demonstrators as the warm-up, habits included, so its M1 stage does not fix
    them by plain SFT: what the iterations gain is what the self-judge finds. The
    judge data (EFT) is graded by the oracle."""
    def qa(ex: Example, response: str) -> dict:
        return {**ex.to_dict(), "response": response}

    train, ift, eft, ev = splits["train"], splits["ift"], splits["eft"], splits["eval"]
    write_jsonl(out / "sft_train.jsonl", (qa(ex, ex.answer) for ex in train))
    write_jsonl(out / "prompts_train.jsonl", (ex.to_dict() for ex in train))
    write_jsonl(out / "teacher.jsonl", (qa(ex, ex.answer) for ex in train))
    demo_rng = random.Random(f"tiny:ift:{seed}")
    write_jsonl(out / "ift.jsonl", (qa(ex, demonstration(ex, demo_rng, demo_accuracy)) for ex in ift))
    write_jsonl(out / "eft.jsonl", judge_rows(eft, random.Random(f"tiny:eft:{seed}")))
    (out / "judge_template.txt").write_text(tasks.JUDGE_TEMPLATE)
    write_jsonl(out / "eval.jsonl", eval_rows(ev, random.Random(f"tiny:mc:{seed}")))
    write_jsonl(out / "eval_prompts.jsonl", (ex.to_dict() for ex in ev))
    ref_rng = random.Random(f"tiny:reference:{seed}")
    alpaca = [{"instruction": ex.prompt, "output": imperfect_reference(ex, ref_rng, reference_accuracy),
               "generator": "tiny_reference", "dataset": "tiny"} for ex in ev]
    (out / "alpaca_eval.json").write_text(json.dumps(alpaca, indent=1, sort_keys=True) + "\n")
    (out / "lm_eval").mkdir()
    for name, text in lm_eval_yamls(final / "eval.jsonl").items():
        (out / "lm_eval" / f"{name}.yaml").write_text(text)
