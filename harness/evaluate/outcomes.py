"""Per-item outcomes of an evaluation, in one stable file, and paired statistics over them.

Every evaluate / validation stage writes ``items.jsonl``: one line per (metric, item)::

    {"metric": "lm_eval/tiny_mc/acc", "item": "<id>", "value": 1.0}

- lm-eval: every per-sample metric of ``lm_eval/samples_<task>.jsonl`` under the filter the results
  report (the task's primary one), named as in the results rows (``lm_eval/<task>/<metric>``), the
  item being lm-eval's ``doc_hash`` (the same document has the same id in every iteration and run);
- AlpacaEval: ``alpaca_eval/win_rate`` per instruction id, the value being
  ``100 * (preference - 1)`` (so the mean over items is the win rate; a tie is 50);
- MT-Bench: ``mt_bench/score`` per turn ("<question id>/turn_<n>"), and ``mt_bench/turn_1`` /
  ``mt_bench/turn_2`` per question id, the judge's valid rating (FastChat's -1 left out);
- validation prompts: ``validation/judge/score_mean`` per prompt id, the judge's score.

Items join across iterations, seeds and runs by (metric, item). ``paired`` compares two runs on
their shared items (the standard error of the mean difference, Miller 2024, "Adding Error Bars
to Evals"), through ``scipy.stats``; ``across_seeds`` gives mean, standard deviation and count of
one number over seeds. Each item here is one prompt judged once (AlpacaEval's "both" positions
are already averaged into one preference), so no item shares a prompt with another and the
clustered standard error equals the plain paired one.

This module reads and computes; the tables that show the results are ``harness.report``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from scipy import stats

from harness.evaluate.lm_eval_adapter import primary_key
from harness.store.rundir import RunDir
from harness.store.files import read_json, read_jsonl, write_jsonl

ITEMS = "items.jsonl"


def write_items(stage_dir: Path, prefix: str = "") -> int:
    """Collect the per-item outcomes of an evaluation's files under ``stage_dir`` into
    ``stage_dir/items.jsonl`` (``prefix``: "validation/" for the validation stage). Returns the
    number of lines."""
    stage_dir = Path(stage_dir)
    rows: list[dict] = []
    lm = stage_dir / "lm_eval"
    results = read_json(lm / "results.json") if (lm / "results.json").exists() else {}
    for f in sorted(lm.glob("samples_*.jsonl")) if lm.is_dir() else []:
        task = f.stem.removeprefix("samples_")
        if task not in results.get("configs", {}):
            continue
        _, filt = primary_key(results["configs"][task])  # the filter whose numbers the results report
        for s in read_jsonl(f):
            if s.get("filter", "none") != filt:
                continue
            for metric in s.get("metrics", []):
                v = s.get(metric)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    rows.append({"metric": f"{prefix}lm_eval/{task}/{metric}", "item": s["doc_hash"], "value": float(v)})
    ann = stage_dir / "alpaca_eval" / "annotations.json"
    if ann.exists():
        for a in read_json(ann):
            p = a.get("preference")
            if isinstance(p, (int, float)) and math.isfinite(p):
                rows.append({"metric": f"{prefix}alpaca_eval/win_rate", "item": a["id"], "value": 100 * (p - 1)})
    mt = stage_dir / "mt_bench" / "judgments.json"
    if mt.exists():
        for j in read_json(mt):
            score = j.get("score")
            if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score) and score != -1:
                rows.append({"metric": f"{prefix}mt_bench/score", "item": f"{j['question_id']}/turn_{j['turn']}",
                             "value": float(score)})
                rows.append({"metric": f"{prefix}mt_bench/turn_{j['turn']}", "item": str(j["question_id"]),
                             "value": float(score)})
    judged = stage_dir / "judge" / "judgments.jsonl"
    if judged.exists():
        for r in read_jsonl(judged):
            scores = [s for s in r.get("scores", []) if isinstance(s, (int, float)) and math.isfinite(s)]
            if scores:
                rows.append({"metric": f"{prefix}judge/score_mean", "item": r["id"], "value": scores[0]})
    write_jsonl(stage_dir / ITEMS, rows)
    return len(rows)


def read_items(stage_dir: Path) -> dict[str, dict[str, float]]:
    """{metric: {item: value}} of a stage's items.jsonl (empty when it has none)."""
    path = Path(stage_dir) / ITEMS
    out: dict[str, dict[str, float]] = {}
    if path.exists():
        for r in read_jsonl(path):
            out.setdefault(r["metric"], {})[r["item"]] = r["value"]
    return out


