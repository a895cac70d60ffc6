"""The only iteration loop: [init SFT] -> evaluate 0 -> per iteration t:
[self_instruct] -> generate -> judge (if the method needs one) -> pairs -> train
-> evaluate [-> validation]. After the last iteration the method picks the final
iterate (final.json; ``metrics["selected"]`` marks its results row).

Every stage is a ``store.Stage``: skipped when finished with the same inputs,
an error when finished with different ones, resumed from its JSONL log when
interrupted. Stage inputs name the config fields they depend on plus the
output hashes of the stages they consume, so a change anywhere upstream is
caught, and models are loaded only when some stage has work to do.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

from harness import console, cost, store
from harness.config import Config, EvalSection
from harness.data import Example, load_examples
from harness.generate import SAMPLER, Prompt, generate, generation_settings
from harness.judges import judge_scale
from harness.judges.oracle import OracleJudge
from harness.judges.base import JudgeItem
from harness.methods.base import Group, IterationContext
from harness.models import load_model, load_policy, load_tokenizer, offline_env
from harness.sources import identity, locate, materialize, resolve_ref
from harness.methods import METHODS
from harness.schema import to_dict
from harness.store import dict_hash

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
            self._examples = load_examples(self.cfg.data, seed=self.cfg.experiment.seed)
        return self._examples

    def stage(self, t: int, name: str, config_keys: tuple[str, ...], upstream: dict) -> store.Stage:
        inputs = {"config": {k: self._pick(k) for k in config_keys}, "upstream": upstream}
        return store.Stage(self.run_dir, t, name, inputs)

    def _pick(self, dotted: str):
        node = self.c
        for part in dotted.split("."):
            node = node[part]
        return node

    def context(self, t: int) -> IterationContext:
        def pairs_of(k: int) -> list[dict]:
            return store.read_jsonl(self.run_dir / f"iter_{k:03d}" / "pairs" / "pairs.jsonl")

        # the judge's scale from its configuration, before any candidate is built
        scale = judge_scale(self.cfg.judge) if self.cfg.judge.name != "none" else None
        return IterationContext(self.cfg, t, self.examples, scale, pairs_of)

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
        settings = self.method.init_sft_settings(self.cfg)
        st = self.stage(0, "init_sft", ("model", "lora", "training", "method", "experiment.seed"),
                        {"data": dict_hash(data)})
        if not st.done():
            from harness.train import train_sft

            work = st.begin()
            model, tok = self.model(Policy([], base_id))
            metrics = train_sft(model, tok, data, self.cfg, 0, work, settings=settings)
            self._loaded = None  # the object was wrapped by training; reload from disk
            store.write_jsonl(work / "log_history.jsonl", metrics.pop("log_history"))
            t = self.cfg.training  # what the SFT stage shares with the DPO iterations
            st.commit({"adapter_hash": store.file_hash(work / "adapter"),
                       "metrics": {**_numeric(metrics), "train/n_examples": len(data)},
                       "settings": {**to_dict(settings), "optimizer": t.optimizer, "weight_decay": t.weight_decay,
                                    "max_grad_norm": t.max_grad_norm, "lora_dropout": self.cfg.lora.dropout}})
        return Policy([st.final / "adapter"], dict_hash([base_id, st.outputs()["adapter_hash"]]))

    def self_instruct_stage(self, t: int, policy: Policy, ctx: IterationContext
                            ) -> tuple[store.Stage | None, list[Example]]:
        """New prompts written few-shot (the method's ``self_instruct`` plan) by the policy or a
        fixed model, resumable like generation; the generate stage reads its prompts.jsonl."""
        plan = self.method.self_instruct(ctx)
        if plan is None:
            return None, []
        if plan.model:
            src = locate(plan.model)
            writer = {"model": plan.model, "revision": plan.revision, "weights": identity(src, plan.revision)}
        else:
            writer = {"policy": policy.id}
        st = self.stage(t, "self_instruct", ("method", "model.dtype", "model.device", "generation.batch_size",
                                             "experiment.seed"),
                        {"writer": writer, "sampling": to_dict(plan.sampling),
                         "requests": dict_hash([[r.id, r.messages] for r in plan.requests])})
        if not st.done():
            work = st.begin()
            if plan.model:
                model = load_model(plan.model, revision=plan.revision, dtype=self.cfg.model.dtype,
                                   device=self.cfg.model.device)
                tok = load_tokenizer(plan.model, plan.revision)
            else:
                model, tok = self.model(policy)
            out = generate(model, tok, plan.requests, plan.sampling, seed_key=(self.cfg.experiment.seed, t, "self_instruct"),
                           batch_size=self.cfg.generation.batch_size, log=store.JsonlLog(work / "outputs.jsonl"),
                           desc=f"iter {t} self_instruct")
            del model, tok
            new = plan.select(out)
            store.write_jsonl(work / "prompts.jsonl", [{"id": e.id, "messages": e.messages} for e in new])
            st.commit({"hash": store.file_hash(work / "prompts.jsonl"), "writer": writer,
                       "metrics": {"self_instruct/n_requests": len(plan.requests), "self_instruct/n_prompts": len(new)}})
        return st, [Example(r["id"], tuple(r["messages"])) for r in store.read_jsonl(st.final / "prompts.jsonl")]

    def generate_stage(self, t: int, policy: Policy, ctx: IterationContext, extra: list[Example]):
        prompts = self.method.prompts(ctx) + extra  # extra: the self_instruct stage's prompts
        sampling = self.method.sampling(self.cfg)
        st = self.stage(t, "generate", ("data", "generation", "method", "experiment.seed"),
                        {"policy": policy.id, "prompts": dict_hash([[e.id, e.messages] for e in prompts]),
                         "sampler": SAMPLER})
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
                       "metrics": {"gen/tokens": tokens}, "generation": generation_settings(model, tok, sampling)})
        records = {r["id"]: r for r in store.read_jsonl(st.final / "samples.jsonl")}
        groups = [Group(e, self.method.candidates(ctx, e, [s["text"] for s in records[e.id]["samples"]]))
                  for e in prompts]
        return st, groups

    def judge_stage(self, t: int, policy: Policy, gen_stage, groups: list[Group], scale: tuple[float, float]):
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
            if tuple(judge.scale) != tuple(scale):
                raise RuntimeError(f"judge {judge.name!r} scores on {judge.scale}, but the method was told "
                                   f"{scale} (harness.judges.judge_scale disagrees with the judge)")
            # transport failures are not written: the stage fails naming them, a rerun retries only them
            judged = judge_groups(judge, groups, store.JsonlLog(work / "judgments.jsonl"),
                                  batch_size=self.cfg.judge.batch_size, what=f"judging of iteration {t}",
                                  desc=f"iter {t} judge")
            recs, n_items = judged.records, judged.n_items
            n_failed = judged.n_parse_failed  # items without a valid score: kept, counted, shown
            if judged.parse_summary():
                log.warning(judged.parse_summary())
            if n_items:  # the judgments stay in the .tmp log for the next attempt when this raises
                require_coverage(n_items - n_failed, n_items, self.cfg.judge.min_coverage, f"judging of iteration {t}")
            # judged candidates only: automatic negatives carry a fixed score, not a judgment
            scores = [s for g, r in zip(groups, recs) for c, s in zip(g.candidates, r["scores"])
                      if c.fixed_score is None and s is not None]
            lo, hi = (v if math.isfinite(v) else None for v in scale)
            metrics = {**judged.metrics(), "judge/score_mean": sum(scores) / len(scores) if scores else None,
                       "judge/score_min": min(scores, default=None), "judge/score_max": max(scores, default=None),
                       "judge/scale_lo": lo, "judge/scale_hi": hi,
                       **oracle_agreement(self.cfg.judge.name, groups, recs)}
            st.commit({"hash": store.file_hash(work / "judgments.jsonl"), "metrics": metrics, "scale": [lo, hi]})
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

    def train_stage(self, t: int, policy: Policy, ctx: IterationContext, start: Policy
                    ) -> tuple[store.Stage, Policy]:
        """DPO from ``policy`` (model_t). The reference is model_t ("previous") or ``start``,
        the iteration-0 model ("base"); the stage's outputs name it."""
        from harness.train import train_dpo

        pairs = self.method.training_set(ctx)
        ref = start if self.cfg.method.reference == "base" else policy
        st = self.stage(t, "train", ("training", "lora", "method", "model", "experiment.seed"),
                        {"policy": policy.id, "reference": ref.id, "pairs": dict_hash(pairs)})
        if not st.done():
            work = st.begin()
            model, tok = self.model(policy)
            # model_t is trl's default reference; another one is passed as its chain of adapters
            reference = None if ref.adapters == policy.adapters else ref.adapters
            metrics, _ = train_dpo(model, tok, pairs, self.cfg, t, work, reference=reference, base=self.base_path)
            self._loaded = None  # trl wrapped or changed the object; the next user reloads from disk
            store.write_jsonl(work / "log_history.jsonl", metrics.pop("log_history"))
            metrics["train/n_replayed"] = sum(p.get("iteration", t) != t for p in pairs)
            adapter_hash = store.file_hash(work / "adapter")
            st.commit({"adapter_hash": adapter_hash, "metrics": _numeric(metrics),
                       "policy": policy.id, "trained": dict_hash([policy.id, adapter_hash]),
                       "reference": {"kind": self.cfg.method.reference, "policy": ref.id,
                                     "adapters": [str(p) for p in ref.adapters]}})
        new = Policy(_chain(self.cfg, policy.adapters, st.final / "adapter"),
                     dict_hash([policy.id, st.outputs()["adapter_hash"]]))
        return st, new

    def evaluate_stage(self, t: int, policy: Policy) -> store.Stage:
        from harness.evaluate import evaluate_iteration, iteration0_answers
        from harness.judges import build_judge

        upstream, reference = {"policy": policy.id, "sampler": SAMPLER}, None
        if t > 0 and self.cfg.eval.alpaca_eval.instructions and self.cfg.eval.alpaca_eval.reference == "iteration0":
            reference, upstream["reference"] = iteration0_answers(self.run_dir)
        st = self.stage(t, "evaluate", EVAL_KEYS + ("generation", "model", "data.system_prompt", "experiment.seed"),
                        upstream)
        if not st.done():
            work = st.begin()
            model, tok = self.model(policy)
            metrics = evaluate_iteration(model, tok, self.cfg, work, t,
                                         lambda section: build_judge(section, seed_key=(self.cfg.experiment.seed, t, "alpaca_eval")),
                                         reference=reference)
            st.commit({"metrics": metrics})
        return st

    def validation_stage(self, t: int, policy: Policy) -> store.Stage | None:
        """[eval.validation] (for choosing an iterate): its metrics are "validation/..."."""
        from harness.judges import build_judge
        from harness.selection import run_validation

        if not self.cfg.eval.validation.enabled:
            return None
        st = self.stage(t, "validation", ("eval.validation", "eval.batch_size", "eval.apply_chat_template",
                                          "generation", "model", "data.system_prompt", "experiment.seed"),
                        {"policy": policy.id})
        if not st.done():
            work = st.begin()
            model, tok = self.model(policy)
            metrics = run_validation(model, tok, self.cfg, work, t,
                                     lambda section: build_judge(section, seed_key=(self.cfg.experiment.seed, t,
                                                                                    "validation")))
            st.commit({"metrics": metrics})
        return st

    def evaluations(self, t: int, policy: Policy) -> list[store.Stage]:
        """The evaluate stage and, when configured, the validation stage of iteration ``t``."""
        with console.stage(f"iter {t}", "evaluate") as line:
            ev = self.evaluate_stage(t, policy)
            line.report(ev.final, baseline=self.run_dir / "iter_000" / "evaluate" if t else None)
        out = [ev]
        with console.stage(f"iter {t}", "validation") as line:
            val = self.validation_stage(t, policy)
            if val is None:
                line.skip()
            else:
                line.report(val.final, baseline=self.run_dir / "iter_000" / "validation" if t else None)
                out.append(val)
        return out

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
        start = policy  # the iteration-0 model: method.reference = "base" trains against it
        rows.append(self._row(0, self.evaluations(0, policy), prov))
        self._write_results(rows)
        for t in range(1, self.cfg.method.iterations + 1):
            it = f"iter {t}"
            ctx = self.context(t)
            stages = []
            with console.stage(it, "self_instruct") as line:
                si, extra = self.self_instruct_stage(t, policy, ctx)
                if si is None:
                    line.skip()
                else:
                    line.report(si.final)
                    stages.append(si)
            with console.stage(it, "generate") as line:
                gen, groups = self.generate_stage(t, policy, ctx, extra)
                line.report(gen.final)
            stages.append(gen)
            upstream = {"generate": gen.outputs()["hash"]}
            if self.method.needs_judge:
                with console.stage(it, "judge") as line:
                    judge = self.judge_stage(t, policy, gen, groups, ctx.scale())
                    line.report(judge.final)
                stages.append(judge)
                upstream["judge"] = judge.outputs()["hash"]
            with console.stage(it, "pairs") as line:
                stages.append(self.pairs_stage(t, ctx, groups, upstream))
                line.report(stages[-1].final)
            with console.stage(it, "train") as line:
                train, policy = self.train_stage(t, policy, ctx, start)
                line.report(train.final)
            stages += [train, *self.evaluations(t, policy)]
            rows.append(self._row(t, stages, prov))
            self._write_results(rows)
            warnings = check_thresholds(rows[-1]["metrics"], self.cfg.eval.indicators)
            if warnings and self.cfg.eval.indicators.action == "stop":
                log.warning("stopping after iteration %d: %s", t, "; ".join(warnings))
                break
        store.atomic_write_json(self.run_dir / "final.json", self._select(rows))
        self._write_results(rows)
        log.info("run finished in %.1fs", time.perf_counter() - t0)
        return rows

    def _select(self, rows: list[dict]) -> dict:
        """The method's final iterate (the last when it does not choose), marked in the rows
        (metrics["selected"] = 1 on its row, 0 on the others); final.json also holds the
        chosen row's reported metrics (the validation ones, used to choose, apart)."""
        final = self.method.select_final(self.cfg, rows) or {"iteration": rows[-1]["iteration"], "metric": None,
                                                              "value": None}
        for r in rows:
            r["metrics"]["selected"] = int(r["iteration"] == final["iteration"])
        chosen = next(r for r in rows if r["iteration"] == final["iteration"])
        return {**final, "selected_by": "validation" if final["metric"] else "last iterate",
                "test": {k: v for k, v in chosen["metrics"].items()
                         if k.startswith(("lm_eval/", "alpaca_eval/", "indicators/"))}}

    def _row(self, t: int, stages: list[store.Stage], prov: dict) -> dict:
        metrics: dict = {}
        wall = 0.0
        costs = []  # what the stages cost (harness.cost); iteration 0 includes the init_sft stage
        init = self.run_dir / "iter_000" / "init_sft" / "manifest.json"
        if t == 0 and init.exists():
            costs.append(store.read_json(init)["outputs"].get("cost"))
        for st in stages:
            out = st.outputs()
            metrics.update(out.get("metrics", {}))
            wall += out.get("seconds", 0.0)
            costs.append(out.get("cost"))
        metrics["wall_time_s"] = round(wall, 2)
        cost_metrics, device = cost.row_metrics(costs)
        metrics.update(cost_metrics)
        return {"experiment": self.cfg.experiment.name, "method": self.cfg.method.name, "iteration": t,
                "model": self.cfg.model.base, "device": device, "metrics": metrics,
                "provenance": {**{k: prov[k] for k in ("config_hash", "seed", "versions", "git_commit", "git_dirty")},
                               "model": self.base_identity}}

    def _write_results(self, rows: list[dict]) -> None:
        store.write_jsonl(self.run_dir / "results.jsonl", rows)


# the evaluate stage's inputs: [eval] without its validation part (that is its own stage)
EVAL_KEYS = tuple(f"eval.{f.name}" for f in fields(EvalSection) if f.name != "validation")


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
