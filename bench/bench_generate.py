"""Generation throughput: ``harness.engines.generate.generate`` against plain Hugging Face ``model.generate``.

Same model, prompts, batches (the harness's length-sorted plan, left padding) and
settings on both sides, for greedy and for sampled decoding (temperature, top-p),
at each batch size (default 1 and 32). The Hugging Face side gets the same explicit
``GenerationConfig`` as the harness (``harness.engines.generate.generation_config``), plus
``do_sample=True, temperature, top_p, top_k=0`` when sampling. Both sides must
produce exactly ``--max-new-tokens`` tokens per row (``min_new_tokens`` forbids eos
on both sides, and the counts are checked), so they do the same work. Each side is
warmed up once per decoding mode before timing; timed runs alternate harness / HF,
``--repeats`` times, and each (side, batch size) keeps its fastest run (robust on a
shared machine).

Tokens/s per side and mode is aggregated over the batch sizes: total tokens / total
seconds (batch 1 therefore weighs more, as it takes longer). The last two lines are ``greedy harness/hf: R`` and ``sampled harness/hf: R``,
R = harness aggregate tokens/s / HF aggregate tokens/s (goal: >= 0.95 greedy,
>= 0.90 sampled).

``--model qwen0.5b-random``: a randomly initialised model with the shape of
Qwen2.5-0.5B built from a config and a byte-level tokenizer trained locally (no hub,
no download), for GPU machines (``bench/gpu.sh``); it also prints tokens/s against
the memory-bandwidth bound, rows x bandwidth / bytes of weights read per decoding
step (all parameters once, tied embeddings once; KV-cache reads not counted).
``--random-shape small`` shrinks it (vocabulary kept) to try the path on a CPU.

``--engines hf,vllm``: instead, the generate stage's two engines (``[generation] engine``):
``harness.engines.generate`` against vLLM in ``.venv-vllm`` serving the same weights
(``harness.engines.vllm_engine``), tokens/s per mode and batch size and their ratio
(``greedy vllm/hf: R``, ``sampled vllm/hf: R``), vLLM's start time per batch size, and the
greedy agreement of the two engines on every prompt.

    .venv/bin/python bench/bench_generate.py [--model smollm2-135m-instruct|tiny|qwen0.5b-random]
        [--prompts 64] [--batch-sizes 1,32] [--max-new-tokens 32] [--repeats 1] [--engines hf,vllm]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from harness.engines.generate import (Prompt, Sampling, generate, generation_config, plan_batches, render)

RANDOM_MODELS = ("qwen0.5b-random",)

# Qwen2.5-0.5B's shape; "small" keeps the vocabulary (the LM head and the sampler's work) and
# Qwen's head size 64 (vLLM-CPU's attention refuses a head size of 16)
QWEN05_SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    intermediate_size=4864, vocab_size=151936)
SMALL_SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=256, vocab_size=151936)


def bench_prompts(n: int) -> list[Prompt]:
    """``n`` instruction prompts of the tiny world's held-out split (pure Python, no build)."""
    from harness.tiny.tasks import make_split

    return [Prompt(ex.id, ({"role": "user", "content": ex.prompt},)) for ex in make_split("eval", n)]


