"""What each stage of an iteration computes, as declarations for ``Runner.run_stage``:
a stage's name, its upstream (content hashes of what it consumes) and its compute
function, which reads the config only through the view it is given.

``r`` is the ``harness.run.loop.Runner`` (its model cache, examples, context and
``run_stage``); this module holds no loop and decides no reuse (``harness.run.reuse``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

from harness.store import files as store
from harness.config.experiment import Config
from harness.models.data import Example
from harness.engines import logged
from harness.engines import settings as engine_settings
from harness.engines.generate import SAMPLER, Prompt, cut_metrics, is_cut
from harness.judges.base import JudgeItem
from harness.judges.oracle import OracleJudge
from harness.methods.base import Group, IterationContext, mark_cut
from harness.models.load import load_model, load_tokenizer
from harness.evaluate.outcomes import write_items
from harness.run.reuse import RecordedStage
from harness.config.schema import to_dict
from harness.models.sources import identity, locate, resolve_ref
from harness.store.files import dict_hash

log = logging.getLogger("harness")


@dataclass
class Policy:
    """model_t as a chain of saved adapters plus a content id for cache keys."""
    adapters: list[Path]
    id: str


def init_stage(r) -> Policy:
    # the base model's content, not its name: a rebuilt tiny world or a replaced local
    # checkpoint must not reuse stages computed from the old weights
    base_id = dict_hash({"model": r.cfg.to_dict()["model"], "lora": r.cfg.to_dict()["lora"],
                         "weights": r.base_identity,
                         "chat_template": store.path_fingerprint(resolve_ref(r.cfg.model.chat_template))
                         if r.cfg.model.chat_template else ""})
    data = r.method.init_sft_data(r.cfg)
    if not data:
        r.skip_stage(0, "init_sft")
        return Policy([], base_id)

    def compute(cfg, work):
        from harness.train import train_sft

        settings = r.method.init_sft_settings(cfg)
        model, tok = r.model(Policy([], base_id))
        metrics = train_sft(model, tok, data, cfg, 0, work, settings=settings)
        del model
        r.unload()  # the trained model is freed before any other model or engine starts
        store.write_jsonl(work / "log_history.jsonl", metrics.pop("log_history"))
        tr = cfg.training  # what the SFT stage shares with the DPO iterations
        return {"adapter_hash": store.adapter_hash(work / "adapter"),
                "metrics": {**_numeric(metrics), "train/n_examples": len(data)},
                "settings": {**to_dict(settings), "optimizer": tr.optimizer, "weight_decay": tr.weight_decay,
                             "max_grad_norm": tr.max_grad_norm, "lora_dropout": cfg.lora.dropout}}

    st = r.run_stage(0, "init_sft", {"base": base_id, "data": dict_hash(data)}, compute)
    return Policy([st.final / "adapter"], dict_hash([base_id, st.outputs()["adapter_hash"]]))


def self_instruct_stage(r, t: int, policy: Policy) -> tuple[RecordedStage | None, list[Example]]:
    """New prompts written few-shot (the method's ``self_instruct`` plan) by the policy or a
    fixed model, resumable like generation; the generate stage reads its prompts.jsonl."""
    plan = r.method.self_instruct(r.context(t, r.cfg))
    if plan is None:
        r.skip_stage(t, "self_instruct")
        return None, []
    if plan.model:
        writer = {"model": plan.model, "revision": plan.revision,
                  "weights": identity(locate(plan.model), plan.revision)}
    else:
        writer = {"policy": policy.id}

    def compute(cfg, work):
        plan = r.method.self_instruct(r.context(t, cfg))
        if plan.model:
            r.unload()  # the policy is not needed: its memory is the fixed model's
            model = load_model(plan.model, revision=plan.revision, dtype=cfg.model.dtype, device=cfg.model.device)
            tok = load_tokenizer(plan.model, plan.revision)
        else:
            model, tok = r.model(policy)
        with r.engines.stage(cfg.generation.engine, cfg.generation) as eng:
            out = eng.generate(model, tok, plan.requests, plan.sampling,
                               seed_key=(cfg.experiment.seed, t, "self_instruct"), batch_size=cfg.generation.batch_size,
                               log=store.JsonlLog(work / "outputs.jsonl"), desc=f"iter {t} self_instruct")
        del model, tok
        new = plan.select(out)
        store.write_jsonl(work / "prompts.jsonl", [{"id": e.id, "messages": e.messages} for e in new])
        return {"hash": store.file_hash(work / "prompts.jsonl"), "writer": writer,
                "metrics": {"self_instruct/n_requests": len(plan.requests), "self_instruct/n_prompts": len(new),
                            **cut_metrics(out, "self_instruct")}}

    st = r.run_stage(t, "self_instruct", {"writer": writer, "sampling": to_dict(plan.sampling),
                                             "requests": dict_hash([[q.id, q.messages] for q in plan.requests])},
                        compute)
    return st, [Example(rec["id"], tuple(rec["messages"])) for rec in store.read_jsonl(st.final / "prompts.jsonl")]


def generate_stage(r, t: int, policy: Policy, extra: list[Example]) -> tuple[RecordedStage, list[Example]]:
    # extra: the self_instruct stage's prompts; the answers (SPIN's chosen side, DNO's
    # teacher) are part of what later stages consume, so they are hashed with the prompts
    prompts = r.method.prompts(r.context(t, r.cfg)) + extra

    def compute(cfg, work):
        sampling = r.method.sampling(cfg)
        model, tok = r.model(policy)
        prompts_as_trained, fitted = as_trained(tok, prompts, cfg.training)
        glog = store.JsonlLog(work / "samples.jsonl")
        resumed = len(glog.records)  # records kept from an interrupted attempt
        with r.engines.stage(cfg.generation.engine, cfg.generation) as eng:
            records = eng.generate(model, tok, [Prompt(e.id, e.messages) for e in prompts_as_trained], sampling,
                                   seed_key=(cfg.experiment.seed, t, "generate"), batch_size=cfg.generation.batch_size,
                                   log=glog, desc=f"iter {t} generate")
        tokens = sum(s["n_tokens"] for rec in records.values() for s in rec["samples"])
        store.write_jsonl(work / "prompts.jsonl", [{"id": e.id, "messages": e.messages, "response": e.response}
                                                   for e in prompts_as_trained])
        return {"hash": store.file_hash(work / "samples.jsonl"), "resumed_records": resumed,
                "metrics": {"gen/tokens": tokens, **cut_metrics(records, "gen"),
                            "gen/n_prompts_cut": fitted.n_prompts_cut, "gen/n_prompts_too_long": fitted.n_dropped},
                "generation": engine_settings(cfg.generation.engine, model, tok, sampling, cfg.generation)}

    st = r.run_stage(t, "generate", {"policy": policy.id, "sampler": SAMPLER,
                                        "prompts": dict_hash([[e.id, e.messages, e.response] for e in prompts])},
                        compute)
    # later stages (judge, pairs) take the prompts as generated: cut as training will cut them
    generated = {rec["id"]: tuple(rec["messages"]) for rec in store.read_jsonl(st.final / "prompts.jsonl")}
    return st, [replace(e, messages=generated[e.id]) for e in prompts]


def as_trained(tokenizer, prompts: list[Example], settings) -> tuple[list[Example], object]:
    """(``prompts`` with their messages cut, the ``harness.train.truncate.Fitted`` counts).
    Each prompt is cut to ``settings.prompt_limit`` rendered tokens (training.max_prompt_length)
    by the cut training applies (``harness.train.truncate.fit``), so an answer is generated in
    exactly the context its pair is trained in, and training cuts no prompt again (the cut is
    idempotent). A prompt that cannot fit at all stays whole: training drops its pair. More
    cut or unfit prompts than ``settings.max_truncated_share`` fail here, before anything is
    generated (``check_share``), as the training stage would fail on their pairs."""
    from harness.train.truncate import check_share, fit  # harness.train imports trl: only when computing

    fitted = fit(tokenizer, [{"messages": list(e.messages)} for e in prompts], (), settings.max_length,
                 settings.prompt_limit)
    if prompts:
        check_share(fitted, len(prompts), settings, "training", "prompts")
    out = list(prompts)
    for i, item in zip(fitted.index, fitted.items):
        out[i] = replace(prompts[i], messages=tuple(item["messages"]))
    return out, fitted


def candidate_groups(r, ctx: IterationContext, gen: RecordedStage, prompts: list[Example]) -> list[Group]:
    """Each prompt's candidates for the judge and the pairs (the method's ``candidates``),
    each policy candidate marked by whether its sample was cut at max_new_tokens."""
    records = {rec["id"]: rec for rec in store.read_jsonl(gen.final / "samples.jsonl")}
    groups = []
    for e in prompts:
        samples = records[e.id]["samples"]
        cands = r.method.candidates(ctx, e, [s["text"] for s in samples])
        groups.append(Group(e, mark_cut(cands, [is_cut(s) for s in samples])))
    return groups


def judge_stage(r, t: int, policy: Policy, gen: RecordedStage, prompts: list[Example]) -> RecordedStage:
    from harness.judges import JUDGES, build_judge, require_coverage
    from harness.judges.judging import judge_groups, side_by_side

    def compute(cfg, work):
        ctx = r.context(t, cfg)
        groups, scale = candidate_groups(r, ctx, gen, prompts), ctx.scale()
        judge_policy = r.model(policy) if cfg.judge.needs_policy else None
        if cfg.judge.loads_model:
            r.unload()  # the judge's model takes the policy's memory (the next stage to need it reloads it)
        engine = _engine(cfg, JUDGES.get(cfg.judge.name).generates)
        with r.engines.stage(engine, cfg.generation) as eng:
            if engine == "vllm":  # the whole stage in one call: each answer kept as it finishes, for a resume
                eng = logged(eng, store.JsonlLog(work / "judge_answers.jsonl"))
            judge = build_judge(cfg.judge, policy=judge_policy, identity_extra=policy.id, dtype=cfg.model.dtype,
                                seed_key=(cfg.experiment.seed, t, "judge"), engine=eng)
            if tuple(judge.scale) != tuple(scale):
                raise RuntimeError(f"judge {judge.name!r} scores on {judge.scale}, but the method was told "
                                   f"{scale} (harness.judges.judge_scale disagrees with the judge)")
            # transport failures are not written: the stage fails naming them, a rerun retries only them
            judged = judge_groups(judge, groups, store.JsonlLog(work / "judgments.jsonl"),
                                  batch_size=judge_chunk(cfg, engine, groups), what=f"judging of iteration {t}",
                                  desc=f"iter {t} judge", side_by_side=side_by_side(cfg))
        recs, n_items = judged.records, judged.n_items
        n_failed = judged.n_parse_failed  # items without a valid score: kept, counted, shown
        if judged.parse_summary():
            log.warning(judged.parse_summary())
        if n_items:  # the judgments stay in the .tmp log for the next attempt when this raises
            require_coverage(n_items - n_failed, n_items, cfg.judge.min_coverage, f"judging of iteration {t}")
        lo, hi = (v if math.isfinite(v) else None for v in scale)
        metrics = {**judged.metrics(), **score_metrics(groups, recs), "judge/scale_lo": lo, "judge/scale_hi": hi,
                   **oracle_agreement(cfg.judge.name, groups, recs)}
        return {"hash": store.file_hash(work / "judgments.jsonl"), "metrics": metrics, "scale": [lo, hi]}

    return r.run_stage(t, "judge", {"generate": gen.outputs()["hash"], "policy": policy.id}, compute)


def pairs_stage(r, t: int, gen: RecordedStage, judge: RecordedStage | None,
                prompts: list[Example]) -> RecordedStage:
    upstream = {"generate": gen.outputs()["hash"], "prompts": gen.inputs["upstream"]["prompts"]}
    if judge is not None:
        upstream["judge"] = judge.outputs()["hash"]

    def compute(cfg, work):
        ctx = r.context(t, cfg)
        groups = candidate_groups(r, ctx, gen, prompts)
        if judge is not None:
            by_id = {rec["id"]: rec for rec in store.read_jsonl(judge.final / "judgments.jsonl")}
            for g in groups:
                g.scores = by_id[g.example.id]["scores"]
        pairs, stats = r.method.build_pairs(ctx, groups)
        store.write_jsonl(work / "pairs.jsonl", pairs)
        return {"hash": store.file_hash(work / "pairs.jsonl"), "metrics": _numeric(stats)}

    return r.run_stage(t, "pairs", upstream, compute)


def train_stage(r, t: int, policy: Policy, start: Policy) -> tuple[RecordedStage, Policy]:
    """DPO from ``policy`` (model_t). The reference is model_t ("previous") or ``start``,
    the iteration-0 model ("base"); the stage's outputs name it."""
    pairs = r.method.training_set(r.context(t, r.cfg))
    ref = start if r.cfg.method.reference == "base" else policy

    def compute(cfg, work):
        from harness.train import train_dpo

        model, tok = r.model(policy)
        # model_t is trl's default reference; another one is passed as its chain of adapters
        reference = None if ref.adapters == policy.adapters else ref.adapters
        metrics = train_dpo(model, tok, pairs, cfg, t, work, reference=reference, base=r.base_path)[0]
        del model
        r.unload()  # the trained model is freed before any other model or engine starts
        store.write_jsonl(work / "log_history.jsonl", metrics.pop("log_history"))
        metrics["train/n_replayed"] = sum(p.get("iteration", t) != t for p in pairs)
        adapter_hash = store.adapter_hash(work / "adapter")
        return {"adapter_hash": adapter_hash, "metrics": _numeric(metrics),
                "policy": policy.id, "trained": dict_hash([policy.id, adapter_hash]),
                "reference": {"kind": cfg.method.reference, "policy": ref.id,
                              "adapters": [str(p) for p in ref.adapters]}}

    st = r.run_stage(t, "train", {"policy": policy.id, "reference": ref.id, "pairs": dict_hash(pairs)}, compute)
    new = Policy(_chain(r.cfg, policy.adapters, st.final / "adapter"),
                 dict_hash([policy.id, st.outputs()["adapter_hash"]]))
    return st, new


