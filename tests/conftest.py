"""Shared test setup: offline environment and a random tiny Llama saved to disk."""

from __future__ import annotations

import os

import pytest

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

# tiny models: one thread avoids OpenMP contention on small, busy CPUs (several times faster here)
torch.set_num_threads(1)

from test_eval_fixtures import tiny_dir, tiny_reward_model  # noqa: E402,F401  (random tiny models, fixtures)
from harness.console import terminal as console  # noqa: E402
import harness.judges  # noqa: E402,F401  (registers the judge kinds, as the CLI does)
import harness.methods  # noqa: E402,F401  (registers the methods, as the CLI does)


@pytest.fixture
def library_console():
    """Library output (no terminal lines): a CLI test before may have left the console
    configured with its own, since closed, captured stream. Tests that run the loop as a
    library use it (``pytest.mark.usefixtures("library_console")``)."""
    console.reset()
    yield
    console.reset()