def random_qwen(shape: str, device: str, dtype: torch.dtype, prompts: list[Prompt]):
    """(model, tokenizer): Qwen2.5-0.5B's architecture, random weights, a locally trained tokenizer."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from harness.tiny.tasks import TEMPLATE_WORDS
    from harness.tiny.tokenizer import train_tokenizer

    texts = [m["content"] for p in prompts for m in p.messages]
    tok = train_tokenizer(texts, TEMPLATE_WORDS, vocab_size=512, model_max_length=32768)
    dims = QWEN05_SHAPE if shape == "full" else SMALL_SHAPE
    cfg = Qwen2Config(**dims, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
                      rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval(), tok


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_harness(model, tok, prompts, sampling, bs):
    out = generate(model, tok, prompts, sampling, seed_key=(0,), batch_size=bs, desc=f"harness bs={bs}",
                   min_new_tokens=sampling.max_new_tokens)
    tokens = sum(s["n_tokens"] for r in out.values() for s in r["samples"])
    return tokens, {pid: r["samples"][0]["text"] for pid, r in out.items()}


@torch.inference_mode()
def run_hf(model, tok, prompts, sampling, bs, cache: str | None = None):
    """Plain ``model.generate`` over the same batches as the harness (``cache``: a
    ``cache_implementation`` such as "static"; None = the default dynamic cache)."""
    texts = {p.id: render(tok, p.messages) for p in prompts}
    lengths = {pid: len(tok(t, add_special_tokens=False).input_ids) for pid, t in texts.items()}
    device = next(model.parameters()).device
    cfg = generation_config(model, tok, sampling, min_new_tokens=sampling.max_new_tokens)
    if sampling.temperature > 0:
        cfg.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    if cache:
        cfg.cache_implementation = cache
    tokens, outs = 0, {}
    for batch in plan_batches(lengths, list(texts), 1, bs):
        enc = tok([texts[pid] for pid in batch], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(device)
        new = model.generate(**enc, generation_config=cfg)[:, enc.input_ids.shape[1]:].cpu()
        tokens += new.numel()
        for pid, row in zip(batch, new.tolist()):
            outs[pid] = tok.decode(row, skip_special_tokens=True)
    return tokens, outs


def timed(fn, device, *args):
    sync(device)
    t0 = time.perf_counter()
    tokens, outs = fn(*args)
    sync(device)
    return tokens, time.perf_counter() - t0, outs


def static_vs_dynamic(model, tok, prompts, sampling, sizes, args, dev) -> None:
    """Plain HF greedy decoding, static KV cache vs dynamic, per batch size (fastest of
    ``--repeats``, each side warmed up at that batch size first: compilation is per shape)."""
    for bs in sizes:
        ps = prompts[:args.prompts_b1] if bs == 1 else prompts[:args.prompts]
        best = {}
        for cache in ("static", None):
            run_hf(model, tok, ps[:bs], sampling, bs, cache)
            best[cache] = min(timed(run_hf, dev, model, tok, ps, sampling, bs, cache)[1] for _ in range(args.repeats))
        n = len(ps) * args.max_new_tokens
        print(f"hf greedy bs={bs:<3d} static cache {n / best['static']:9.1f} tok/s  dynamic {n / best[None]:9.1f} "
              f"tok/s  static/dynamic {best[None] / best['static']:.3f}", flush=True)


def run_vllm(model, tok, prompts, sampling, bs, worker):
    from harness.engines.vllm_engine import generate as vllm_generate

    out = vllm_generate(model, tok, prompts, sampling, seed_key=(0,), batch_size=bs, desc=f"vllm bs={bs}",
                        min_new_tokens=sampling.max_new_tokens, worker=worker)
    tokens = sum(s["n_tokens"] for r in out.values() for s in r["samples"])
    return tokens, {pid: r["samples"][0]["text"] for pid, r in out.items()}


def compare_engines(model, tok, prompts, modes, sizes, args, dev, engines) -> None:
    """``--engines hf,vllm``: the generate stage's two engines on the same prompts and settings,
    each (engine, mode, batch size) the fastest of ``--repeats`` after a warm-up; the vLLM
    engine's start (process + engine) is timed once per batch size (vLLM's max_num_seqs is the
    batch size), and the policy export (merged weights written once) once. Then greedy
    agreement: natural greedy answers (stopping at eos) of every prompt, both engines at the
    largest batch size, compared record by record."""
    from harness.engines.vllm_engine import _max_model_len
    from harness.engines.vllm_weights import export_policy
    from harness.models.load import off_gpu
    from harness.engines.vllm_client import Worker
    from harness.engines.vllm_engine import generate as vllm_generate

    assert engines == ["hf", "vllm"], "--engines: hf,vllm"
    longest = max(len(tok(render(tok, p.messages), add_special_tokens=False).input_ids) for p in prompts)
    t0 = time.perf_counter()
    with off_gpu(model):
        model_dir, dtype, _ = export_policy(model)
    print(f"vllm policy export (merged weights written once) {time.perf_counter() - t0:.1f} s", flush=True)
    tot = {e: {m: [0, 0.0] for m in modes} for e in engines}

    def best(fn, *a):
        dt, n = float("inf"), None
        for _ in range(args.repeats):
            n, d, _ = timed(fn, dev, *a)
            dt = min(dt, d)
        return n, dt

    def start(bs: int) -> "Worker":
        w = Worker(model_dir, dtype=dtype, max_num_seqs=bs,
                   max_model_len=_max_model_len(model, longest, args.max_new_tokens))
        print(f"vllm start bs={bs:<3d} {w.start_s:.1f} s (LLM(...) {w.engine_start_s:.1f} s)", flush=True)
        return w

    for bs in sizes:
        ps = prompts[:args.prompts_b1] if bs == 1 else prompts[:args.prompts]
        res = {}
        for mode, sampling in modes.items():
            warm = Sampling(**{**sampling.__dict__, "max_new_tokens": min(4, sampling.max_new_tokens)})
            run_harness(model, tok, ps[:bs], warm, bs)
            res["hf", mode] = best(run_harness, model, tok, ps, sampling, bs)
        with off_gpu(model), start(bs) as w:
            for mode, sampling in modes.items():
                warm = Sampling(**{**sampling.__dict__, "max_new_tokens": min(4, sampling.max_new_tokens)})
                run_vllm(model, tok, ps[:bs], warm, bs, w)
                res["vllm", mode] = best(run_vllm, model, tok, ps, sampling, bs, w)
        for mode in modes:
            (hn, hdt), (vn, vdt) = res["hf", mode], res["vllm", mode]
            assert hn == vn == len(ps) * args.max_new_tokens, (hn, vn)
            for e, (n, dt) in (("hf", (hn, hdt)), ("vllm", (vn, vdt))):
                tot[e][mode][0] += n
                tot[e][mode][1] += dt
            print(f"{mode:7s} bs={bs:<3d} hf {hn / hdt:9.1f} tok/s  vllm {vn / vdt:9.1f} tok/s  "
                  f"vllm/hf {(vn / vdt) / (hn / hdt):.3f}", flush=True)
    ratios = {}
    for mode in modes:
        rate = {e: n / dt for e, (n, dt) in ((e, tot[e][mode]) for e in engines)}
        ratios[mode] = rate["vllm"] / rate["hf"]
        print(f"{mode:7s} all     hf {rate['hf']:9.1f} tok/s  vllm {rate['vllm']:9.1f} tok/s  "
              f"(total tokens / total seconds over batch sizes {sizes})")
    greedy = modes["greedy"]
    bs = max(sizes)
    ps = prompts[:args.prompts]
    hf_out = generate(model, tok, ps, greedy, seed_key=(0,), batch_size=bs, desc="hf agreement")
    with off_gpu(model):
        v_out = vllm_generate(model, tok, ps, greedy, seed_key=(0,), batch_size=bs, desc="vllm agreement")
    same = sum(hf_out[p.id] == v_out[p.id] for p in ps)
    print(f"greedy agreement vllm vs hf (natural stop at eos, bs={bs}): {same}/{len(ps)} identical records")
    print(f"greedy vllm/hf: {ratios['greedy']:.3f}")
    print(f"sampled vllm/hf: {ratios['sampled']:.3f}")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help=f"a model reference for harness.models.load.load_model, or one of {RANDOM_MODELS}")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per batch size above 1")
    ap.add_argument("--prompts-b1", type=int, default=4, help="prompts at batch size 1")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per side; the fastest counts")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="random models only; auto = bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--random-shape", default="full", choices=["full", "small"])
    ap.add_argument("--bandwidth", type=float, default=3.35e12,
                    help="memory bandwidth in bytes/s for the bound (default: H100 SXM); 0 = unknown (no bound)")
    ap.add_argument("--static-cache", action="store_true",
                    help="also time plain HF greedy decoding with a static KV cache (on CUDA transformers "
                         "then compiles the forward pass) against the default dynamic cache")
    ap.add_argument("--engines", default="",
                    help="hf,vllm: compare the generate stage's engines (harness.engines.generate vs vLLM in "
                         ".venv-vllm) instead of harness vs plain HF generate")
    args = ap.parse_args()

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompts = bench_prompts(max(args.prompts, args.prompts_b1))
    if args.model in RANDOM_MODELS:
        dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
            torch.bfloat16 if device == "cuda" else torch.float32)
        model, tok = random_qwen(args.random_shape, device, dtype, prompts)
    else:
        from harness.models.load import load_model, load_tokenizer

        model, tok = load_model(args.model, device=device), load_tokenizer(args.model)
    dev = next(model.parameters()).device
    wbytes = weight_bytes(model)
    print(f"model={args.model}{'/' + args.random_shape if args.model in RANDOM_MODELS else ''} "
          f"device={dev} dtype={next(model.parameters()).dtype} threads={torch.get_num_threads()} "
          f"params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M weights={wbytes / 1e9:.3f}GB "
          f"torch={torch.__version__} max_new_tokens={args.max_new_tokens} batch_sizes={sizes} "
          f"prompts={args.prompts} (batch 1: {args.prompts_b1}) repeats={args.repeats}")

    modes = {"greedy": Sampling(max_new_tokens=args.max_new_tokens),
             "sampled": Sampling(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)}
    if args.engines:
        compare_engines(model, tok, prompts, modes, sizes, args, dev, args.engines.split(","))
        return
    ratios = {}
    for mode, sampling in modes.items():
        warm = Sampling(**{**sampling.__dict__, "max_new_tokens": min(4, sampling.max_new_tokens)})
        run_harness(model, tok, prompts[:max(sizes)], warm, max(sizes))
        run_hf(model, tok, prompts[:max(sizes)], warm, max(sizes))
        torch.manual_seed(0)  # Hugging Face sampling draws from the global generator
        tot = {"harness": [0, 0.0], "hf": [0, 0.0]}
        for bs in sizes:
            ps = prompts[:args.prompts_b1] if bs == 1 else prompts[:args.prompts]
            h_dt = f_dt = float("inf")
            for _ in range(args.repeats):
                h_tok, dt, h_out = timed(run_harness, dev, model, tok, ps, sampling, bs)
                h_dt = min(h_dt, dt)
                f_tok, dt, f_out = timed(run_hf, dev, model, tok, ps, sampling, bs)
                f_dt = min(f_dt, dt)
            expect = len(ps) * args.max_new_tokens
            assert h_tok == expect and f_tok == expect, (h_tok, f_tok, expect)
            for side, (n, dt) in (("harness", (h_tok, h_dt)), ("hf", (f_tok, f_dt))):
                tot[side][0] += n
                tot[side][1] += dt
            line = (f"{mode:7s} bs={bs:<3d} harness {h_tok / h_dt:9.1f} tok/s  hf {f_tok / f_dt:9.1f} tok/s  "
                    f"ratio {h_tok / h_dt / (f_tok / f_dt):.3f}")
            if args.model in RANDOM_MODELS and not args.bandwidth:
                line += "  bound unknown (no --bandwidth for this device)"
            elif args.model in RANDOM_MODELS:
                bound = min(bs, len(ps)) * args.bandwidth / wbytes
                line += f"  bound {bound:9.1f} tok/s (harness {h_tok / h_dt / bound:.1%}, hf {f_tok / f_dt / bound:.1%})"
            if mode == "greedy":
                line += f"  identical outputs {sum(h_out[p] == f_out[p] for p in h_out)}/{len(h_out)}"
            print(line, flush=True)
        rate = {side: n / dt for side, (n, dt) in tot.items()}
        print(f"{mode:7s} all     harness {rate['harness']:9.1f} tok/s  hf {rate['hf']:9.1f} tok/s  "
              f"(total tokens / total seconds over batch sizes {sizes})")
        ratios[mode] = rate["harness"] / rate["hf"]
    if args.static_cache:
        static_vs_dynamic(model, tok, prompts, modes["greedy"], sizes, args, dev)
    print(f"greedy harness/hf: {ratios['greedy']:.3f}")
    print(f"sampled harness/hf: {ratios['sampled']:.3f}")


if __name__ == "__main__":
    main()
