"""One DPO-family iteration on (chosen, rejected) pairs, with LoRA / QLoRA, via trl.

The reference of iteration t+1 is exactly the model of iteration t
(``method.reference = "previous"``):
- merge chain: the policy is base + merged earlier adapters, trl adds a fresh
  adapter (peft_config) and uses the adapter-disabled model as reference;
- continue chain: the policy is a PeftModel whose "default" adapter starts as a
  copy of adapter_t; trl adds a frozen "ref" copy of it as the reference.
With ``method.reference = "base"`` the loop passes the iteration-0 chain of
adapters (``reference``) and the reference is that model instead: merge -- a
separately loaded, frozen copy handed to trl as ``ref_model``; continue -- the
"ref" adapter is replaced by the iteration-0 adapter, or removed so that the
adapter-disabled (quantized) base is the reference.

Its reference log-probs are computed once before training
(``harness.train.reference.precompute_reference``), and a probe of a sample of the pairs
(``harness.train.probe``, one forward function before and after) reports how the policy's
preferences moved. Not here: running
the trainer and its guards (``harness.train.trainer``), SFT (``harness.train.sft``).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Sequence

from harness.train.ended import open_rows
from harness.train.probe import pair_logps, probe_sample, probe_tokens, stage_work
from harness.train.reference import (precompute_reference, reference_logps, reference_model, row_lengths,
                                     use_reference_adapter)
from harness.train.schedule import dpo_steps
from harness.train.trainer import TrainingError, make_trainer, prepare_policy, run_trainer, trainer_args
from harness.train.truncate import check_share, cut_answers, fit


def dpo_trainer(model, tokenizer, pairs: Sequence[dict], cfg, iteration: int, out_dir: Path,
                reference: Sequence[Path] | None = None, base: str | None = None):
    """trl's DPOTrainer for one iteration, its reference set up for the chain in use
    (see the module doc; ``reference`` and ``base`` as in ``train_dpo``)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{"prompt": list(p["messages"]), "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}], "row": i}
                              for i, p in enumerate(pairs)])  # "row": which pair a tokenized row is
    policy, peft_config = prepare_policy(model, cfg, iteration)
    ref_model = None
    if reference is not None and cfg.chain == "merge":
        from harness.models.load import load_policy

        ref_model, _ = load_policy(cfg, list(reference), tokenizer=tokenizer, base=base)
        ref_model.requires_grad_(False)
    settings = dpo_steps(cfg, iteration)
    args = trainer_args(DPOConfig, cfg, out_dir, iteration, settings, beta=cfg.method.beta,
                         loss_type=[cfg.method.loss], disable_dropout=False)  # only_adapter_dropout instead
    trainer = make_trainer(DPOTrainer, settings, cfg.lora.dropout, model=policy, ref_model=ref_model, args=args,
                       train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
    if reference is not None and cfg.chain == "continue":
        use_reference_adapter(trainer.model, reference)
    # cut samples without an end-of-turn, then every answer within max_length
    trainer.train_dataset = cut_answers(open_rows(trainer.train_dataset, tokenizer, pairs), settings.max_length)
    return trainer


GAP_CHECK_PAIRS = 2  # pairs on which train_dpo compares the reference with the policy before training


def train_dpo(model, tokenizer, pairs: Sequence[dict], cfg, iteration: int, out_dir: Path,
              reference: Sequence[Path] | None = None,
              base: str | None = None, precompute: bool = True) -> tuple[dict, object]:
    """Train one iteration on pairs {messages, chosen, rejected}; save ``out_dir/adapter``.
    Returns (metrics, the trained in-memory model).

    ``reference``: None = the model passed in is the reference (model_t, "previous");
    a chain of saved adapters = the reference is that chain's model (``method.reference
    = "base"``: the iteration-0 chain), loaded from ``base`` (the resolved base path).

    The probe reports, on a sample of the pairs (``probe_sample``: seeded by the experiment's
    seed and the iteration, ``PROBE_MIN`` to ``PROBE_MAX`` pairs, its forward work at most
    ``training.probe_share`` of the stage's; ``train/probe_pairs`` says how many), the
    log-likelihoods before and after, the fraction of pairs the model already preferred
    (logp chosen > logp rejected) before training, the implicit reward margin after training
    (beta * change of the chosen-minus-rejected log-ratio, "before" standing for the reference:
    they are one model unless ``reference`` is given) with its standard error over the sample,
    and trl's own reference log-probs of those pairs (``train/ref_logp_*``, what its loss used).
    "Before" and "after" are one instrument: ``pair_logps`` of the policy on the same pairs in
    the same batches, before and after training, so a model that did not move reports exactly
    0 in any dtype (trl's reference pass, another forward, differs from it by bfloat16
    rounding). ``train/ref_gap_to_start`` is the largest distance, on the first
    ``GAP_CHECK_PAIRS`` pairs, between the reference trl holds and the model passed in, both by
    ``pair_logps`` (exactly 0 when the reference is the previous iterate; with ``reference``
    given, how far the start is from it).

    ``precompute``: the reference log-probs of all pairs are computed once, before
    training (``precompute_reference``), instead of by a reference forward in every
    step. The probe's two forwards over the sample and the checks are counted in
    ``train/probe_seconds``.
    """
    if not pairs:
        raise TrainingError("no training pairs for this iteration")
    settings = dpo_steps(cfg, iteration)
    max_length = settings.max_length
    fitted = fit(tokenizer, pairs, ("chosen", "rejected"), max_length, settings.prompt_limit)
    check_share(fitted, len(pairs), settings, "training")
    kept = fitted.items
    check = list(range(min(GAP_CHECK_PAIRS, len(kept))))
    t0 = time.perf_counter()
    start = pair_logps(model, tokenizer, [kept[i] for i in check], max_length)  # before trl wraps the model
    probe_seconds = time.perf_counter() - t0
    trainer = dpo_trainer(model, tokenizer, kept, cfg, iteration, out_dir, reference, base)
    # trl's rows -> our pairs, by the "row" column: nothing is dropped after fitting, but if trl
    # ever drops a row, the probe and its reference values must still be those of one pair
    data = trainer.train_dataset
    pos = {row: i for i, row in enumerate(data["row"])}
    if not pos:
        raise TrainingError(f"trl kept none of the {len(kept)} pairs")
    rows = sorted(pos)
    lengths = row_lengths(data)
    work = stage_work(lengths, settings.epochs, precompute, cfg.training.gradient_checkpointing)
    # the checks' forwards: the start and the reference on the check pairs (merge chain: and the
    # merged model, which runs on the sample's first pairs but is counted at the check pairs' size)
    checks = sum(probe_tokens(lengths[pos[i]]) for i in check if i in pos) * (3 if cfg.chain == "merge" else 2)
    picked = probe_sample([lengths[pos[i]] for i in rows], work, cfg.training.probe_share,
                          key=f"probe/{cfg.experiment.seed}/{iteration}", spent=checks)
    probe = [rows[k] for k in picked]
    probed = [kept[i] for i in probe]
    t0 = time.perf_counter()
    if precompute:
        ref_all = precompute_reference(trainer, lengths=lengths)
        ref_c, ref_r = [ref_all[0][pos[i]] for i in probe], [ref_all[1][pos[i]] for i in probe]
    t1 = time.perf_counter()
    if not precompute:
        ref_c, ref_r = reference_logps(trainer, [pos[i] for i in probe])
    ref_seconds, probe_seconds = t1 - t0, probe_seconds + time.perf_counter() - t1
    # every number compared below comes from pair_logps on the same pairs in the same batches:
    # trl's own forward differs from it by bfloat16 rounding (tenths of a nat per answer),
    # which would show as a gap, a margin and likelihood changes of a model that did not move
    t0 = time.perf_counter()
    with reference_model(trainer) as held:
        at_ref = pair_logps(held, tokenizer, [kept[i] for i in check], max_length)
    gap = max((abs(a - b) for a, b in zip(at_ref[0] + at_ref[1], start[0] + start[1])), default=None)
    c0, r0 = pair_logps(trainer.model, tokenizer, probed, max_length)  # the policy before training
    probe_seconds += time.perf_counter() - t0
    metrics = run_trainer(trainer, out_dir)
    t0 = time.perf_counter()
    c1, r1 = pair_logps(trainer.model, tokenizer, probed, max_length)
    probe_seconds += time.perf_counter() - t0
    n = len(probe)
    merge_gap = None
    if cfg.chain == "merge":  # the next iteration starts from this adapter merged in: check it keeps the model
        t0 = time.perf_counter()
        k = min(n, GAP_CHECK_PAIRS)
        merge_gap = _merge_gap(trainer.model, tokenizer, probed[:k], c1[:k] + r1[:k], max_length)
        probe_seconds += time.perf_counter() - t0
    beta = cfg.method.beta
    margins = [beta * ((c1[i] - c0[i]) - (r1[i] - r0[i])) for i in range(n)]
    metrics.update({
        "train/n_pairs": len(pos), **fitted.metrics(), "train/probe_pairs": n,
        "train/prefers_chosen_before": sum(c0[i] > r0[i] for i in range(n)) / n,
        "train/prefers_chosen_after": sum(c1[i] > r1[i] for i in range(n)) / n,
        "train/logp_chosen_before": sum(c0) / n, "train/logp_rejected_before": sum(r0) / n,
        "train/logp_chosen": sum(c1) / n, "train/logp_rejected": sum(r1) / n,
        "train/reward_margin": sum(margins) / n,
        "train/reward_margin_stderr": statistics.stdev(margins) / math.sqrt(n) if n > 1 else None,
        "train/reward_accuracy": sum(m > 0 for m in margins) / n,
        "train/ref_logp_chosen": sum(ref_c) / n, "train/ref_logp_rejected": sum(ref_r) / n,
        "train/ref_gap_to_start": gap, "train/merge_gap": merge_gap,
        "train/ref_precomputed": int(precompute), "train/ref_seconds": ref_seconds,
        "train/probe_seconds": probe_seconds,
    })
    return metrics, trainer.model


def _merge_gap(model, tokenizer, pairs: Sequence[dict], unmerged: Sequence[float], max_length: int) -> float:
    """Largest log-prob distance, on ``pairs`` (chosen then rejected, as ``unmerged``), between
    the trained model with its "default" adapter applied and the same model with it merged into
    the base weights by peft's merge (the one ``harness.models.load.load_policy`` runs for the next
    iteration). The base weights are restored bit for bit afterwards."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]
    saved = [m.get_base_layer().weight.data.clone() for m in layers]
    try:
        for m in layers:
            m.merge(adapter_names=["default"])
        c, r = pair_logps(model, tokenizer, pairs, max_length)  # a merged layer runs its base layer only
    finally:
        for m, w in zip(layers, saved):
            m.get_base_layer().weight.data = w
            m.merged_adapters.clear()
    return max(abs(a - b) for a, b in zip(c + r, unmerged))