@dataclass(frozen=True)
class Paired:
    """b - a on the items both have: mean difference, its standard error and 95% interval."""
    n: int
    mean: float
    se: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """The 95% interval excludes 0."""
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "se": self.se, "ci_low": self.low, "ci_high": self.high,
                "significant": self.significant}


def paired(a: dict[str, float], b: dict[str, float], confidence: float = 0.95) -> Paired | None:
    """The paired difference b - a over the shared items (scipy's ``ttest_rel``: Student-t
    interval with n - 1 degrees of freedom), or None with fewer than two shared items. With every
    difference equal the standard error is 0 and the interval a point."""
    shared = sorted(set(a) & set(b))
    if len(shared) < 2:
        return None
    xa, xb = [a[k] for k in shared], [b[k] for k in shared]
    d = [y - x for x, y in zip(xa, xb)]
    mean = math.fsum(d) / len(d)
    if all(x == d[0] for x in d):  # no spread (scipy would warn): the interval is a point
        return Paired(len(d), mean, 0.0, mean, mean)
    se = float(stats.sem(d))
    ci = stats.ttest_rel(xb, xa).confidence_interval(confidence)
    return Paired(len(d), mean, se, float(ci.low), float(ci.high))


@dataclass(frozen=True)
class Spread:
    """One number over seeds: mean, standard deviation between seeds (ddof 1) and count."""
    n: int
    mean: float
    sd: float | None


def across_seeds(values: Sequence[float]) -> Spread | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return None
    mean = math.fsum(vals) / len(vals)
    if len(vals) < 2:
        return Spread(len(vals), mean, None)
    if all(v == vals[0] for v in vals):  # scipy warns of precision loss on identical values
        return Spread(len(vals), mean, 0.0)
    return Spread(len(vals), mean, float(stats.tstd(vals)))


def gains_at(run_dir: Path, t: int, stage: str = "evaluate") -> dict[str, dict]:
    """{metric: iteration t - iteration 0 of one run on their shared items (``Paired.to_dict``)};
    empty for iteration 0. A results row carries it as ``row["paired"]``."""
    if t == 0:
        return {}
    base = read_items(RunDir(run_dir).stage(0, stage))
    items = read_items(RunDir(run_dir).stage(t, stage))
    return {m: p.to_dict() for m, vals in sorted(items.items()) if m in base and (p := paired(base[m], vals))}


def compare(run_a: Path, run_b: Path, iteration: int | None = None, stage: str = "evaluate") -> list[dict]:
    """Run B - run A at one iteration (default: the last both finished) on their shared items:
    one row per metric both have, {metric, iteration, n, mean, se, ci_low, ci_high, significant}."""
    def done(run: Path) -> set[int]:
        return {t for t, d in RunDir(run).stage_dirs() if d.name == stage and (d / ITEMS).exists()}

    common = done(run_a) & done(run_b)
    if iteration is None:
        if not common:
            return []
        iteration = max(common)
    a = read_items(RunDir(run_a).stage(iteration, stage))
    b = read_items(RunDir(run_b).stage(iteration, stage))
    return [{"metric": m, "iteration": iteration, **p.to_dict()}
            for m in sorted(set(a) & set(b)) if (p := paired(a[m], b[m])) is not None]
