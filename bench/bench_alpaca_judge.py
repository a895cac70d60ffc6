"""AlpacaEval 2.0's annotator against a real OpenAI-compatible server: vLLM serving
SmolLM2-135M-Instruct under the name ``gpt-4-1106-preview`` (``harness.engines.vllm_server``),
judged once through the harness (``[eval.alpaca_eval] annotator``) and once by
``alpaca_eval.main.evaluate`` itself, on the same published outputs and GPT-4 Turbo references
(``../shared/data/alpaca_eval``).

Prints, per system: both win rates with their standard errors, how many per-instruction
preferences agree exactly, the largest preference difference, and the win rate that GPT-4 Turbo
itself gave on the same instructions (the published annotations), so one sees what a 135M
judge's AlpacaEval numbers look like. Needs ``.venv-vllm`` (``./install.sh --vllm``).

    .venv/bin/python bench/bench_alpaca_judge.py [--n 24] [--systems gemma-7b-it,alpaca-7b]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval"
SERVED = "gpt-4-1106-preview"  # the name AlpacaEval 2.0's annotator config asks for
KEY_ENV = "HARNESS_LOCAL_JUDGE_KEY"  # the local server checks no key; the client sends this one


def published_win_rate(system: str, instructions: set[str]) -> tuple[float, int]:
    """GPT-4 Turbo's own weighted win rate of ``system`` on ``instructions`` (published annotations)."""
    from alpaca_eval.metrics import get_winrate

    ann = json.loads((SHARED / f"{system}.weighted_alpaca_eval_gpt4_turbo.annotations.json").read_text())
    prefs = [a["preference"] for a in ann if a["instruction"] in instructions and a.get("preference") is not None]
    return float(get_winrate([{"preference": p} for p in prefs])["win_rate"]), len(prefs)


def compare(n: int, systems: list[str], url: str, concurrency: int) -> list[dict]:
    from harness.evaluate.alpaca import annotate_alpaca_eval, compute_metrics
    from harness.evaluate.alpaca_instructions import load_instructions
    from harness.evaluate.annotators import AE2, AlpacaEvalAnnotator, Endpoint
    from harness.evaluate.crosscheck import alpaca_eval_itself

    rows = load_instructions(str(SHARED / "gpt4_1106_preview.model_outputs.json"), n)
    out = []
    for system in systems:
        by_instr = {r["instruction"]: r["output"] for r in json.loads((SHARED / f"{system}.model_outputs.json").read_text())}
        outputs = {r["id"]: by_instr[r["instruction"]] for r in rows}
        t0 = time.perf_counter()
        ours_ann = annotate_alpaca_eval(AlpacaEvalAnnotator(AE2, Endpoint(url, SERVED, api_key_env=KEY_ENV, concurrency=concurrency)),
                                        rows, outputs, system)
        t1 = time.perf_counter()
        ours, _ = compute_metrics(ours_ann, list(outputs.values()), len(rows))
        theirs, their_ann = alpaca_eval_itself(AE2, rows, outputs, system, url, num_procs=concurrency)
        t2 = time.perf_counter()
        theirs_by = {a["instruction"]: a["preference"] for a in their_ann}
        pairs = [(a["preference"], theirs_by[r["instruction"]]) for a, r in zip(ours_ann, rows)]
        clean = lambda p: None if p is None or (isinstance(p, float) and math.isnan(p)) else p  # noqa: E731
        pairs = [(clean(a), clean(b)) for a, b in pairs]
        both = [(a, b) for a, b in pairs if a is not None and b is not None]
        gpt4, n_pub = published_win_rate(system, {r["instruction"] for r in rows})
        out.append({"system": system, "n": len(rows), "ours": ours["alpaca_eval/win_rate"],
                    "ours_se": ours["alpaca_eval/standard_error"], "theirs": float(theirs["win_rate"]),
                    "theirs_se": float(theirs["standard_error"]), "n_total": ours["alpaca_eval/n_total"],
                    "same": sum(a == b for a, b in pairs), "max_diff": max((abs(a - b) for a, b in both), default=0.0),
                    "gpt4_turbo": gpt4, "gpt4_n": n_pub, "ours_s": t1 - t0, "theirs_s": t2 - t1})
    return out


def main() -> None:
    from harness.engines.vllm_server import serve
    from harness.models.load import offline_env
    from harness.models.sources import locate, materialize

    offline_env()
    os.environ.setdefault(KEY_ENV, "unused")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=24, help="instructions (the first n of AlpacaEval's 805)")
    ap.add_argument("--systems", default="gemma-7b-it,alpaca-7b")
    ap.add_argument("--concurrency", default="1,8", help="requests in flight, both sides (one comparison each)")
    args = ap.parse_args()
    model_dir = materialize(locate("smollm2-135m-instruct"))
    t0 = time.perf_counter()
    runs, start = [], None
    for seeded in (False, True):
        with serve(model_dir, SERVED, seeded=seeded) as url:
            start = start or time.perf_counter() - t0
            runs += [(c, seeded, compare(args.n, args.systems.split(","), url, c))
                     for c in map(int, args.concurrency.split(","))]
    print(f"vLLM server start {start:.0f}s; judge SmolLM2-135M-Instruct served as {SERVED}; annotator "
          "weighted_alpaca_eval_gpt4_turbo; reference gpt4_1106_preview")
    for c, seeded, rows in runs:
        table(c, seeded, rows)


def table(concurrency: int, seeded: bool, rows: list[dict]) -> None:
    print(f"-- {concurrency} request(s) in flight on each side; "
          + ("every request seeded from its content, prefix cache off (serve(seeded=True))" if seeded else "requests unseeded, as sent"))
    print(f"{'system':<14}{'n':>4}  {'harness':>13}  {'alpaca_eval':>13}  {'same pref':>9}  {'max |diff|':>10}  "
          f"{'GPT-4 Turbo judge':>17}")
    for r in rows:
        print(f"{r['system']:<14}{r['n']:>4}  {r['ours']:>6.2f} ± {r['ours_se']:<4.2f}  {r['theirs']:>6.2f} ± "
              f"{r['theirs_se']:<4.2f}  {r['same']:>4}/{r['n']:<4}  {r['max_diff']:>10.2e}  {r['gpt4_turbo']:>10.2f} "
              f"(n={r['gpt4_n']})   [{r['ours_s']:.0f}s / {r['theirs_s']:.0f}s]")


if __name__ == "__main__":
    main()
