"""Training stages, via trl with LoRA / QLoRA: DPO-family iterations on (chosen, rejected)
pairs (``train_dpo``) and SFT (``train_sft``).

- ``dpo``: one DPO iteration, its reference set up for the chain in use, and its probe;
- ``sft``: supervised fine-tuning on {messages, response};
- ``reference``: reference log-probs computed once per iteration;
- ``probe``: the policy's log-probs of pairs, and the sample the post-training probe measures;
- ``trainer``: a trl trainer as the harness builds and runs it (guards, dropout, cost);
- ``schedule``: optimizer steps and the learning rate at each (no torch);
- ``tracking``: training curves and each iteration's results row sent to experiment trackers.

The names below are the package's interface; callers import them from here. Not here:
what a method trains on (``harness.methods``) or the loop's stages (``harness.run.loop``).
"""

from harness.config.experiment import StepSettings
from harness.train.dpo import GAP_CHECK_PAIRS, dpo_trainer, train_dpo
from harness.train.probe import pair_logps, probe_sample
from harness.train.reference import precompute_reference, reference_logps
from harness.train.schedule import dpo_steps, lr_factor, optimizer_steps, warmup_steps
from harness.train.sft import train_sft
from harness.train.trainer import TrainingError, lora_config, only_adapter_dropout, trainer_args

__all__ = ["GAP_CHECK_PAIRS", "StepSettings", "TrainingError", "dpo_steps", "dpo_trainer", "lora_config",
           "lr_factor", "only_adapter_dropout", "optimizer_steps", "pair_logps", "precompute_reference", "probe_sample",
           "reference_logps", "train_dpo", "train_sft", "trainer_args", "warmup_steps"]
