"""The only iteration loop: [init SFT] -> evaluate 0 -> per iteration t:
[self_instruct] -> generate -> judge (if the method needs one) -> pairs -> train
-> evaluate [-> validation]. After the last iteration the method picks the final
iterate (final.json; ``metrics["selected"]`` marks its results row).

Every stage is run by ``Runner.run_stage`` from a small declaration (``harness.run.stages``):
its name, its upstream (content hashes of what it consumes) and its compute function, which
gets the stage's recording view of the config (``harness.run.reuse.ConfigView``). A finished stage is
skipped when its upstream and every config field it read are unchanged, an error
(naming the change) when they differ, and resumed from its JSONL log when interrupted.
Models are loaded only when some stage has work to do.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from harness.console import terminal as console
from harness.store import cost
from harness.store import files as store
from harness.train import tracking
from harness.config.experiment import Config
from harness.models.data import load_examples
from harness.engines import Engines
from harness.judges import judge_scale
from harness.methods import METHODS
from harness.methods.base import IterationContext
from harness.models.load import load_policy, offline_env, release_memory
from harness.evaluate.outcomes import gains_at
from harness.run.reuse import ConfigView, RecordedStage
from harness.store.rundir import RunDir
from harness.config.schema import to_dict
from harness.models.sources import identity, locate, materialize
from harness.run.stages import (Policy, evaluations, generate_stage, init_stage, judge_stage, pairs_stage,
                                self_instruct_stage, train_stage)

log = logging.getLogger("harness")


class Runner:
    def __init__(self, cfg: Config, run_dir: Path | None = None):
        # the loop's own reads count as the running stage's (ConfigView.sink)
        self._plain = cfg
        self._outer = ConfigView(cfg)
        self.cfg = self._outer.cfg
        self.layout = RunDir(run_dir or cfg.run_dir)
        self.run_dir = self.layout.root
        self.method = METHODS.get(cfg.method.name)
        self._loaded: tuple[tuple, object, object, dict] | None = None
        self._examples = None
        self._view: ConfigView | None = None  # the config view of the stage being computed
        self._ran: set[int] = set()  # iterations one of whose stages was computed by this process
        self.tracker: tracking.Tracker | None = None  # open while ``run`` runs
        # the run's generation engines: vLLM's started once, stopped when ``run`` ends
        self.engines = Engines(lora_rank=cfg.lora.r)
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
            self.unload()  # free the previous model first
            view = ConfigView(self._plain)
            model, tok = load_policy(view.cfg, policy.adapters, base=self.base_path)
            self._loaded = (key, model, tok, view.reads)
        if self._view is not None:
            self._view.merge(self._loaded[3])
        return self._loaded[1], self._loaded[2]

    def unload(self) -> None:
        """Drop the cached policy and give its memory back (``release_memory``): before another
        model loads (a judge, a fixed self-instruct model), and after training, whose trainer
        wrapped or changed the object (the next user reloads it from disk). A stage's own
        references to the model must be gone first."""
        self._loaded = None
        release_memory()

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
        st = RecordedStage(self.layout.stage(t, name), upstream, self._plain)
        with console.stage(f"iter {t}", name) as line:
            if not st.done():
                work = st.begin()
                self._view = self._outer.sink = view = ConfigView(self._plain)
                try:
                    outputs = compute(view.cfg, work)
                finally:
                    self._view = self._outer.sink = None
                st.commit_view(outputs, view)
                self._ran.add(t)
            line.report(st.final, baseline=self.layout.stage(0, name) if compare and t else None)
        return st

    @staticmethod
    def skip_stage(t: int, name: str) -> None:
        """A stage that does not apply to this experiment: no line."""
        with console.stage(f"iter {t}", name) as line:
            line.skip()

    # ----- the loop ------------------------------------------------------
    def run(self) -> list[dict]:
        """The whole loop, with the experiment's trackers ([tracking]) open while it runs and its
        engines stopped when it ends, however it ends."""
        with tracking.session(self._plain, self.run_dir) as self.tracker, self.engines:
            return self._run()

    def _run(self) -> list[dict]:
        offline_env()
        if self.cfg.model.cpu_threads:
            import torch

            torch.set_num_threads(self.cfg.model.cpu_threads)
        from harness.run import provenance
        from harness.evaluate import check_thresholds

        prov = provenance.collect(self.cfg, {"base": self.base_identity, "judge": to_dict(self.cfg.judge)})
        store.atomic_write_json(self.layout.provenance, prov)
        store.atomic_write_json(self.layout.config, {"hash": self.cfg.hash(), "config": self.cfg.to_dict()})
        rows: list[dict] = []
        stopped = None  # the iterate whose indicators crossed a threshold with action "stop"
        t0 = time.perf_counter()
        policy = init_stage(self)
        start = policy  # the iteration-0 model: method.reference = "base" trains against it
        rows.append(self._row(0, evaluations(self, 0, policy), prov))
        self._write_results(rows)
        self._track(rows[-1])
        for t in range(1, self.cfg.method.iterations + 1):
            si, extra = self_instruct_stage(self, t, policy)
            gen, prompts = generate_stage(self, t, policy, extra)
            judge = judge_stage(self, t, policy, gen, prompts) if self.method.needs_judge else None
            pairs = pairs_stage(self, t, gen, judge, prompts)
            train, policy = train_stage(self, t, policy, start)
            stages = [s for s in (si, gen, judge, pairs, train) if s is not None]
            rows.append(self._row(t, stages + evaluations(self, t, policy), prov))
            self._write_results(rows)
            self._track(rows[-1])
            warnings = check_thresholds(rows[-1]["metrics"], self.cfg.eval.indicators)
            if warnings and self.cfg.eval.indicators.action == "stop":
                log.warning("stopping after iteration %d: %s", t, "; ".join(warnings))
                stopped = {"iteration": t, "warnings": warnings}
                break
        store.atomic_write_json(self.layout.final, self._select(rows, stopped))
        self._write_results(rows)
        log.info("run finished in %.1fs", time.perf_counter() - t0)
        return rows

    def _select(self, rows: list[dict], stopped: dict | None = None) -> dict:
        """The method's final iterate (the last when it does not choose), marked in the rows
        (metrics["selected"] = 1 on its row, 0 on the others); final.json also holds the
        chosen row's reported metrics (the validation ones, used to choose, apart). When the
        indicators stopped the run, the iterate that crossed the threshold is not a candidate:
        the final model is chosen among the ones before it."""
        candidates = rows[:-1] if stopped else rows
        final = self.method.select_final(self.cfg, candidates) or {
            "iteration": candidates[-1]["iteration"], "metric": None, "value": None}
        for r in rows:
            r["metrics"]["selected"] = int(r["iteration"] == final["iteration"])
        chosen = next(r for r in rows if r["iteration"] == final["iteration"])
        by = "validation" if final["metric"] else "last iterate"
        if stopped:
            by += f" before iteration {stopped['iteration']}, whose indicators stopped the run"
        return {**final, "selected_by": by, "stopped": stopped,
                "test": {k: v for k, v in chosen["metrics"].items()
                         if k.startswith(("lm_eval/", "alpaca_eval/", "indicators/"))}}

    def _row(self, t: int, stages: list[store.Stage], prov: dict) -> dict:
        metrics: dict = {}
        wall = 0.0
        costs = []  # what the stages cost (harness.store.cost); iteration 0 includes the init_sft stage
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
                "seed": self.cfg.experiment.seed, "model": self.cfg.model.base, "device": device, "metrics": metrics,
                **({"sweep": self.cfg.sweep_point} if self.cfg.experiment.sweep else {}),
                "paired": gains_at(self.layout.root, t), "protocol": self._protocols(t),
                "provenance": {**{k: prov[k] for k in ("config_hash", "seed", "versions", "git_commit", "git_dirty")},
                               "model": self.base_identity}}

    def _protocols(self, t: int) -> dict:
        """How iteration t's numbers were made, per evaluation that records it (AlpacaEval: the
        annotator or rubric, judge, reference set, n and coverage; lm-eval: per reported task,
        the shots used, chat template, multi-turn few-shot, system instruction, lm-eval's and
        the task's versions), so that tables rank together only numbers of one protocol."""
        out = {}
        for name in ("alpaca_eval", "mt_bench", "lm_eval"):
            path = self.layout.stage(t, "evaluate") / name / "metrics.json"
            protocol = store.read_json(path).get("protocol") if path.exists() else None
            if protocol:
                out[name] = protocol
        return out

    def _write_results(self, rows: list[dict]) -> None:
        store.write_jsonl(self.layout.results, rows)

    def _track(self, row: dict) -> None:
        """The row's entry in the trackers, only when this process computed one of its
        iteration's stages: a finished iteration reused by a resumed run was logged when its
        row was first written (results.jsonl, not a tracker, is what a resume reads)."""
        if self.tracker is not None and row["iteration"] in self._ran:
            self.tracker.log_row(row)


# ---- small helpers

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
