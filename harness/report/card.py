"""The model card (README.md) of an exported iterate (``harness export``): what the model is
(method, iteration, how it was chosen, config hash, base model and revision, adapter chain,
saved precision) and the run's results row for that iteration, each evaluation number with
its protocol label (harness.report.protocol), its standard error and its paired gain over
iteration 0, then the iteration's training and cost numbers.

Numbers are shown as the leaderboard shows them (``fmt.number``: about 3-4 significant
digits); the exact row travels beside the card (``harness_export.json``). Not here: which
iterate is exported or how its weights are made (harness.export).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness import fmt, metrics
from harness.report.protocol import UNKNOWN, row_labels, scope_of

# the evaluations a card reports with their protocols (final.json's "test" metrics, and the
# validation metrics that choose an iterate); everything else is the iteration's training and cost
EVALUATIONS = ("lm_eval/", "alpaca_eval/", "indicators/", "validation/")


@dataclass
class CardFacts:
    """What the card says about the model besides its results row."""
    experiment: str
    method: str
    iteration: int
    iterations: int                # the run's configured number of iterations
    chosen_by: str                 # how this iteration was picked ("--iteration 1", "the final iterate (...)")
    config_hash: str
    base: str                      # model.base as configured
    revision: str                  # model.revision
    base_identity: dict            # harness.models.sources.identity of the base the run used
    run_precision: str             # "float32", "bfloat16, 4-bit nf4 quantization", ...
    chain: str                     # "merge" or "continue"
    adapters: list[str]            # the chain's adapters, relative to the run directory
    saved: str                     # what the directory holds, one sentence
    seed: int | None = None
    git: str = ""                  # the harness commit of the run
    library: str = "transformers"  # "peft" for --adapter-only
    tags: list[str] = field(default_factory=list)


def _front_matter(facts: CardFacts) -> list[str]:
    lines = ["---", f"library_name: {facts.library}"]
    if facts.base_identity.get("kind") == "hub":  # only a hub id is a base_model the hub can link
        lines.append(f"base_model: {facts.base}")
    lines += ["tags:"] + [f"- {t}" for t in ["selfimprove-harness", facts.method, "dpo", "lora", *facts.tags]]
    return lines + ["---", ""]


def _identity_text(identity: dict, revision: str) -> str:
    """The base's revision and content id: a hub revision, a GGUF file's sha256, a local
    directory's fingerprint."""
    parts = [f"revision `{identity.get('revision', revision)}`"]
    if identity.get("sha256"):
        parts.append(f"{identity.get('file', 'file')} sha256 `{identity['sha256']}`")
    if identity.get("fingerprint"):
        parts.append(f"weights fingerprint `{identity['fingerprint']}`")
    return f"{identity.get('kind', '?')} model; " + ", ".join(parts)


def _about(facts: CardFacts) -> list[str]:
    chain = ("merge: every adapter merged in order" if facts.chain == "merge"
             else "continue: the newest adapter carries the earlier iterations")
    rows = [("method", f"{facts.method} ({fmt.plural(facts.iterations, 'iteration')} configured)"),
            ("iteration", f"{facts.iteration}: {facts.chosen_by}"),
            ("experiment", facts.experiment + (f", seed {facts.seed}" if facts.seed is not None else "")),
            ("config hash", f"`{facts.config_hash}`"),
            ("base model", f"`{facts.base}`"),
            ("base revision", _identity_text(facts.base_identity, facts.revision)),
            ("base precision in the run", facts.run_precision),
            ("adapter chain", f"{chain}; " + (", ".join(f"`{a}`" for a in facts.adapters) or "none (the base itself)")),
            ("this directory", facts.saved)]
    if facts.git:
        rows.append(("harness commit", f"`{facts.git}`"))
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _errors(keys) -> dict[str, str]:
    """{metric: the key of its standard error} among ``keys``."""
    return {of: k for k in keys if (of := metrics.stderr_of(k)) is not None}


def protocol_of(row: dict, key: str) -> str:
    """The protocol label of metric ``key`` in ``row`` ("" for a metric without a scope:
    indicators, validation)."""
    scope = scope_of(key)
    return (row_labels([row], scope)[0] or UNKNOWN) if scope else ""


def evaluation_lines(row: dict) -> list[str]:
    """The card's results table: one line per evaluation metric of ``row`` (catalogue order),
    value ± standard error, the paired gain over iteration 0 with its 95% interval, the protocol."""
    m = row["metrics"]
    errors = _errors(m)
    keys = sorted((k for k in m if k.startswith(EVALUATIONS) and metrics.stderr_of(k) is None),
                  key=lambda k: (metrics.rank(k), k))
    lines = ["| metric | value | Δ vs iteration 0 [95% CI] | protocol |", "|---|---|---|---|"]
    for k in keys:
        value = fmt.number(m[k], grouped=False)
        if k in errors and not fmt.missing(m[k]) and not fmt.missing(m[errors[k]]):
            value += f" ± {fmt.number(m[errors[k]], grouped=False)}"
        gain = (row.get("paired") or {}).get(k) or {}
        delta = (f"{fmt.number(gain.get('mean'), signed=True)} [{fmt.number(gain.get('ci_low'), signed=True)}, "
                 f"{fmt.number(gain.get('ci_high'), signed=True)}]" + ("*" if gain.get("significant") else "")
                 if gain else "")
        lines.append(f"| {metrics.title(k)} (`{k}`) | {value} | {delta} | {protocol_of(row, k)} |")
    return lines


def other_lines(row: dict) -> list[str]:
    """The iteration's training, generation, judging and cost numbers (no protocols)."""
    m = row["metrics"]
    keys = sorted((k for k in m if not k.startswith(EVALUATIONS) and k != "selected"),
                  key=lambda k: (metrics.rank(k), k))
    return ["| metric | value |", "|---|---|"] + [f"| {metrics.title(k)} (`{k}`) | {fmt.number(m[k], grouped=False)} |"
                                                 for k in keys]


def model_card(facts: CardFacts, row: dict, usage: str) -> str:
    """README.md of an exported iterate: ``facts``, the results row ``row`` of its iteration,
    and ``usage`` (a Python snippet that loads it)."""
    title = f"{facts.experiment}: {facts.method}, iteration {facts.iteration}"
    source = f"Exported by `harness export` (selfimprove-harness) from the run `{facts.experiment}`."
    out = _front_matter(facts) + [f"# {title}", "", source, ""] + _about(facts)
    out += ["", f"## Results of iteration {facts.iteration}", "",
            "As the run measured them (its `results.jsonl` row; the exact values are in `harness_export.json`). "
            "± is the standard error; Δ is the paired gain over the same run's iteration 0 on the items both "
            "evaluated, * where its 95% interval excludes 0. Numbers of different protocols are not comparable.",
            ""] + evaluation_lines(row)
    out += ["", f"## Training and cost of iteration {facts.iteration}", ""] + other_lines(row)
    out += ["", "## Use", "", "```python", usage.rstrip(), "```", ""]
    return "\n".join(out)
