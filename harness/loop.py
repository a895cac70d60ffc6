"""The only iteration loop: [init SFT] -> evaluate 0 -> per iteration t:
generate -> judge (if the method needs one) -> pairs -> train -> evaluate.

Every stage is a ``store.Stage``: skipped when finished with the same inputs,
an error when finished with different ones, resumed from its JSONL log when
interrupted. Stage inputs name the config fields they depend on plus the
output hashes of the stages they consume, so a change anywhere upstream is
caught, and models are loaded only when some stage has work to do.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from harness import console, store
from harness.config import Config, dict_hash
from harness.data import load_examples
from harness.generate import Prompt, generate
from harness.judges.base import JudgeItem
from harness.methods.base import Group, IterationContext
from harness.models import load_policy, offline_env
from harness.sources import identity, locate, materialize, resolve_ref
from harness.registry import METHODS
from harness.schema import to_dict

log = logging.getLogger("harness")


@dataclass
class Policy:
    """model_t as a chain of saved adapters plus a content id for cache keys."""
    adapters: list[Path]
    id: str


class Runner:
    def __init__(self, cfg: Config, run_dir: Path | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.run_dir)
        self.method = METHODS.get(cfg.method.name)
        self.c = cfg.to_dict()
        self._loaded: tuple[tuple, object, object] | None = None
        self._examples = None
        # resolved once: every stage loads the same build / conversion
        source = locate(cfg.model.base, cfg.model.gguf_file)
        self.base_path = materialize(source)
        self.base_identity = identity(source, cfg.model.revision)

    # ----- helpers -------------------------------------------------------
    def model(self, policy: Policy):
        key = tuple(map(str, policy.adapters))
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # free the previous model first
            model, tok = load_policy(self.cfg, policy.adapters, base=self.base_path)
            self._loaded = (key, model, tok)
        return self._loaded[1], self._loaded[2]

    @property
    def examples(self):
        if self._examples is None:
            self._examples = load_examples(self.cfg.data)
        return self._examples

    def stage(self, t: int, name: str, config_keys: tuple[str, ...], upstream: dict) -> store.Stage:
        inputs = {"config": {k: self._pick(k) for k in config_keys}, "upstream": upstream}
        return store.Stage(self.run_dir, t, name, inputs)

    def _pick(self, dotted: str):
        node = self.c
        for part in dotted.split("."):
            node = node[part]
        return node

    def context(self, t: int, policy: Policy | None = None, scale=(1.0, 5.0)) -> IterationContext:
        def pairs_of(k: int) -> list[dict]:
            return store.read_jsonl(self.run_dir / f"iter_{k:03d}" / "pairs" / "pairs.jsonl")

        def gen(prompts, sampling, tag):
            model, tok = self.model(policy)
            return generate(model, tok, prompts, sampling, seed_key=(self.cfg.experiment.seed, t, tag),
                            batch_size=self.cfg.generation.batch_size, desc=f"iter {t} {tag}")

        return IterationContext(self.cfg, t, self.examples, scale, pairs_of, gen)

    # ----- stages --------------------------------------------------------
    def init_stage(self) -> Policy:
        # the base model's content, not its name: a rebuilt tiny world or a replaced local
        # checkpoint must not reuse stages computed from the old weights
        base_id = dict_hash({"model": self.c["model"], "lora": self.c["lora"],
                             "weights": self.base_identity,
                             "chat_template": store.path_fingerprint(resolve_ref(self.cfg.model.chat_template))
                             if self.cfg.model.chat_template else ""})
        data = self.method.init_sft_data(self.cfg)
        if not data:
            return Policy([], base_id)
        st = self.stage(0, "init_sft", ("model", "lora", "training", "method", "experiment.seed"),
                        {"data": dict_hash(data)})
        if not st.done():
            from harness.train import train_sft

            work = st.begin()
            model, tok = self.model(Policy([], base_id))
            metrics = train_sft(model, tok, data, self.cfg, 0, work)
            self._loaded = None  # the object was wrapped by training; reload from disk
            st.commit({"adapter_hash": store.file_hash(work / "adapter"), "metrics": _numeric(metrics)})
        return Policy([st.final / "adapter"], dict_hash([base_id, st.outputs()["adapter_hash"]]))

    def generate_stage(self, t: int, policy: Policy):
        ctx = self.context(t, policy)
        prompts = self.method.prompts(ctx)
        sampling = self.method.sampling(self.cfg)
        st = self.stage(t, "generate", ("data", "generation", "method", "experiment.seed"),
                        {"policy": policy.id, "prompts": dict_hash([[e.id, e.messages] for e in prompts])})
        if not st.done():
            work = st.begin()
            model, tok = self.model(policy)
            glog = store.JsonlLog(work / "samples.jsonl")
            resumed = len(glog.records)  # records kept from an interrupted attempt
            records = generate(model, tok, [Prompt(e.id, e.messages) for e in prompts], sampling,
                               seed_key=(self.cfg.experiment.seed, t, "generate"),
                               batch_size=self.cfg.generation.batch_size, log=glog, desc=f"iter {t} generate")
            tokens = sum(s["n_tokens"] for r in records.values() for s in r["samples"])
            store.write_jsonl(work / "prompts.jsonl", [{"id": e.id, "messages": e.messages, "response": e.response}
                                                       for e in prompts])
            st.commit({"hash": store.file_hash(work / "samples.jsonl"), "resumed_records": resumed,
                       "metrics": {"gen/tokens": tokens}})
        records = {r["id"]: r for r in store.read_jsonl(st.final / "samples.jsonl")}
        groups = [Group(e, self.method.candidates(ctx, e, [s["text"] for s in records[e.id]["samples"]]))
                  for e in prompts]
        return st, groups, ctx

    def judge_stage(self, t: int, policy: Policy, gen_stage, groups: list[Group]):
        from harness.judges import build_judge, require_coverage
        from harness.judging import judge_groups

        st = self.stage(t, "judge", ("judge", "method", "experiment.seed"),
                        {"generate": gen_stage.outputs()["hash"], "policy": policy.id})
        judge_policy = None
        if not st.done():
            work = st.begin()
            if self.cfg.judge.name == "self":
                judge_policy = self.model(policy)
            judge = build_judge(self.cfg.judge, policy=judge_policy, identity_extra=policy.id,
                                seed_key=(self.cfg.experiment.seed, t, "judge"))
            # transport failures are not written: the stage fails naming them, a rerun retries only them
            judged = judge_groups(judge, groups, store.JsonlLog(work / "judgments.jsonl"),
                                  batch_size=self.cfg.judge.batch_size, what=f"judging of iteration {t}",
                                  desc=f"iter {t} judge")
            recs, n_items = judged.records, judged.n_items
            n_failed = sum(r["failed"] for r in recs)  # unparsable answers: kept, counted, shown
            if judged.parse_summary():
                log.warning(judged.parse_summary())
            if n_items:  # the judgments stay in the .tmp log for the next attempt when this raises
                require_coverage(n_items - n_failed, n_items, self.cfg.judge.min_coverage, f"judging of iteration {t}")
            scores = [s for r in recs for s in r["scores"] if s is not None]
            metrics = {"judge/n_items": n_items, "judge/n_failed": n_failed,
                       "judge/coverage": (n_items - n_failed) / n_items if n_items else None,
                       "judge/score_mean": sum(scores) / len(scores) if scores else None,
                       **oracle_agreement(self.cfg.judge.name, groups, recs)}
            st.commit({"hash": store.file_hash(work / "judgments.jsonl"), "metrics": metrics,
                       "scale": list(judge.scale)})
        by_id = {r["id"]: r for r in store.read_jsonl(st.final / "judgments.jsonl")}
        for g in groups:
            g.scores = by_id[g.example.id]["scores"]
        return st

    def pairs_stage(self, t: int, ctx: IterationContext, groups: list[Group], upstream: dict):
        st = self.stage(t, "pairs", ("method", "experiment.seed"), upstream)
        if not st.done():
            work = st.begin()
            pairs, stats = self.method.build_pairs(ctx, groups)
            store.write_jsonl(work / "pairs.jsonl", pairs)
            st.commit({"hash": store.file_hash(work / "pairs.jsonl"), "metrics": _numeric(stats)})
        return st

    def train_stage(self, t: int, policy: Policy, ctx: IterationContext) -> tuple[store.Stage, Policy]:
        from harness.train import train_dpo

        pairs = self.method.training_set(ctx)
        st = self.stage(t, "train", ("training", "lora", "method", "model", "experiment.seed"),
                        {"policy": policy.id, "pairs": dict_hash(pairs)})
        if not st.done():
            work = st.begin()
            model, tok = self.model(policy)
            metrics, _ = train_dpo(model, tok, pairs, self.cfg, t, work)
            self._loaded = None  # trl wrapped or changed the object; the next user reloads from disk
            store.write_jsonl(work / "log_history.jsonl", metrics.pop("log_history"))
            st.commit({"adapter_hash": store.file_hash(work / "adapter"), "metrics": _numeric(metrics)})
        new = Policy(_chain(self.cfg, policy.adapters, st.final / "adapter"),
                     dict_hash([policy.id, st.outputs()["adapter_hash"]]))
        return st, new

    def evaluate_stage(self, t: int, policy: Policy) -> store.Stage:
        from harness.evaluate import evaluate_iteration
        from harness.judges import build_judge

        st = self.stage(t, "evaluate", ("eval", "generation", "model", "data.system_prompt", "experiment.seed"),
                        {"policy": policy.id})
        if not st.done():
            work = st.begin()
            model, tok = self.model(policy)
            metrics = evaluate_iteration(model, tok, self.cfg, work, t,
                                         lambda section: build_judge(section, seed_key=(self.cfg.experiment.seed, t, "alpaca_eval")))
            st.commit({"metrics": metrics})
        return st

    # ----- the loop ------------------------------------------------------
    def run(self) -> list[dict]:
        offline_env()
        if self.cfg.model.cpu_threads:
            import torch

            torch.set_num_threads(self.cfg.model.cpu_threads)
        from harness import provenance
        from harness.evaluate import check_thresholds

        prov = provenance.collect(self.cfg, {"base": self.base_identity, "judge": to_dict(self.cfg.judge)})
        store.atomic_write_json(self.run_dir / "provenance.json", prov)
        store.atomic_write_json(self.run_dir / "config.json", {"hash": self.cfg.hash(), "config": self.c})
        rows: list[dict] = []
        t0 = time.perf_counter()
        # each stage is one terminal line, summarised from its manifest (harness.console)
        with console.stage("iter 0", "init_sft") as line:
            policy = self.init_stage()
            line.report(self.run_dir / "iter_000" / "init_sft")
        with console.stage("iter 0", "evaluate") as line:
            ev = self.evaluate_stage(0, policy)
            line.report(ev.final)
        rows.append(self._row(0, [ev], prov))
        self._write_results(rows)
        for t in range(1, self.cfg.method.iterations + 1):
            it = f"iter {t}"
            with console.stage(it, "generate") as line:
                gen, groups, ctx = self.generate_stage(t, policy)
                line.report(gen.final)
            stages = [gen]
            upstream = {"generate": gen.outputs()["hash"]}
            if self.method.needs_judge:
                with console.stage(it, "judge") as line:
                    judge = self.judge_stage(t, policy, gen, groups)
                    line.report(judge.final)
                ctx.judge_scale = tuple(judge.outputs()["scale"])
                stages.append(judge)
                upstream["judge"] = judge.outputs()["hash"]
            with console.stage(it, "pairs") as line:
                stages.append(self.pairs_stage(t, ctx, groups, upstream))
                line.report(stages[-1].final)
            with console.stage(it, "train") as line:
                train, policy = self.train_stage(t, policy, ctx)
                line.report(train.final)
            with console.stage(it, "evaluate") as line:
                ev = self.evaluate_stage(t, policy)
                line.report(ev.final, baseline=self.run_dir / "iter_000" / "evaluate")
            stages += [train, ev]
            rows.append(self._row(t, stages, prov))
            self._write_results(rows)
            warnings = check_thresholds(rows[-1]["metrics"], self.cfg.eval.indicators)
            if warnings and self.cfg.eval.indicators.action == "stop":
                log.warning("stopping after iteration %d: %s", t, "; ".join(warnings))
                break
        final = self.method.select_final(self.cfg, rows)
        store.atomic_write_json(self.run_dir / "final.json", final or {"iteration": rows[-1]["iteration"],
                                                                        "metric": None, "value": None})
        log.info("run finished in %.1fs", time.perf_counter() - t0)
        return rows

    def _row(self, t: int, stages: list[store.Stage], prov: dict) -> dict:
        metrics: dict = {}
        wall = 0.0
        for st in stages:
            out = st.outputs()
            metrics.update(out.get("metrics", {}))
            wall += out.get("seconds", 0.0)
        metrics["wall_time_s"] = round(wall, 2)
        return {"experiment": self.cfg.experiment.name, "method": self.cfg.method.name, "iteration": t,
                "model": self.cfg.model.base, "metrics": metrics,
                "provenance": {**{k: prov[k] for k in ("config_hash", "seed", "versions", "git_commit", "git_dirty")},
                               "model": self.base_identity}}

    def _write_results(self, rows: list[dict]) -> None:
        store.write_jsonl(self.run_dir / "results.jsonl", rows)


def _chain(cfg: Config, adapters: list[Path], new: Path) -> list[Path]:
    """merge: every adapter in order; continue: the newest carries the earlier ones."""
    return adapters + [new] if cfg.chain == "merge" else [new]


def _numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, type(None))) and not isinstance(v, bool)}


def oracle_agreement(judge_name: str, groups: list[Group], recs: list[dict]) -> dict:
    """Agreement of the judge with the tiny world's rule-based oracle, where the
    oracle understands the prompts: the share of candidate pairs both order
    strictly that they order the same way."""
    if judge_name == "oracle":
        return {}
    try:
        from harness.tiny.oracle import OracleJudge
    except ImportError:
        return {}
    oracle = OracleJudge()
    agree = total = 0
    for g, r in zip(groups, recs):
        truth = oracle.score([JudgeItem(g.example.id, g.example.instruction, c.text) for c in g.candidates])
        for i in range(len(g.candidates)):
            for j in range(i + 1, len(g.candidates)):
                a, b = r["scores"][i], r["scores"][j]
                ta, tb = truth[i].score, truth[j].score
                if None in (a, b, ta, tb) or a == b or ta == tb:
                    continue
                total += 1
                agree += (a > b) == (ta > tb)
    return {"judge/oracle_pair_agreement": agree / total if total else None, "judge/oracle_pairs": total}


def run_experiment(cfg: Config, fresh: bool = False) -> tuple[Path, list[dict]]:
    run_dir = cfg.run_dir
    if fresh and run_dir.exists():
        n = 2
        while run_dir.with_name(f"{run_dir.name}-{n}").exists():
            n += 1
        run_dir = run_dir.with_name(f"{run_dir.name}-{n}")
    with store.run_lock(run_dir):
        console.log_to(run_dir / console.LOG_NAME)  # everything silenced on the terminal, and tracebacks
        with console.stage("", "setup") as line:
            runner = Runner(cfg, run_dir)
            line.done(f"run directory {run_dir} · model {runner.base_path}")
        rows = runner.run()
    return run_dir, rows


def status(run_dir: Path) -> list[dict]:
    """Finished / partial / missing stages of a run directory, for ``harness status``."""
    out = []
    for it in sorted(run_dir.glob("iter_*")):
        for st in sorted(it.iterdir()):
            if st.name.endswith(".tmp"):
                logs = [p.name for p in st.glob("*.jsonl")]
                n = sum(1 for p in st.glob("*.jsonl") for _ in open(p))
                out.append({"iteration": int(it.name[5:]), "stage": st.name[:-4], "state": "partial",
                            "detail": f"{n} records in {', '.join(logs)}" if logs else ""})
            elif (st / "manifest.json").exists():
                m = json.loads((st / "manifest.json").read_text())
                out.append({"iteration": int(it.name[5:]), "stage": st.name, "state": "done",
                            "detail": f"inputs {m['input_hash']}"})
    return out
