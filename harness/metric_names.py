"""Names of result metrics that tables and plots both single out."""

from __future__ import annotations

PUBLISHED = "published"  # the method of an imported AlpacaEval system's row
WIN_RATE, WIN_SE = "alpaca_eval/win_rate", "alpaca_eval/standard_error"
LC_WIN_RATE = "alpaca_eval/length_controlled_winrate"
N_TOTAL, COVERAGE = "alpaca_eval/n_total", "alpaca_eval/coverage"
VALIDATION = "validation/"  # prefix of the [eval.validation] metrics (choosing an iterate)


def stderr_of(name: str) -> str | None:
    """The metric an lm-eval stderr key belongs to, or None for a non-stderr key."""
    head, _, last = name.rpartition("/")
    return f"{head}/{last.replace('_stderr', '', 1)}" if name.startswith("lm_eval/") and "_stderr" in last else None