def evaluate_stage(r, t: int, policy: Policy) -> RecordedStage:
    from harness.evaluate import evaluate_iteration, iteration0_answers
    from harness.evaluate.alpaca_instructions import instructions_identity
    from harness.judges import build_judge

    upstream, reference = {"policy": policy.id, "sampler": SAMPLER}, None
    if t > 0 and r.cfg.eval.alpaca_eval.instructions and r.cfg.eval.alpaca_eval.reference == "iteration0":
        reference, upstream["reference"] = iteration0_answers(r.layout.alpaca_generations(0))
    if (hub := instructions_identity(r.cfg.eval.alpaca_eval)) is not None:  # a hub file: its content, as a local file's
        upstream["alpaca_eval_instructions"] = hub

    def compute(cfg, work):
        model, tok = r.model(policy)
        ev = cfg.eval
        with r.engines.stage(_engine(cfg, bool(ev.alpaca_eval.instructions) or ev.indicators.num_prompts > 0
                             or ev.mt_bench.enabled),
                     cfg.generation) as eng:
            metrics = evaluate_iteration(
                model, tok, cfg, work, t,
                lambda section: build_judge(section, seed_key=(cfg.experiment.seed, t, "alpaca_eval"), engine=eng,
                                            dtype=cfg.model.dtype),
                reference=reference, generate_fn=eng.generate)
        return {"metrics": metrics, "items": write_items(work)}

    return r.run_stage(t, "evaluate", upstream, compute, compare=True)


