"""The reference's log-probs of training pairs (trl's numbers).

The reference is frozen for a whole iteration, so its log-probs of the training
pairs are computed once before training (``precompute_reference``) and trl reads
them from the dataset: no step runs a reference forward. ``reference_logps`` is
the same computation on given pairs in trl's per-step batches.
``use_reference_adapter`` makes the frozen "ref" adapter of a continue chain the
model of a given adapter chain; ``reference_model`` hands out the reference trl
holds, for other forwards to measure it (the probe's checks).

Not here: building the trainer or choosing the reference (``harness.train.dpo``), the
policy's own log-probs (``harness.train.probe``).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Sequence

from harness.train.trainer import TrainingError


def use_reference_adapter(model, reference: Sequence[Path]) -> None:
    """Continue chain: make the frozen "ref" adapter the model of the adapter chain
    ``reference`` (its newest adapter carries the earlier ones; none = the base)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        if reference:
            raise TrainingError("a reference adapter needs a PEFT policy (continue chain)")
        return  # a fresh adapter: trl's adapter-disabled reference is the base already
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    if reference:
        model.load_adapter(str(reference[-1]), adapter_name="ref", is_trainable=False)
    model.set_adapter("default")
    for name, param in model.named_parameters():
        if ".ref." in name:
            param.requires_grad_(False)


@contextlib.contextmanager
def reference_model(trainer):
    """Inside the context, the model trl's loss takes its reference log-probs from, selected
    as ``compute_ref_log_probs`` selects it: trl's ``ref_model``; or the trainer's PEFT model
    with its frozen "ref" adapter active or, without one, every adapter disabled; or the
    trainer's model itself. The policy's adapter is active again on leaving, also on error."""
    from peft import PeftModel
    from trl.trainer.utils import use_adapter

    model = trainer.model
    if trainer.ref_model is not None:
        yield trainer.ref_model
    elif isinstance(model, PeftModel):
        with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
            yield model
    else:
        yield model


def _reference_forward(trainer, batches: Sequence[Sequence[int]], n: int) -> tuple[list[float], list[float]]:
    """(chosen, rejected) reference log-probs of the rows of ``trainer.train_dataset`` in
    ``batches`` (lists of row indices below ``n``), at their indices: trl's
    ``compute_ref_log_probs`` on the reference the trainer holds, in eval mode."""
    data = trainer.train_dataset
    model = trainer.ref_model or trainer.model
    device = next(trainer.model.parameters()).device
    chosen, rejected = [0.0] * n, [0.0] * n
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        for idx in batches:
            batch = trainer.data_collator([data[i] for i in idx])
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            c, r = trainer.compute_ref_log_probs(model, batch)
            for i, a, b in zip(idx, c.float().tolist(), r.float().tolist()):
                chosen[i], rejected[i] = a, b
    finally:
        trainer.model.train(was_training)
    return chosen, rejected


def reference_logps(trainer, rows: int | Sequence[int]) -> tuple[list[float], list[float]]:
    """trl's own reference log-probs (chosen, rejected) of the rows ``rows`` of
    ``trainer.train_dataset`` (positions in it; an int n = the first n), in that order,
    computed the way its loss computes them (in its batches, in order), in eval mode."""
    rows = list(range(rows)) if isinstance(rows, int) else list(rows)
    step = trainer.args.per_device_train_batch_size
    chosen, rejected = _reference_forward(trainer, [rows[i:i + step] for i in range(0, len(rows), step)],
                                          len(trainer.train_dataset))
    return [chosen[i] for i in rows], [rejected[i] for i in rows]


def row_lengths(data) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of each row of trl's tokenized DPO dataset."""
    return [(len(p), len(c), len(r)) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])]


def precompute_reference(trainer, batch_size: int | None = None,
                         lengths: Sequence[tuple[int, int, int]] | None = None) -> tuple[list[float], list[float]]:
    """The reference log-probs of every training pair, computed once per iteration (the
    reference is frozen while an iteration trains) and handed to trl as its precomputed
    columns, so no training step runs a reference forward. Returns (chosen, rejected) in
    the order of ``trainer.train_dataset``.

    The numbers are those of trl's per-step path: ``trainer.compute_ref_log_probs`` on the
    reference the trainer holds (the adapter-disabled model, the frozen "ref" adapter, or a
    ``ref_model``), in eval mode; the reference never drops out (``only_adapter_dropout``),
    so train and eval mode agree. Call it once the reference is final (after
    ``dpo_trainer``). Only the batching differs: pairs of similar length go together
    (longest first, ``batch_size`` pairs, default twice the training batch), which changes
    the values by float rounding only. ``lengths``: ``row_lengths`` of the dataset, when the
    caller has them already. trl's own ``precompute_ref_log_probs`` runs inside
    ``DPOTrainer.__init__``, before the harness can swap in a "base" reference adapter, and
    hashes the model and writes a dataset cache file, so it is not used."""
    data = trainer.train_dataset
    n = len(data)
    size = batch_size or 2 * trainer.args.per_device_train_batch_size
    cap = trainer.args.max_length or math.inf
    longest = [min(cap, p + max(c, r)) for p, c, r in (lengths or row_lengths(data))]
    order = sorted(range(n), key=lambda i: -longest[i])
    chosen, rejected = _reference_forward(trainer, [order[s:s + size] for s in range(0, n, size)], n)
    data = data.remove_columns([c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in data.column_names])
    trainer.train_dataset = data.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)
    trainer.precompute_ref_logps = True
    return chosen, rejected
