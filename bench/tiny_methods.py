"""The three methods on the tiny world against the baselines their papers compare with.

    .venv/bin/python bench/tiny_methods.py [spin] [self_rewarding] [dno] [--experiments experiments/smollm2]

``--experiments`` picks the directory of experiment files (default ``experiments/tiny``; the
SmolLM2 files use the same tasks, oracle and metrics, so the same controls apply).

- spin: exact match of iteration 0 vs the last iteration, against a control that continues
  plain SFT on the same human answers for the same number of optimizer steps (SPIN's comparison).
- self_rewarding: per-iteration exact match and the self-judge's pairwise agreement with the oracle.
- dno: per-iteration exact match of DNO vs a single-iteration DPO run on all of DNO's prompts at once
  (the pairs each run trained on are counted and printed: they are matched by construction only
  approximately, since the margin filter decides how many survive), and vs a broken DNO whose judge
  is the oracle turned upside down (score 6 - s): the world is meant to reward a method that works
  and not one that is broken.

Runs go to results/bench/ (resumable like any run); every figure printed comes from this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from harness.config import experiment as config
from harness.run.loop import Runner
from harness.store.files import run_lock

EM = "lm_eval/tiny_gen/exact_match"
OUT = Path("results/bench")
EXPERIMENTS = Path("experiments/tiny")


def run(cfg) -> list[dict]:
    """Run under results/bench/ with a "bench-" name, so leaderboards never confuse it with a user run."""
    exp = cfg.experiment
    name = exp.name if exp.name.startswith("bench-") else f"bench-{exp.name}"
    cfg = dataclasses.replace(cfg, experiment=dataclasses.replace(exp, output_dir=str(OUT), name=name))
    with run_lock(cfg.run_dir):
        return Runner(cfg).run()


def em_row(rows, key=EM) -> str:
    return " -> ".join(f"{r['metrics'].get(key, float('nan')):.3f}" for r in rows)


def bench_spin(experiments: Path = EXPERIMENTS) -> None:
    from harness.models.data import load_examples
    from harness.evaluate import run_lm_eval
    from harness.models.load import load_policy
    from harness.train import train_sft

    cfg = config.load(experiments / "spin.toml")
    rows = run(cfg)
    steps = sum(int(r["metrics"].get("train/steps", 0)) for r in rows)
    control_dir = OUT / f"bench-{cfg.experiment.name}-sft-control"
    result = control_dir / "metrics.json"
    if not result.exists():
        examples = load_examples(cfg.data, seed=cfg.experiment.seed)
        data = [{"messages": list(e.messages), "response": e.response} for e in examples]
        model, tok = load_policy(cfg, [])
        train_sft(model, tok, data, cfg, 1, control_dir, max_steps=steps)
        model, tok = load_policy(dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, chain="merge")),
                                 [control_dir / "adapter"])
        metrics = run_lm_eval(model, tok, cfg.eval, control_dir / "lm_eval")
        result.write_text(json.dumps(metrics))
    control = json.loads(result.read_text())
    print(f"SPIN  exact match by iteration: {em_row(rows)}  ({steps} optimizer steps in total)")
    print(f"SFT control, same data, {steps} steps: {rows[0]['metrics'][EM]:.3f} -> {control[EM]:.3f}")


def bench_self_rewarding(experiments: Path = EXPERIMENTS) -> None:
    rows = run(config.load(experiments / "self_rewarding.toml"))
    print(f"Self-Rewarding exact match by iteration: {em_row(rows)}")
    for r in rows[1:]:
        m = r["metrics"]
        print(f"  iteration {r['iteration']}: pairs {m.get('pairs/n_pairs')}, ties dropped {m.get('pairs/ties_dropped')}, "
              f"judge coverage {m.get('judge/coverage')}, self-judge vs oracle pairwise agreement "
              f"{m.get('judge/oracle_pair_agreement')} over {m.get('judge/oracle_pairs')} pairs")


class _Inverted:
    """A broken judge: the wrapped judge's scores mirrored on its scale (best becomes worst)."""

    def __init__(self, judge):
        self.judge, self.name, self.scale = judge, f"inverted-{judge.name}", judge.scale

    def score(self, items):
        lo, hi = self.scale
        return [dataclasses.replace(v, score=None if v.score is None else lo + hi - v.score)
                for v in self.judge.score(items)]


def run_with_inverted_judge(cfg) -> list[dict]:
    """``cfg`` run with its method judge inverted; evaluation judges are left as they are."""
    import harness.judges as judges

    build = judges.build_judge

    def broken(section, **kw):
        judge = build(section, **kw)
        return _Inverted(judge) if section is cfg.judge else judge

    judges.build_judge = broken
    try:
        return run(cfg)
    finally:
        judges.build_judge = build


def bench_dno(experiments: Path = EXPERIMENTS) -> None:
    cfg = config.load(experiments / "dno.toml")
    rows = run(cfg)
    o = cfg.options
    one = dataclasses.replace(
        cfg, experiment=dataclasses.replace(cfg.experiment, name=f"{cfg.experiment.name}-single-iteration-dpo"),
        method=dataclasses.replace(cfg.method, iterations=1),
        options=dataclasses.replace(o, prompts_per_iteration=o.prompts_per_iteration * cfg.method.iterations,
                                    replay=()))
    base = run(one)
    broken = run_with_inverted_judge(dataclasses.replace(
        cfg, experiment=dataclasses.replace(cfg.experiment, name=f"{cfg.experiment.name}-inverted-judge")))
    dno_pairs = sum(int(r["metrics"].get("train/n_pairs", 0)) for r in rows)
    print(f"DNO   exact match by iteration: {em_row(rows)}  (trained on {dno_pairs} pairs in total, replay included)")
    print(f"1-iteration DPO on the same prompts: {em_row(base)}  ({base[-1]['metrics'].get('train/n_pairs')} pairs)")
    print(f"DNO with an inverted judge (broken): {em_row(broken)}")
    print(f"DNO final iterate: {json.loads((OUT / ('bench-' + cfg.experiment.name) / 'final.json').read_text())}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", nargs="*", default=["spin", "self_rewarding", "dno"])
    ap.add_argument("--experiments", type=Path, default=EXPERIMENTS, help="directory of spin/self_rewarding/dno.toml")
    args = ap.parse_args()
    for name in args.which:
        {"spin": bench_spin, "self_rewarding": bench_self_rewarding, "dno": bench_dno}[name](args.experiments)


if __name__ == "__main__":
    main()