def validation_stage(r, t: int, policy: Policy) -> RecordedStage | None:
    """[eval.validation] (for choosing an iterate): its metrics are "validation/..."."""
    from harness.evaluate import iteration0_answers
    from harness.evaluate.alpaca_instructions import instructions_identity
    from harness.judges import build_judge
    from harness.run.selection import run_validation

    v = r.cfg.eval.validation
    if not v.enabled:
        r.skip_stage(t, "validation")
        return None
    upstream, reference = {"policy": policy.id}, None
    if t > 0 and v.alpaca_eval.instructions and v.alpaca_eval.reference == "iteration0":
        reference, upstream["reference"] = iteration0_answers(r.layout.alpaca_generations(0, "validation"))
    if (hub := instructions_identity(v.alpaca_eval)) is not None:
        upstream["alpaca_eval_instructions"] = hub

    def compute(cfg, work):
        model, tok = r.model(policy)
        v = cfg.eval.validation
        with r.engines.stage(_engine(cfg, bool(v.alpaca_eval.instructions or v.prompts)), cfg.generation) as eng:
            metrics = run_validation(
                model, tok, cfg, work, t,
                lambda section: build_judge(section, seed_key=(cfg.experiment.seed, t, "validation"), engine=eng,
                                            dtype=cfg.model.dtype),
                reference=reference, generate_fn=eng.generate)
        return {"metrics": metrics, "items": write_items(work, "validation/")}

    return r.run_stage(t, "validation", upstream, compute, compare=True)


