"""The embedded offline tiny world: checkable instruction tasks, a rule-based
oracle judge, and a small warmed-up Llama model with its tokenizer and data.

``resolve("tiny")`` / ``resolve("tiny:<name>")`` map config references to built
files (building once per content hash, see ``build.py``).
"""

from harness.tiny.build import FILES, TinyParams, ensure_tiny, is_tiny_ref, resolve
from harness.tiny.tasks import Example, check, make_split, parse

__all__ = ["FILES", "Example", "TinyParams", "check", "ensure_tiny", "is_tiny_ref",
           "make_split", "parse", "resolve"]
