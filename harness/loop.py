"""The only iteration loop: [init SFT] -> evaluate 0 -> per iteration t:
[self_instruct] -> generate -> judge (if the method needs one) -> pairs -> train
-> evaluate [-> validation]. After the last iteration the method picks the final
iterate (final.json; ``metrics["selected"]`` marks its results row).

Every stage is run by ``Runner.run_stage`` from a small declaration: its name, its
upstream (content hashes of what it consumes) and its compute function, which gets the
stage's recording view of the config (``harness.stages.ConfigView``). A finished stage is
skipped when its upstream and every config field it read are unchanged, an error
(naming the change) when they differ, and resumed from its JSONL log when interrupted.
Models are loaded only when some stage has work to do.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from harness import console, cost, store
from harness.config import Config
from harness.data import Example, load_examples
from harness.generate import SAMPLER, Prompt, generate, generation_settings
from harness.judges import judge_scale
from harness.judges.oracle import OracleJudge
from harness.judges.base import JudgeItem
from harness.methods.base import Group, IterationContext
from harness.models import load_model, load_policy, load_tokenizer, offline_env
from harness.sources import identity, locate, materialize, resolve_ref
from harness.methods import METHODS
from harness.rundir import MANIFEST, TMP_SUFFIX, RunDir
from harness.schema import to_dict
from harness.stages import ConfigView, RecordedStage
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
        self.layout = RunDir(run_dir or cfg.run_dir)
        self.run_dir = self.layout.root
        self.method = METHODS.get(cfg.method.name)
        self._loaded: tuple[tuple, object, object, dict] | None = None
        self._examples = None
        self._view: ConfigView | None = None  # the config view of the stage being computed
        # resolved once: every stage loads the same build / conversion
        source = locate(cfg.model.base, cfg.model.gguf_file)
        self.base_path = materialize(source)
        self.base_identity = identity(source, cfg.model.revision)

    # ----- helpers -------------------------------------------------------
    def model(self, policy: Policy):
        """model_t, loaded once while consecutive stages use it. The config fields read to load
        it count as read by every stage that uses it, not only by the one that loaded it."""
        key = tuple(map(str, policy.adapters))
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # free the previous model first
            view = ConfigView(self.cfg)
            model, tok = load_policy(view.cfg, policy.adapters, base=self.base_path)
            self._loaded = (key, model, tok, view.reads)
        if self._view is not None:
            self._view.merge(self._loaded[3])
        return self._loaded[1], self._loaded[2]

    @property
    def examples(self):
        if self._examples is None:
            self._examples = load_examples(self.cfg.data, seed=self.cfg.experiment.seed)
        return self._examples

    def context(self, t: int, cfg) -> IterationContext:
        # the judge's scale from its configuration, before any candidate is built
        scale = judge_scale(cfg.judge) if cfg.judge.name != "none" else None
        return IterationContext(cfg, t, self.examples, scale, lambda k: store.read_jsonl(self.layout.pairs(k)))

    def run_stage(self, t: int, name: str, upstream: dict, compute, *, compare: bool = False) -> RecordedStage:
        """One stage from its declaration, as one terminal line: reused when finished with the
        same inputs, else ``compute(cfg, work_dir) -> manifest outputs`` with the stage's
        recording view of the config, then committed. ``compare``: the line shows the change
        against iteration 0's same stage."""
        st = RecordedStage(self.layout.stage(t, name), upstream, self.cfg)
        with console.stage(f"iter {t}", name) as line:
            if not st.done():
                work = st.begin()
                self._view = view = ConfigView(self.cfg)
                try:
                    outputs = compute(view.cfg, work)
                finally:
                    self._view = None
                st.commit_view(outputs, view)
            line.report(st.final, baseline=self.layout.stage(0, name) if compare and t else None)
        return st

    @staticmethod
    def skip_stage(t: int, name: str) -> None:
        """A stage that does not apply to this experiment: no line."""
        with console.stage(f"iter {t}", name) as line:
            line.skip()

    # ----- stages --------------------------------------------------------
    def init_stage(self) -> Policy:
        # the base model's content, not its name: a rebuilt tiny world or a replaced local
        # checkpoint must not reuse stages computed from the old weights
        base_id = dict_hash({"model": self.cfg.to_dict()["model"], "lora": self.cfg.to_dict()["lora"],
                             "weights": self.base_identity,
                             "chat_template": store.path_fingerprint(resolve_ref(self.cfg.model.chat_template))
                             if self.cfg.model.chat_template else ""})
        data = self.method.init_sft_data(self.cfg)
        if not data:
            self.skip_stage(0, "init_sft")
            return Policy([], base_id)

        def compute(cfg, work):
            from harness.train import train_sft

            settings = self.method.init_sft_settings(cfg)
            model, tok = self.model(Policy([], base_id))
            metrics = train_sft(model, tok, data, cfg, 0, work, settings=settings)
            self._loaded = None  # the object was wrapped by training; reload from disk
            store.write_jsonl(work / "log_history.jsonl", metrics.pop("log_history"))
            tr = cfg.training  # what the SFT stage shares with the DPO iterations
            return {"adapter_hash": store.file_hash(work / "adapter"),
                    "metrics": {**_numeric(metrics), "train/n_examples": len(data)},
                    "settings": {**to_dict(settings), "optimizer": tr.optimizer, "weight_decay": tr.weight_decay,
                                 "max_grad_norm": tr.max_grad_norm, "lora_dropout": cfg.lora.dropout}}

        st = self.run_stage(0, "init_sft", {"base": base_id, "data": dict_hash(data)}, compute)
        return Policy([st.final / "adapter"], dict_hash([base_id, st.outputs()["adapter_hash"]]))

    def self_instruct_stage(self, t: int, policy: Policy) -> tuple[RecordedStage | None, list[Example]]:
        """New prompts written few-shot (the method's ``self_instruct`` plan) by the policy or a
        fixed model, resumable like generation; the generate stage reads its prompts.jsonl."""
        plan = self.method.self_instruct(self.context(t, self.cfg))
        if plan is None:
            self.skip_stage(t, "self_instruct")
            return None, []
        if plan.model:
            writer = {"model": plan.model, "revision": plan.revision,
                      "weights": identity(locate(plan.model), plan.revision)}
        else:
            writer = {"policy": policy.id}

        def compute(cfg, work):
            plan = self.method.self_instruct(self.context(t, cfg))
            if plan.model:
                model = load_model(plan.model, revision=plan.revision, dtype=cfg.model.dtype, device=cfg.model.device)
                tok = load_tokenizer(plan.model, plan.revision)
            else:
                model, tok = self.model(policy)
            out = generate(model, tok, plan.requests, plan.sampling, seed_key=(cfg.experiment.seed, t, "self_instruct"),
                           batch_size=cfg.generation.batch_size, log=store.JsonlLog(work / "outputs.jsonl"),
                           desc=f"iter {t} self_instruct")
            del model, tok
            new = plan.select(out)
            store.write_jsonl(work / "prompts.jsonl", [{"id": e.id, "messages": e.messages} for e in new])
            return {"hash": store.file_hash(work / "prompts.jsonl"), "writer": writer,
                    "metrics": {"self_instruct/n_requests": len(plan.requests), "self_instruct/n_prompts": len(new)}}

        st = self.run_stage(t, "self_instruct", {"writer": writer, "sampling": to_dict(plan.sampling),
                                                 "requests": dict_hash([[r.id, r.messages] for r in plan.requests])},
                            compute)
        return st, [Example(r["id"], tuple(r["messages"])) for r in store.read_jsonl(st.final / "prompts.jsonl")]

    def generate_stage(self, t: int, policy: Policy, extra: list[Example]) -> tuple[RecordedStage, list[Example]]:
        # extra: the self_instruct stage's prompts; the answers (SPIN's chosen side, DNO's
        # teacher) are part of what later stages consume, so they are hashed with the prompts
        prompts = self.method.prompts(self.context(t, self.cfg)) + extra

        def compute(cfg, work):
            sampling = self.method.sampling(cfg)
            model, tok = self.model(policy)
            glog = store.JsonlLog(work / "samples.jsonl")
            resumed = len(glog.records)  # records kept from an interrupted attempt
            records = generate(model, tok, [Prompt(e.id, e.messages) for e in prompts], sampling,
                               seed_key=(cfg.experiment.seed, t, "generate"),
                               batch_size=cfg.generation.batch_size, log=glog, desc=f"iter {t} generate")
            tokens = sum(s["n_tokens"] for r in records.values() for s in r["samples"])
            store.write_jsonl(work / "prompts.jsonl", [{"id": e.id, "messages": e.messages, "response": e.response}
                                                       for e in prompts])
            return {"hash": store.file_hash(work / "samples.jsonl"), "resumed_records": resumed,
                    "metrics": {"gen/tokens": tokens}, "generation": generation_settings(model, tok, sampling)}

        st = self.run_stage(t, "generate", {"policy": policy.id, "sampler": SAMPLER,
                                            "prompts": dict_hash([[e.id, e.messages, e.response] for e in prompts])},
                            compute)
        return st, prompts

    def groups(self, ctx: IterationContext, gen: RecordedStage, prompts: list[Example]) -> list[Group]:
        """Each prompt's candidates for the judge and the pairs (the method's ``candidates``)."""
        records = {r["id"]: r for r in store.read_jsonl(gen.final / "samples.jsonl")}
        return [Group(e, self.method.candidates(ctx, e, [s["text"] for s in records[e.id]["samples"]]))
                for e in prompts]

    def judge_stage(self, t: int, policy: Policy, gen: RecordedStage, prompts: list[Example]) -> RecordedStage:
        from harness.judges import build_judge, require_coverage
        from harness.judging import judge_groups

        def compute(cfg, work):
            ctx = self.context(t, cfg)
            groups, scale = self.groups(ctx, gen, prompts), ctx.scale()
            judge_policy = self.model(policy) if cfg.judge.name == "self" else None
            judge = build_judge(cfg.judge, policy=judge_policy, identity_extra=policy.id,
                                seed_key=(cfg.experiment.seed, t, "judge"))
            if tuple(judge.scale) != tuple(scale):
                raise RuntimeError(f"judge {judge.name!r} scores on {judge.scale}, but the method was told "
                                   f"{scale} (harness.judges.judge_scale disagrees with the judge)")
            # transport failures are not written: the stage fails naming them, a rerun retries only them
            judged = judge_groups(judge, groups, store.JsonlLog(work / "judgments.jsonl"),
                                  batch_size=cfg.judge.batch_size, what=f"judging of iteration {t}",
                                  desc=f"iter {t} judge")
            recs, n_items = judged.records, judged.n_items
            n_failed = judged.n_parse_failed  # items without a valid score: kept, counted, shown
            if judged.parse_summary():
                log.warning(judged.parse_summary())
            if n_items:  # the judgments stay in the .tmp log for the next attempt when this raises
                require_coverage(n_items - n_failed, n_items, cfg.judge.min_coverage, f"judging of iteration {t}")
            # judged candidates only: automatic negatives carry a fixed score, not a judgment
            scores = [s for g, r in zip(groups, recs) for c, s in zip(g.candidates, r["scores"])
                      if c.fixed_score is None and s is not None]
            lo, hi = (v if math.isfinite(v) else None for v in scale)
            metrics = {**judged.metrics(), "judge/score_mean": sum(scores) / len(scores) if scores else None,
                       "judge/score_min": min(scores, default=None), "judge/score_max": max(scores, default=None),
                       "judge/scale_lo": lo, "judge/scale_hi": hi,
                       **oracle_agreement(cfg.judge.name, groups, recs)}
            return {"hash": store.file_hash(work / "judgments.jsonl"), "metrics": metrics, "scale": [lo, hi]}

        return self.run_stage(t, "judge", {"generate": gen.outputs()["hash"], "policy": policy.id}, compute)

    def pairs_stage(self, t: int, gen: RecordedStage, judge: RecordedStage | None,
                    prompts: list[Example]) -> RecordedStage:
        upstream = {"generate": gen.outputs()["hash"], "prompts": gen.inputs["upstream"]["prompts"]}
        if judge is not None:
            upstream["judge"] = judge.outputs()["hash"]

        def compute(cfg, work):
            ctx = self.context(t, cfg)
            groups = self.groups(ctx, gen, prompts)
            if judge is not None:
                by_id = {r["id"]: r for r in store.read_jsonl(judge.final / "judgments.jsonl")}
                for g in groups:
                    g.scores = by_id[g.example.id]["scores"]
            pairs, stats = self.method.build_pairs(ctx, groups)
            store.write_jsonl(work / "pairs.jsonl", pairs)
            return {"hash": store.file_hash(work / "pairs.jsonl"), "metrics": _numeric(stats)}

        return self.run_stage(t, "pairs", upstream, compute)

    def train_stage(self, t: int, policy: Policy, start: Policy) -> tuple[RecordedStage, Policy]:
        """DPO from ``policy`` (model_t). The reference is model_t ("previous") or ``start``,
        the iteration-0 model ("base"); the stage's outputs name it."""
        pairs = self.method.training_set(self.context(t, self.cfg))
        ref = start if self.cfg.method.reference == "base" else policy

        def compute(cfg, work):
            from harness.train import train_dpo

            model, tok = self.model(policy)
            # model_t is trl's default reference; another one is passed as its chain of adapters
            reference = None if ref.adapters == policy.adapters else ref.adapters
            metrics, _ = train_dpo(model, tok, pairs, cfg, t, work, reference=reference, base=self.base_path)
            self._loaded = None  # trl wrapped or changed the object; the next user reloads from disk
            store.write_jsonl(work / "log_history.jsonl", metrics.pop("log_history"))
            metrics["train/n_replayed"] = sum(p.get("iteration", t) != t for p in pairs)
            adapter_hash = store.file_hash(work / "adapter")
            return {"adapter_hash": adapter_hash, "metrics": _numeric(metrics),
                    "policy": policy.id, "trained": dict_hash([policy.id, adapter_hash]),
                    "reference": {"kind": cfg.method.reference, "policy": ref.id,
                                  "adapters": [str(p) for p in ref.adapters]}}

        st = self.run_stage(t, "train", {"policy": policy.id, "reference": ref.id, "pairs": dict_hash(pairs)}, compute)
        new = Policy(_chain(self.cfg, policy.adapters, st.final / "adapter"),
                     dict_hash([policy.id, self.cfg.chain, st.outputs()["adapter_hash"]]))
        return st, new

    def evaluate_stage(self, t: int, policy: Policy) -> RecordedStage:
        from harness.evaluate import evaluate_iteration, iteration0_answers
        from harness.judges import build_judge

        upstream, reference = {"policy": policy.id, "sampler": SAMPLER}, None
        if t > 0 and self.cfg.eval.alpaca_eval.instructions and self.cfg.eval.alpaca_eval.reference == "iteration0":
            reference, upstream["reference"] = iteration0_answers(self.layout.alpaca_generations(0))

        def compute(cfg, work):
            model, tok = self.model(policy)
            return {"metrics": evaluate_iteration(
                model, tok, cfg, work, t,
                lambda section: build_judge(section, seed_key=(cfg.experiment.seed, t, "alpaca_eval")),
                reference=reference)}

        return self.run_stage(t, "evaluate", upstream, compute, compare=True)

    def validation_stage(self, t: int, policy: Policy) -> RecordedStage | None:
        """[eval.validation] (for choosing an iterate): its metrics are "validation/..."."""
        from harness.judges import build_judge
        from harness.selection import run_validation

        if not self.cfg.eval.validation.enabled:
            self.skip_stage(t, "validation")
            return None

        def compute(cfg, work):
            model, tok = self.model(policy)
            return {"metrics": run_validation(
                model, tok, cfg, work, t,
                lambda section: build_judge(section, seed_key=(cfg.experiment.seed, t, "validation")))}

        return self.run_stage(t, "validation", {"policy": policy.id}, compute, compare=True)

    def evaluations(self, t: int, policy: Policy) -> list[RecordedStage]:
        """The evaluate stage and, when configured, the validation stage of iteration ``t``."""
        return [st for st in (self.evaluate_stage(t, policy), self.validation_stage(t, policy)) if st is not None]

    # ----- the loop ------------------------------------------------------
    def run(self) -> list[dict]:
        offline_env()
        if self.cfg.model.cpu_threads:
            import torch

            torch.set_num_threads(self.cfg.model.cpu_threads)
        from harness import provenance
        from harness.evaluate import check_thresholds

        prov = provenance.collect(self.cfg, {"base": self.base_identity, "judge": to_dict(self.cfg.judge)})
        store.atomic_write_json(self.layout.provenance, prov)
        store.atomic_write_json(self.layout.config, {"hash": self.cfg.hash(), "config": self.cfg.to_dict()})
        rows: list[dict] = []
        t0 = time.perf_counter()
        policy = self.init_stage()
        start = policy  # the iteration-0 model: method.reference = "base" trains against it
        rows.append(self._row(0, self.evaluations(0, policy), prov))
        self._write_results(rows)
        for t in range(1, self.cfg.method.iterations + 1):
            si, extra = self.self_instruct_stage(t, policy)
            gen, prompts = self.generate_stage(t, policy, extra)
            judge = self.judge_stage(t, policy, gen, prompts) if self.method.needs_judge else None
            pairs = self.pairs_stage(t, gen, judge, prompts)
            train, policy = self.train_stage(t, policy, start)
            stages = [s for s in (si, gen, judge, pairs, train) if s is not None]
            rows.append(self._row(t, stages + self.evaluations(t, policy), prov))
            self._write_results(rows)
            warnings = check_thresholds(rows[-1]["metrics"], self.cfg.eval.indicators)
            if warnings and self.cfg.eval.indicators.action == "stop":
                log.warning("stopping after iteration %d: %s", t, "; ".join(warnings))
                break
        store.atomic_write_json(self.layout.final, self._select(rows))
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
        init = self.layout.manifest(0, "init_sft")
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
        store.write_jsonl(self.layout.results, rows)


# ---- small helpers

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
        console.log_to(RunDir(run_dir).log)  # everything silenced on the terminal, and tracebacks
        with console.stage("", "setup") as line:
            runner = Runner(cfg, run_dir)
            line.done(f"run directory {run_dir} · model {runner.base_path}")
        rows = runner.run()
    return run_dir, rows


def status(run_dir: Path) -> list[dict]:
    """Finished / partial stages of a run directory, for ``harness status``."""
    out = []
    for t, st in RunDir(run_dir).stage_dirs():
        if st.name.endswith(TMP_SUFFIX):
            logs = [p.name for p in st.glob("*.jsonl")]
            n = sum(1 for p in st.glob("*.jsonl") for _ in open(p, "rb"))
            out.append({"iteration": t, "stage": st.name.removesuffix(TMP_SUFFIX), "state": "partial",
                        "detail": f"{n} records in {', '.join(logs)}" if logs else ""})
        elif (st / MANIFEST).exists():
            try:
                detail = f"inputs {store.read_json(st / MANIFEST)['input_hash']}"
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                detail = f"{MANIFEST} is unreadable: delete {st} to recompute it"
            out.append({"iteration": t, "stage": st.name, "state": "done", "detail": detail})
    return out