def evaluations(r, t: int, policy: Policy) -> list[RecordedStage]:
    """The evaluate stage and, when configured, the validation stage of iteration ``t``."""
    return [st for st in (evaluate_stage(r, t, policy), validation_stage(r, t, policy)) if st is not None]


def _engine(cfg: Config, generates: bool) -> str:
    """The engine of a stage: ``generation.engine`` when the stage generates, else "hf" (and
    the field is not read, so changing it does not rerun a stage that never used it)."""
    return cfg.generation.engine if generates else "hf"


def judge_chunk(cfg: Config, engine: str, groups: list[Group]) -> int:
    """Items per chunk of a judge stage (``judge_groups``; each chunk's groups are logged when it
    ends): judge.batch_size (a kill loses at most a chunk), or under the vllm engine every item
    of ``groups``, so vLLM has the stage's whole work in flight at its own concurrency
    (generation.vllm_max_num_seqs); the stage's engine then logs each answer as it finishes
    (``harness.engines.logged``), so a kill loses none."""
    if engine == "vllm":
        return max(1, sum(len(g.candidates) for g in groups))
    return cfg.judge.batch_size


def _chain(cfg: Config, adapters: list[Path], new: Path) -> list[Path]:
    """merge: every adapter in order; continue: the newest carries the earlier ones."""
    return adapters + [new] if cfg.chain == "merge" else [new]


def _numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, type(None))) and not isinstance(v, bool)}


def score_metrics(groups: list[Group], recs: list[dict]) -> dict:
    """The judge's scores of the policy's samples (``judge/score_mean``, ``_min``, ``_max``)
    and, apart, of the teacher's answers (``judge/teacher_score_mean``, DNO): judged
    candidates only (automatic negatives carry a fixed score, not a judgment); None where
    there are none."""
    judged = [(c.source, s) for g, r in zip(groups, recs) for c, s in zip(g.candidates, r["scores"])
              if c.fixed_score is None and s is not None]
    policy = [s for source, s in judged if source == "policy"]
    teacher = [s for source, s in judged if source == "teacher"]
    return {"judge/score_mean": sum(policy) / len(policy) if policy else None,
            "judge/score_min": min(policy, default=None), "judge/score_max": max(policy, default=None),
            "judge/teacher_score_mean": sum(teacher) / len(teacher) if teacher else None}


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
