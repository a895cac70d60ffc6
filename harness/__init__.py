"""Reproducible, resumable harness for iterative self-improvement alignment."""

__version__ = "0.1.0"
