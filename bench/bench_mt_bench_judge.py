"""MT-Bench with a real judge: SmolLM2-135M-Instruct answers MT-Bench questions turn by turn
(the harness's HF engine, ``harness.evaluate.mt_bench.generate_answers``), then vLLM serving
SmolLM2-135M-Instruct under the name ``gpt-4`` (``harness.engines.vllm_server``, seeded, one
request at a time) grades them twice: through the harness and through FastChat's own
``gen_judgment.py`` (``harness.evaluate.crosscheck.fastchat_itself``) on the same answers file.

Prints both scores (overall, turn 1, turn 2), how many of the turns got the same judgment text
and the same rating, and the invalid ratings. Needs ``.venv-vllm`` (``./install.sh --vllm``) and
``.venv-fastchat`` (``./install.sh --fastchat``).

    .venv/bin/python bench/bench_mt_bench_judge.py [--questions 81,101,111] [--max-new-tokens 128]

With ``--run CONFIG``: an experiment with MT-Bench judged by that served SmolLM2 instead (not
seeded: the judge's requests go concurrently, ``eval.mt_bench.judge.batch_size`` at a time, and
vLLM batches them). ``harness run CONFIG`` with ``eval.mt_bench.enabled`` and the judge's
``base_url`` pointed at the server, then the ``harness table`` of its run directory; further
``--set KEY=VALUE`` go to ``harness run``. Needs ``.venv-vllm`` only.

    .venv/bin/python bench/bench_mt_bench_judge.py --run experiments/smollm2/spin.toml --set method.iterations=1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVED = "gpt-4"  # FastChat's gen_judgment accepts only OpenAI's model names
KEY_ENV = "HARNESS_LOCAL_JUDGE_KEY"  # the local server checks no key; the client sends this one


def main() -> None:
    import harness.judges  # noqa: F401  (judge kinds, for the config)
    import harness.methods  # noqa: F401
    from harness.config.experiment import parse
    from harness.engines.vllm_server import serve
    from harness.evaluate import mt_bench as mt
    from harness.evaluate.crosscheck import fastchat_itself
    from harness.models.load import load_model, load_tokenizer, offline_env
    from harness.models.sources import locate, materialize

    offline_env()
    os.environ.setdefault(KEY_ENV, "unused")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", default="81,101,111", help="MT-Bench question ids")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="the answers' cap per turn")
    ap.add_argument("--fastchat-python", default=str(REPO / ".venv-fastchat" / "bin" / "python"))
    ap.add_argument("--run", metavar="CONFIG", help="run this experiment with MT-Bench judged by the served SmolLM2")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --run: for harness run")
    args = ap.parse_args()
    path = materialize(locate("smollm2-135m-instruct"))
    if args.run:
        return run_experiment(path, args.run, args.set)
    model, tok = load_model(path, device="cpu"), load_tokenizer(path)
    doc = {"experiment": {"name": "b"}, "model": {"base": "tiny"}, "method": {"name": "spin"},
           "data": {"train": "tiny:sft"},
           "eval": {"mt_bench": {"enabled": True, "question_ids": [int(q) for q in args.questions.split(",")],
                                 "max_new_tokens": args.max_new_tokens,
                                 "judge": {"name": "openai", "batch_size": 1,
                                           "openai": {"base_url": "http://unused/v1", "model": SERVED,
                                                      "api_key_env": KEY_ENV, "timeout_s": 3600}}}}}
    section = parse(doc).eval.mt_bench
    questions = mt.load_questions(section.question_ids)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # the answers first: the server would share the CPU
        samples = mt.generate_answers(model, tok, questions, section, Path(tmp), seed_key=(0, 0), batch_size=8)
    answers = mt.answer_records(questions, samples, "smollm2")
    gen_s = time.perf_counter() - t0
    del model
    t0 = time.perf_counter()
    with serve(path, SERVED, seeded=True, max_model_len=8192) as url:
        start = time.perf_counter() - t0
        grader = mt.Grader(url, SERVED, api_key_env=KEY_ENV, timeout_s=3600, concurrency=1)
        t1 = time.perf_counter()
        ours = mt.grade(grader, questions, {a["question_id"]: a["choices"][0]["turns"] for a in answers}, "smollm2")
        t2 = time.perf_counter()
        theirs = fastchat_itself(args.fastchat_python, answers, url, "smollm2", judge_model=SERVED, parallel=1)
        t3 = time.perf_counter()
    mine = {(j["question_id"], j["turn"]): j for j in ours}
    om = mt.compute_metrics(ours)
    fc = mt.compute_metrics([{**j, "category": None} for j in theirs])
    same_text = sum(mine[(j["question_id"], j["turn"])]["judgment"] == j["judgment"] for j in theirs)
    same_rating = sum(mine[(j["question_id"], j["turn"])]["score"] == j["score"] for j in theirs)
    print(f"vLLM server start {start:.0f}s; judge SmolLM2-135M-Instruct served as {SERVED} (seeded, one request "
          f"at a time); answers SmolLM2-135M-Instruct, HF engine, max_new_tokens {args.max_new_tokens}; "
          f"questions {args.questions}")
    print(f"{'':<10}{'score':>7}{'turn 1':>8}{'turn 2':>8}{'invalid':>9}{'time':>8}")
    for name, m, secs in (("harness", om, t2 - t1), ("FastChat", fc, t3 - t2)):
        cells = [m[k] for k in ("mt_bench/score", "mt_bench/turn_1", "mt_bench/turn_2")]
        print(f"{name:<10}" + "".join(f"{c:>7.2f} " if c is not None else f"{'-':>7} " for c in cells)
              + f"{m['mt_bench/n_invalid']:>8}{secs:>7.0f}s")
    print(f"same judgment text {same_text}/{len(theirs)}, same rating {same_rating}/{len(theirs)}; answers "
          f"generated in {gen_s:.0f}s before the server started")


def run_experiment(model_dir: Path, config: str, overrides: list[str]) -> None:
    """``harness run config`` with MT-Bench on and judged by ``model_dir`` served as SERVED, then
    ``harness table`` of its run directory (both printed as they come)."""
    import subprocess

    from harness.config.experiment import load
    from harness.engines.vllm_server import serve

    sets = [*overrides, "eval.mt_bench.enabled=true", f"eval.mt_bench.judge.openai.model={SERVED}",
            f"eval.mt_bench.judge.openai.api_key_env={KEY_ENV}", "eval.mt_bench.judge.openai.timeout_s=3600"]
    cfg = load(config, [*sets, "eval.mt_bench.judge.openai.base_url=http://unused/v1"])  # its errors before the server
    harness = [str(REPO / ".venv" / "bin" / "harness")]
    t0 = time.perf_counter()
    with serve(model_dir, SERVED, max_model_len=8192) as url:
        print(f"vLLM server up in {time.perf_counter() - t0:.0f}s at {url}", flush=True)
        t1 = time.perf_counter()
        cmd = [*harness, "run", config, *(a for s in [*sets, f"eval.mt_bench.judge.openai.base_url={url}"]
                                          for a in ("--set", s))]
        subprocess.run(cmd, check=True)
        print(f"harness run took {time.perf_counter() - t1:.0f}s", flush=True)
    subprocess.run([*harness, "table", str(cfg.run_dir)], check=True)


if __name__ == "__main__":
    main()
