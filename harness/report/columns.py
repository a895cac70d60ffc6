"""The leaderboard's column vocabulary: the suffixes and prefixes of companion columns
(standard error, Δ, between-seeds sd, a Δ's interval and significance), the id, text and
provenance columns, and protocol columns with their scopes and tags. Names only: building
the table is ``harness.report.table``, the conventions they follow are in its docstring.
"""

from __future__ import annotations

import pandas as pd

from harness.report.protocol import AE_SCOPE, scope_of, tag_protocols


UNAVAILABLE = "unavailable"


SE = " ±"  # suffix of a standard-error column


DELTA = "Δ "  # prefix of a delta-vs-iteration-0 column


SD = " sd"  # suffix of a between-seeds standard deviation column


LO, HI, SIG = " lo", " hi", " sig"  # suffixes of a Δ's paired 95% interval and whether it excludes 0


COMPANIONS = (SE, SD, LO, HI, SIG)  # columns that belong to the one they suffix


SEEDS = "seeds"  # number of seeds in a row (only in tables that aggregate seeds)


SWEEP = "sweep"  # a row's sweep point, "key=value, ..." (only in tables with sweep rows)


ID_COLS = ["experiment", "method", "model", "iteration"]


TEXT_COLS = ["experiment", "method", "model"]


KEY_VERSIONS = ("torch", "transformers", "trl")  # packages shown as provenance columns


PROV_COLS = ["config_hash", "seed", "commit", *KEY_VERSIONS]


PROTOCOL = "protocol"  # the AlpacaEval protocol's label (only in tables with AlpacaEval metrics)


def protocol_column(scope: str) -> str:
    """The column of a scope's protocol labels: "protocol" (AlpacaEval), "protocol lm_eval/<task>"."""
    return PROTOCOL if scope == AE_SCOPE else f"{PROTOCOL} {scope}"


def is_protocol_column(col: str) -> bool:
    return col == PROTOCOL or col.startswith(PROTOCOL + " ")


def column_scope(col: str) -> str | None:
    """The scope of a metric column, its Δ or a companion ("Δ lm_eval/t/acc ±" -> "lm_eval/t"),
    or of a protocol column; None for any other column."""
    if is_protocol_column(col):
        return AE_SCOPE if col == PROTOCOL else col[len(PROTOCOL) + 1:]
    body = col[len(DELTA):] if col.startswith(DELTA) else col
    return scope_of(body)


def protocol_tags(df: pd.DataFrame) -> dict[str, dict[str, str]]:
    """{scope: {protocol label: its tag "P1", "P2", ...}} for the scopes whose rows in the table
    have more than one protocol (harness.report.protocol.tag_protocols, in the order of the protocol
    columns); {} when no scope has several."""
    return tag_protocols({column_scope(c): df[c] for c in df.columns if is_protocol_column(c)})


def tagged(col: str, tag: str) -> str | None:
    """The column ``col`` (a metric of a scope, its Δ, or one of their companions) for the
    protocol ``tag``: "alpaca_eval/win_rate ±" -> "alpaca_eval/win_rate [P1] ±"; None for a
    column of no scope."""
    lead = DELTA if col.startswith(DELTA) else ""
    body = col[len(lead):]
    if is_protocol_column(col) or scope_of(body) is None:
        return None
    tail = next((x for x in COMPANIONS if body.endswith(x)), "")
    return f"{lead}{body[: len(body) - len(tail)]} [{tag}]{tail}"
