"""The embedded offline tiny world: checkable instruction tasks (``tasks``), the
rule-based grader (``oracle``), and a small warmed-up Llama with its tokenizer and
data, built on demand and cached by content hash (``build``: ``ensure_tiny``,
``resolve("tiny")`` / ``resolve("tiny:<name>")``). Not here: where a ``tiny:`` reference of an
experiment points among the other sources (``harness.models.sources``)."""
