"""Where a harness iteration spends its time: one iteration of each method, stage by stage,
and the share of wall time spent outside model forward, backward and generate.

Each method runs ``harness.run.loop.run_experiment`` on its experiment file in
``experiments/smollm2/`` (or ``--model tiny``: the same settings on the tiny world's
model) shrunk to finish in a few minutes on 2 CPU cores: one iteration, ``--prompts``
prompts of the tiny world (tiny:sft_train for SPIN, tiny:prompts_train for the others),
``--samples`` samples per prompt, the tiny world's oracle as judge, and small evaluations
(lm-eval tiny tasks, AlpacaEval-style and indicators on ``--eval-n`` items each) of
iteration 0 and 1. Self-Rewarding runs with the oracle judge instead of the policy
judging itself and without its M1 SFT stage (IFT/EFT), to keep it short: its judge
stage is then rule-based glue, not model work.

Per stage the table shows the manifest's wall time and cost fields (tokens generated
and trained, judge calls, peak memory) and the time spent in model work, measured by
timing hooks rather than torch.profiler (whose per-op recording would slow the run it
measures):
- forward: from the outermost ``PreTrainedModel`` forward pre-hook to its forward hook
  (global module hooks; nested models and calls inside ``generate`` counted once);
  reference passes, probes and lm-eval's log-likelihoods included;
- backward: ``torch.autograd.backward`` (what ``loss.backward()`` calls);
- generate: ``GenerationMixin.generate`` (its forwards count here, not under forward);
- optim: optimizer steps (torch's global optimizer step hooks).
"outside" is the rest: loading models and data, tokenization, trl's dataset preparation,
writing files, judging glue, evaluation bookkeeping. Stages are attributed by wrapping
``store.Stage.begin`` / ``commit``; the rest of ``run_experiment`` (setup, provenance,
writing results.jsonl) is reported as "between stages" (the CLI's tables are not timed).
Libraries are imported before timing (a fresh ``harness run`` pays that once, not per
method). The last lines are ``overhead <method>: X%`` = outside / wall of the run
(goal: under 10%).

``--model qwen0.5b-random``: a randomly initialised model with Qwen2.5-0.5B's transformer shape
(``bench_generate.QWEN05_SHAPE``: 24 layers, hidden 896, 14 heads, 2 KV heads, MLP 4864; ``--shape
small`` shrinks it for a CPU) and the tiny world's tokenizer, whose vocabulary (a few hundred
tokens) replaces Qwen's 151,936 so that every sampled token decodes to text; its Self-Rewarding and
DNO are judged by a local endpoint that scores by hash (``hash_judge``: the oracle scores every
random answer 1, which leaves no pairs), through the openai judge, and their cut chosen answers are
kept (a random model never ends an answer before max_new_tokens). ``--device cuda``
runs every stage there (the dtype then defaults to bfloat16). ``--no-evals`` drops lm-eval and
AlpacaEval (the indicators read the tiny world's held-out prompts), so a run needs neither lm_eval nor alpaca_eval installed
(``bench/gpu.sh`` runs it so on a machine without them). A method that fails prints its error
and the others still run; the exit status is 1 if any failed.

    .venv/bin/python bench/bench_stages.py [--model smollm2-135m-instruct|tiny|qwen0.5b-random]
        [--methods spin,self_rewarding,dno] [--prompts 16] [--samples 4] [--eval-n 16] [--threads 1]
        [--device cpu|cuda] [--shape full|small] [--no-evals]
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
import tomllib
from collections import defaultdict
from pathlib import Path

import torch

from harness.models.load import offline_env

REPO = Path(__file__).resolve().parents[1]
KINDS = ("forward", "backward", "generate", "optim")
ORDER = ["init_sft", "self_instruct", "generate", "judge", "pairs", "train", "evaluate", "validation"]


class Clock:
    """Seconds of model work per (iteration, stage) and kind, from timing hooks."""

    def __init__(self):
        self.where = ("", "between stages")
        self.spent: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.fwd_depth = self.gen_depth = 0
        self.fwd_t0 = self.opt_t0 = 0.0
        self.cuda = torch.cuda.is_available()

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, kind: str, seconds: float) -> None:
        self.spent[self.where][kind] += seconds

    def install(self) -> None:
        from transformers import PreTrainedModel
        from transformers.generation.utils import GenerationMixin

        from harness.store import files as store

        clock = self

        def pre(module, args):
            if isinstance(module, PreTrainedModel):
                if clock.fwd_depth == 0 and clock.gen_depth == 0:
                    clock.fwd_t0 = clock.now()
                clock.fwd_depth += 1

        def post(module, args, out):
            if isinstance(module, PreTrainedModel):
                clock.fwd_depth -= 1
                if clock.fwd_depth == 0 and clock.gen_depth == 0:
                    clock.add("forward", clock.now() - clock.fwd_t0)

        torch.nn.modules.module.register_module_forward_pre_hook(pre)
        torch.nn.modules.module.register_module_forward_hook(post)

        generate = GenerationMixin.generate

        def timed_generate(self, *args, **kwargs):
            outer = clock.gen_depth == 0
            t0 = clock.now()
            clock.gen_depth += 1
            try:
                return generate(self, *args, **kwargs)
            finally:
                clock.gen_depth -= 1
                if outer:
                    clock.add("generate", clock.now() - t0)

        GenerationMixin.generate = timed_generate

        backward = torch.autograd.backward

        def timed_backward(*args, **kwargs):
            t0 = clock.now()
            try:
                return backward(*args, **kwargs)
            finally:
                clock.add("backward", clock.now() - t0)

        torch.autograd.backward = timed_backward

        def opt_pre(optimizer, args, kwargs):
            clock.opt_t0 = clock.now()

        def opt_post(optimizer, args, kwargs):
            clock.add("optim", clock.now() - clock.opt_t0)

        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(opt_pre)
        register_optimizer_step_post_hook(opt_post)

        begin, commit = store.Stage.begin, store.Stage.commit

        def stage_begin(stage):
            clock.where = (stage.final.parent.name, stage.final.name)
            return begin(stage)

        def stage_commit(stage, *args, **kwargs):
            try:
                return commit(stage, *args, **kwargs)
            finally:
                clock.where = ("", "between stages")

        store.Stage.begin, store.Stage.commit = stage_begin, stage_commit


def experiment(method: str, args, out: Path):
    """The method's SmolLM2 experiment file, shrunk (see the module doc)."""
    import harness.methods  # noqa: F401  (registers the methods the config names)
    from harness.config.experiment import parse

    doc = tomllib.loads((REPO / "experiments" / "smollm2" / f"{method}.toml").read_text())
    doc["experiment"].update(name=f"bench-{method}", output_dir=str(out))
    doc["model"].update(base=args.base, cpu_threads=args.threads)
    if args.device:
        doc["model"]["device"] = args.device
    doc["method"]["iterations"] = 1
    opts = doc["method"].setdefault(method, {})
    if method == "spin":
        doc["data"]["num_prompts"] = args.prompts
    else:
        opts.update(prompts_per_iteration=args.prompts, num_samples=args.samples)
        doc["judge"] = {"name": "oracle"}
        if args.judge_url:  # a random model's answers all score 1 with the oracle: no pairs
            doc["judge"] = {"name": "openai", "openai": {"base_url": args.judge_url, "model": "hash",
                                                         "api_key_env": HASH_JUDGE_KEY}}
            opts["cut_chosen"] = "keep"  # its answers never end before max_new_tokens: all cut
    if method == "self_rewarding":
        opts.update(ift="", eft="")  # no M1 SFT stage
    if method == "dno":
        opts["replay"] = []  # one iteration: nothing to replay
    doc["generation"].update(batch_size=32)
    doc["eval"].update(limit=args.eval_n)
    doc["eval"]["alpaca_eval"]["limit"] = args.eval_n
    doc["eval"]["indicators"]["num_prompts"] = min(args.eval_n, 8)
    if args.no_evals:  # the indicators then read the tiny world's held-out prompts
        doc["eval"].pop("lm_eval_tasks", None)
        doc["eval"].pop("alpaca_eval", None)
        doc["eval"]["eval_prompts"] = "tiny:eval_prompts"
    return parse(doc, source=f"bench:{method}")


