"""What a run loads: where a model or data reference points (``sources``: the tiny world,
the built-in offline models, the hub cache), base models, tokenizers and the chain of
adapters (``load``), and prompt / answer data in one shape (``data``).

Not here: generating from a model (``harness.engines``), training it (``harness.train``),
the configuration that names it (``harness.config``). Imports ``harness.store`` and
``harness.tiny`` only.
"""
