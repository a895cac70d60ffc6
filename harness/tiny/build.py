"""Build the tiny world on demand and cache it by content hash.

``ensure_tiny(seed)`` returns ``$HARNESS_CACHE/tiny/<hash>`` (default
``~/.cache/harness``), where the hash covers the build parameters, the seed,
the source of ``harness/tiny`` and the versions of the libraries that shape
the bytes. A build runs in a temporary directory that is renamed into place
when complete, so an existing ``<hash>`` directory is always a finished build;
a file lock keeps two processes from building the same hash at once.

On the same machine and library versions, the same seed gives bit-identical
files (fixed thread count, seeded generators, no data-loader workers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterator

from harness.store.files import build_once, cache_root
from harness.tiny import data, tasks, warmup
from harness.tiny.tokenizer import train_tokenizer

HERE = Path(__file__).parent


@dataclass(frozen=True)
class TinyParams:
    """Everything that determines a build besides the seed."""
    difficulty: int = 2            # words of difficulty+2 letters, numbers below 10**difficulty
    n_train: int = 384             # SPIN SFT data, DNO / Self-Rewarding prompts, teacher answers
    n_ift: int = 256               # Self-Rewarding seed instruction data
    n_eft: int = 128               # instructions of the judge data (about 6 judged answers each)
    n_eval: int = 150              # held-out: lm-eval, AlpacaEval-style, indicator prompts
    n_warmup: int = 6000           # warm-up task examples
    n_warmup_judge: int = 800      # warm-up instructions judged (about 6 judged answers each)
    # Share of warm-up answers that are correct, per task; the others are the task's habit
    # (tasks.habit). A task below 0.5 leaves a model that can answer correctly (it samples the
    # right answer often) but prefers the habit when decoding greedily: the gap that preference
    # methods with a good judge close, and a broken method does not.
    demo_accuracy: tuple[tuple[str, float], ...] = (
        ("add", 1.0), ("reverse", 1.0), ("sort", 1.0), ("count", 1.0), ("upper", 0.4), ("repeat", 0.4))
    reference_accuracy: float = 0.75  # AlpacaEval reference: correct this often, else a near miss
    vocab_size: int = 512          # upper bound; BPE stops once every fixed word is one token
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 6
    intermediate_size: int = 288
    max_positions: int = 512
    steps: int = 1500              # warm-up optimiser steps (the whole cosine schedule)
    batch_size: int = 32
    lr: float = 3e-3
    judge_start: int = 300         # judge batches join after this step (tasks are learnt first)
    judge_weight: float = 0.35     # share of judge batches once they have joined
    threads: int = 2               # torch threads during the build (part of the hash)


def _source_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(HERE.iterdir()):
        if p.suffix in (".py", ".txt", ".jinja") and p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def cache_key(seed: int = 0, params: TinyParams | None = None) -> str:
    params = params or TinyParams()
    versions = [metadata.version(p) for p in ("torch", "transformers", "tokenizers")]
    blob = json.dumps({"seed": seed, "params": dataclasses.asdict(params), "source": _source_digest(),
                       "versions": versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _deterministic_torch(seed: int, threads: int) -> Iterator[None]:
    """Fixed threads and a private, seeded torch RNG; the caller's state is restored."""
    import torch

    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def ensure_tiny(seed: int = 0, params: TinyParams | None = None) -> Path:
    """The built world for (seed, params), building it first if needed."""
    params = params or TinyParams()
    final = cache_root() / "tiny" / cache_key(seed, params)
    return build_once(final, lambda tmp: build(tmp, seed, params, final=final))