HASH_JUDGE_KEY = "BENCH_HASH_JUDGE_KEY"


def hash_judge() -> str:
    """A local OpenAI-compatible endpoint (127.0.0.1, a free port, a daemon thread) whose reply
    to a judge prompt is "Score: N" with N in 1..5 drawn from the prompt's hash: varied scores
    for a random model's answers, so Self-Rewarding and DNO get pairs. Returns its base URL."""
    import hashlib
    import json
    import os
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            n = 1 + hashlib.sha256(body).digest()[0] % 5
            out = json.dumps({"id": "h", "object": "chat.completion", "created": 0, "model": "hash",
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": f"Score: {n}"}}],
                              "usage": {"prompt_tokens": 0, "completion_tokens": 3, "total_tokens": 3}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    os.environ.setdefault(HASH_JUDGE_KEY, "unused")
    return f"http://127.0.0.1:{httpd.server_address[1]}/v1"


def random_model(shape: str, out: Path) -> str:
    """A directory holding a random model of Qwen2.5-0.5B's transformer shape (or the small
    one) with the tiny world's tokenizer and its vocabulary (see the module doc)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from bench_generate import QWEN05_SHAPE, SMALL_SHAPE
    from harness.models.sources import resolve_ref

    tok = AutoTokenizer.from_pretrained(resolve_ref("tiny"))
    dims = {**(QWEN05_SHAPE if shape == "full" else SMALL_SHAPE), "vocab_size": len(tok)}
    cfg = Qwen2Config(**dims, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
                      rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    print(f"random model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters ({shape} shape, "
          f"vocabulary {len(tok)}) in {out}", flush=True)
    return str(out)


def run_method(method: str, args, clock: Clock, root: Path) -> float:
    from harness.run.loop import run_experiment
    from harness.store.files import read_json

    cfg = experiment(method, args, root / method)
    clock.spent.clear()
    t0 = time.perf_counter()
    run_dir, rows = run_experiment(cfg)
    wall = time.perf_counter() - t0
    stages = sorted(((p.parent.parent.name, p.parent.name, read_json(p)["outputs"])
                     for p in run_dir.glob("iter_*/*/manifest.json")), key=lambda s: (s[0], ORDER.index(s[1])))
    header = (f"{'stage':14s} {'wall_s':>7s} " + " ".join(f"{k:>8s}" for k in KINDS)
              + f" {'outside':>8s} {'gen_tok':>8s} {'train_tok':>9s} {'judge':>6s} {'peak_MB':>8s}")
    print(f"\n{method}: {len(rows) - 1} iteration, {wall:.1f} s wall (run_experiment)", flush=True)
    print(header)
    tot = defaultdict(float)
    in_stages = 0.0
    for it, name, out in stages:
        spent = clock.spent.get((it, name), {})
        secs = out.get("seconds", 0.0)
        in_stages += secs
        c = out.get("cost", {})
        work = sum(spent.get(k, 0.0) for k in KINDS)
        for k in KINDS:
            tot[k] += spent.get(k, 0.0)
        print(f"{it[5:] + ' ' + name:14s} {secs:7.1f} " + " ".join(f"{spent.get(k, 0.0):8.1f}" for k in KINDS)
              + f" {secs - work:8.1f} {c.get('gen_tokens', 0):8d} {c.get('train_tokens', 0):9d} "
              f"{c.get('judge_calls', 0):6d} {c.get('peak_mem_mb', 0):8.0f}")
    between = clock.spent.get(("", "between stages"), {})
    for k in KINDS:
        tot[k] += between.get(k, 0.0)
    print(f"{'between stages':14s} {wall - in_stages:7.1f} " + " ".join(f"{between.get(k, 0.0):8.1f}" for k in KINDS))
    work = sum(tot.values())
    share = (wall - work) / wall
    print(f"total          {wall:7.1f} " + " ".join(f"{tot[k]:8.1f}" for k in KINDS)
          + f" {wall - work:8.1f}  -> outside model forward/backward/generate/optim: {share:.1%} of wall")
    return share


def main() -> int:
    offline_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help='a model reference, e.g. "tiny"')
    ap.add_argument("--methods", default="spin,self_rewarding,dno")
    ap.add_argument("--prompts", type=int, default=16, help="training prompts of the iteration")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt (Self-Rewarding, DNO)")
    ap.add_argument("--eval-n", type=int, default=16, help="lm-eval examples per task, AlpacaEval instructions")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 by default (a second thread contends on a shared 2-core machine)")
    ap.add_argument("--device", default="", choices=["", "cpu", "cuda"], help="model.device (default: the file's)")
    ap.add_argument("--shape", default="full", choices=["full", "small"], help="qwen0.5b-random's shape")
    ap.add_argument("--no-evals", action="store_true", help="no lm-eval and no AlpacaEval (indicators only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if not args.no_evals:
        import alpaca_eval.main  # noqa: F401  (imports paid once, before timing)
        import lm_eval.evaluator  # noqa: F401
    import peft  # noqa: F401
    import trl  # noqa: F401

    import harness.evaluate  # noqa: F401
    import harness.run.loop  # noqa: F401
    import harness.train  # noqa: F401
    print(f"model={args.model} threads={torch.get_num_threads()} prompts={args.prompts} samples={args.samples} "
          f"eval_n={args.eval_n} torch={torch.__version__} cuda={torch.cuda.is_available()} "
          f"(imports before timing: {time.perf_counter() - t0:.1f} s)", flush=True)
    clock = Clock()
    clock.install()
    root = Path(tempfile.mkdtemp(prefix="bench_stages."))
    shares = {}
    try:
        args.base = random_model(args.shape, root / "model") if args.model == "qwen0.5b-random" else args.model
        args.judge_url = hash_judge() if args.model == "qwen0.5b-random" else ""
        for method in args.methods.split(","):
            try:
                shares[method] = run_method(method, args, clock, root)
            except Exception as e:  # noqa: BLE001  (one method failing does not hide the others)
                print(f"\n{method}: failed: {type(e).__name__}: {e}", flush=True)
                shares[method] = math.nan
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    for method, share in shares.items():
        print(f"overhead {method}: {share:.1%}")
    return 1 if any(math.isnan(s) for s in shares.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
