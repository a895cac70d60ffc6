"""alpaca_eval's own evaluation of the outputs the harness annotated, against the same endpoint:
the cross-check that an annotator run through the harness (``annotators``) is alpaca_eval's; and
FastChat's own MT-Bench judging (``fastchat_itself``), the cross-check of ``mt_bench``.

``alpaca_eval_itself`` runs ``alpaca_eval.main.evaluate`` with alpaca_eval's own openai
decoder, pointed at ``base_url`` by a client config (the file ``OPENAI_CLIENT_CONFIG_PATH``
would name), with no cache and the plain win rate (the LC win rate needs the hub's
df_gamed.csv). The tests and ``bench/bench_alpaca_judge.py`` compare its per-instruction
preferences and statistics with the harness's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence


def alpaca_eval_itself(annotator: str, rows: Sequence[dict], outputs: dict[str, str], generator: str,
                       base_url: str, api_key: str = "unused", num_procs: int | None = None):
    """(leaderboard row of ``generator``, annotations) of alpaca_eval's own evaluate: ``rows``
    are the instructions with their reference outputs (``load_instructions``), ``outputs``
    the model's answers by instruction id; ``num_procs``: alpaca_eval's concurrent requests
    (its default when None)."""
    import yaml
    from alpaca_eval.main import evaluate

    reference = [{"dataset": r["dataset"], "instruction": r["instruction"], "output": r["output"],
                  "generator": r["generator"]} for r in rows]
    model = [{"dataset": r["dataset"], "instruction": r["instruction"], "output": outputs[r["id"]],
              "generator": generator} for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        client_config = Path(tmp) / "openai_clients.yaml"
        client_config.write_text(yaml.safe_dump({"default": [{"api_key": api_key, "base_url": base_url}]}))
        leaderboard, annotations = evaluate(
            model_outputs=model, reference_outputs=reference, annotators_config=annotator, fn_metric="get_winrate",
            sort_by="win_rate", precomputed_leaderboard=None, caching_path=None, output_path=None,
            is_return_instead_of_print=True, is_cache_leaderboard=False,
            annotation_kwargs={"client_config_path": str(client_config),
                               **({"num_procs": num_procs} if num_procs else {})})
    return leaderboard.loc[generator], annotations


def fastchat_itself(python: str | Path, answers: Sequence[dict], base_url: str, model: str,
                    judge_model: str = "gpt-4", parallel: int = 1, timeout_s: float = 3600) -> list[dict]:
    """FastChat's own single-answer grading of ``answers`` (records in FastChat's model_answer
    format, ``model_id`` = ``model``): its ``gen_judgment.py --mode single`` run by ``python`` (an
    environment with fschat and openai<1: ``./install.sh --fastchat``) in a scratch directory
    holding the harness's shipped MT-Bench data, against ``base_url`` (openai 0.28 reads
    OPENAI_API_BASE) serving ``judge_model`` (FastChat accepts only OpenAI's model names). Returns
    its judgment file's records (model_judgment/<judge_model>_single.jsonl). Raises RuntimeError
    with the end of its output when it fails."""
    import json
    import os
    import shutil
    import subprocess

    from harness.evaluate.mt_bench_prompts import PROMPTS, QUESTIONS, REFERENCES

    qids = {a["question_id"] for a in answers}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        (data / "mt_bench" / "model_answer").mkdir(parents=True)
        questions = [line for line in QUESTIONS.read_text(encoding="utf-8").splitlines()
                     if line.strip() and json.loads(line)["question_id"] in qids]
        (data / "mt_bench" / "question.jsonl").write_text("\n".join(questions) + "\n", encoding="utf-8")
        shutil.copytree(REFERENCES.parent, data / "mt_bench" / "reference_answer")
        shutil.copy(PROMPTS, data / "judge_prompts.jsonl")
        (data / "mt_bench" / "model_answer" / f"{model}.jsonl").write_text(
            "".join(json.dumps(a) + "\n" for a in answers), encoding="utf-8")
        env = {**os.environ, "OPENAI_API_BASE": base_url, "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "unused")}
        env.pop("PYTHONPATH", None)
        done = subprocess.run([str(python), "-m", "fastchat.llm_judge.gen_judgment", "--bench-name", "mt_bench",
                               "--judge-model", judge_model, "--mode", "single", "--model-list", model,
                               "--parallel", str(parallel)],
                              cwd=tmp, env=env, input="\n", capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"FastChat's gen_judgment.py failed (rc={done.returncode}): {done.stderr[-3000:]}")
        out = data / "mt_bench" / "model_judgment" / f"{judge_model}_single.jsonl"
        return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