def build(out: Path, seed: int = 0, params: TinyParams | None = None, final: Path | None = None) -> dict:
    """Write a complete world into the empty directory ``out``; return its build record.
    ``final`` is where the directory will live (absolute paths in lm-eval files)."""
    params = params or TinyParams()
    out, final = Path(out), Path(final or out).resolve()
    t0 = time.time()
    p = params
    splits = {name: tasks.make_split(name, n, seed, p.difficulty) for name, n in (
        ("train", p.n_train), ("ift", p.n_ift), ("eft", p.n_eft), ("eval", p.n_eval), ("warmup", p.n_warmup))}
    pool = splits["warmup"]
    demo_rng, demo_acc = random.Random(f"tiny:demo:{seed}"), dict(p.demo_accuracy)
    task_pairs = [(ex.prompt, data.demonstration(ex, demo_rng, demo_acc)) for ex in pool]
    judge_pairs = [(r["prompt"], r["response"]) for r in data.judge_rows(
        pool[: p.n_warmup_judge], random.Random(f"tiny:warmup-judge:{seed}"))]

    tok = train_tokenizer([f"{q}\n{a}" for q, a in task_pairs[:2000] + judge_pairs[:1000]],
                          tasks.TEMPLATE_WORDS, vocab_size=p.vocab_size, model_max_length=p.max_positions)
    with _deterministic_torch(seed, p.threads):
        model = _new_model(tok, p)
        t1 = time.time()
        pools = [[warmup.encode(tok, q, a) for q, a in task_pairs],
                 [warmup.encode(tok, q, a) for q, a in judge_pairs]]
        losses = warmup.train(model, tok, pools, [1.0 - p.judge_weight, p.judge_weight],
                              starts=[0, p.judge_start], steps=p.steps,
                              batch_size=p.batch_size, lr=p.lr, seed=seed)
        t2 = time.time()
        ev = splits["eval"]
        outs = warmup.generate(model, tok, [ex.prompt for ex in ev], max_new_tokens=2 * tasks.word_length(p.difficulty) + 4)
    correct = [tasks.check(ex, o) for ex, o in zip(ev, outs)]
    habitual = [o.strip() == tasks.habit(ex.prompt) != ex.answer for ex, o in zip(ev, outs)]

    def per_task(flags: list[bool]) -> dict[str, float]:
        return {t: round(sum(f for ex, f in zip(ev, flags) if ex.task == t)
                         / max(1, sum(ex.task == t for ex in ev)), 4) for t in tasks.TASK_NAMES}

    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    data.write_world_files(out, final, splits, seed, p.reference_accuracy, demo_acc)
    record = {
        "seed": seed, "params": dataclasses.asdict(p), "path": str(final),
        "exact_match": round(sum(correct) / len(correct), 4), "exact_match_per_task": per_task(correct),
        "habit_rate": round(sum(habitual) / len(habitual), 4), "habit_rate_per_task": per_task(habitual),
        "n_params": sum(x.numel() for x in model.parameters()), "vocab_size": len(tok),
        "steps": len(losses),
        "loss_first": round(sum(losses[:20]) / max(1, len(losses[:20])), 4),
        "loss_last": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
        "seconds_train": round(t2 - t1, 1), "seconds_total": round(time.time() - t0, 1),
    }
    # timings differ between builds: they live only here, never in model or data files
    (out / "build.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def _new_model(tok, p: TinyParams):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_heads,
        max_position_embeddings=p.max_positions, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model


# "tiny:<name>" -> path inside the build directory
FILES: dict[str, str] = {
    "model": "model",
    "sft_train": "sft_train.jsonl",
    "prompts_train": "prompts_train.jsonl",
    "teacher": "teacher.jsonl",
    "ift": "ift.jsonl",
    "eft": "eft.jsonl",
    "judge_template": "judge_template.txt",
    "eval": "eval.jsonl",
    "eval_prompts": "eval_prompts.jsonl",
    "alpaca_eval": "alpaca_eval.json",
    "lm_eval": "lm_eval",
    "tiny_gen": "lm_eval/tiny_gen.yaml",
    "tiny_mc": "lm_eval/tiny_mc.yaml",
    "build": "build.json",
}


def is_tiny_ref(ref: str) -> bool:
    return ref == "tiny" or ref.startswith("tiny:")


def built_path(ref: str, seed: int = 0, params: TinyParams | None = None) -> Path | None:
    """Path of a tiny-world reference if the world is already built (never builds)."""
    name = "model" if ref == "tiny" else ref[len("tiny:"):]
    root = cache_root() / "tiny" / cache_key(seed, params)
    return root / FILES[name] if root.is_dir() and name in FILES else None


def resolve(ref: str, seed: int = 0, params: TinyParams | None = None) -> Path:
    """Path of a tiny-world reference: "tiny" (the model directory) or "tiny:<name>"
    (see FILES), building the world first if needed."""
    if not is_tiny_ref(ref):
        raise ValueError(f"not a tiny-world reference: {ref!r} (expected 'tiny' or 'tiny:<name>')")
    name = "model" if ref == "tiny" else ref[len("tiny:"):]
    if name not in FILES:
        raise ValueError(f"unknown tiny-world file {name!r}; known: {', '.join(FILES)}")
    return ensure_tiny(seed, params) / FILES[name]
