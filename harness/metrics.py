"""The metric catalogue: for each flat metric name (or family of names) what it means and
where it is shown, in one table (``CATALOGUE``), as lm-eval's task YAMLs keep
``higher_is_better`` beside each metric.

A row gives the title (plots), the terminal table's header, the format (``digits``,
``percent``, ``count``, ``signed``), ``higher_is_better`` (None: no direction), the
evaluation or stage that produces it, the views that show it, and its text in a
stage's terminal line. Everything that shows metrics reads this table: the
leaderboard's default columns and Δ columns, the terminal table, the plots, the stage
lines (harness.console.summary), and ``harness validate``'s list of names an evaluation
produces. Adding a metric is its producer plus one row here.

Names are exact keys or patterns: ``*`` stands for any text within one ``/``
component, ``**`` for any text at all. A key belongs to the first row that matches it,
so specific rows come before the families that would also match them. Rows are in
display order: a view lists its keys row by row, and keys of one row in the order
given. Not here: the producers themselves, or how a view lays its columns out.

A key may carry a qualifier, " [<tag>]" after it: the leaderboard's AlpacaEval columns
split by protocol ("alpaca_eval/win_rate [P1]", harness.report.table). Such a key is its
unqualified key's row, and its header, title, companions and standard error carry the
same qualifier.

Views: ``table`` (the leaderboard's default metric columns, files and HTML), ``delta``
(gets a "Δ" column against iteration 0), ``terminal`` (a main column of the terminal
table; ``companions`` follow it there), ``plot`` (a panel per experiment), ``compare``
(a panel of the side-by-side comparison). ``lines`` maps a stage's name to the metric's
text in that stage's line; its syntax is harness.console.summary's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Mapping

# producers: the evaluation or stage that writes a metric
LM_EVAL, ALPACA_EVAL, INDICATORS = "evaluate/lm_eval", "evaluate/alpaca_eval", "indicators"
MT_BENCH = "evaluate/mt_bench"
TRAIN, JUDGE, PAIRS, GENERATE, SELF_INSTRUCT = "train", "judge", "pairs", "generate", "self_instruct"
VALIDATION_JUDGE, COST, LOOP = "validation", "cost", "loop"
STAGE = "stage"  # not a metric a stage writes: what the stage's line itself counted (progress bars, wall time)

VALIDATION = "validation/"  # prefix of the [eval.validation] metrics (choosing an iterate)
WIN_RATE, WIN_SE = "alpaca_eval/win_rate", "alpaca_eval/standard_error"
LC_WIN_RATE = "alpaca_eval/length_controlled_winrate"
N_TOTAL, COVERAGE = "alpaca_eval/n_total", "alpaca_eval/coverage"
SAMPLES, SECONDS = "stage/samples", "stage/seconds"

FORMATS = ("digits", "percent", "count", "signed")
VIEWS = ("table", "delta", "terminal", "plot", "compare")


@dataclass(frozen=True)
class Metric:
    """One catalogue row. ``title``, ``header`` and ``short`` may use the fields of a key
    (``fields``): ``{task}`` and ``{name}`` of ``lm_eval/<task>/<name>,<filter>``."""

    name: str
    title: str
    header: str = ""                 # the terminal table's column (default: the key)
    short: str = ""                  # the same, where space is short (default: the key's last component)
    format: str = "digits"
    digits: int = 3                  # decimals of "digits" and "signed" in a stage line
    higher_is_better: bool | None = None
    producer: str = ""
    views: tuple[str, ...] = ()
    lines: Mapping[str, str] = field(default_factory=dict)
    error_of: str | None = None      # this is the standard error of that metric (a template over ``fields``)
    companions: tuple[str, ...] = ()  # shown right after it in the terminal table

    def __post_init__(self):
        if self.format not in FORMATS or set(self.views) - set(VIEWS):
            raise ValueError(f"metric {self.name!r}: format {self.format!r} or views {self.views!r} unknown")


def _train(text: str) -> dict[str, str]:  # the SFT stage's line reads like training's
    return {"train": text, "init_sft": text}


M = Metric
TABLE, ALL_PANELS = ("table",), ("table", "plot")
CATALOGUE: tuple[Metric, ...] = (
    # evaluate: lm-eval, each task's primary metric and its standard error
    M("lm_eval/**_stderr*", "standard error", producer=LM_EVAL, error_of="{head}/{base}"),
    M("lm_eval/**", "{task} {name}", header="{task} {name}", short="{task}", higher_is_better=True, producer=LM_EVAL,
      views=("table", "delta", "terminal", "plot", "compare"), lines={"evaluate": "{task} {}[ {Δ}]"}),
    # evaluate: AlpacaEval-style win rate against reference answers (harness.evaluate.alpaca)
    M(WIN_RATE, "AlpacaEval win rate (%)", header="win rate", short="win rate", digits=1, higher_is_better=True,
      producer=ALPACA_EVAL, views=("table", "delta", "terminal", "plot", "compare"), companions=(N_TOTAL, COVERAGE),
      lines={"evaluate": "win rate {}[±{alpaca_eval/standard_error}][ ({Δ})][, n={alpaca_eval/n_total}]"
                         "[, {alpaca_eval/coverage} judged][ · LC {alpaca_eval/length_controlled_winrate}]"}),
    M(WIN_SE, "standard error of the win rate", digits=1, producer=ALPACA_EVAL, error_of=WIN_RATE),
    M(LC_WIN_RATE, "length-controlled win rate (%)", header="LC win rate", short="LC win rate", digits=1,
      higher_is_better=True, producer=ALPACA_EVAL, views=("table", "terminal", "plot", "compare")),
    M(N_TOTAL, "instructions judged", header="n", short="n", format="count", producer=ALPACA_EVAL, views=TABLE),
    M(COVERAGE, "instructions with a valid judgment", header="judged", short="judged", format="percent",
      higher_is_better=True, producer=ALPACA_EVAL, views=TABLE),
    M("alpaca_eval/n_cut", "answers cut at eval.alpaca_eval.max_new_tokens", header="cut", short="cut",
      format="count", higher_is_better=False, producer=ALPACA_EVAL, views=TABLE),
    M("alpaca_eval/n_wins", "wins", format="count", producer=ALPACA_EVAL),
    M("alpaca_eval/n_draws", "draws", format="count", producer=ALPACA_EVAL),
    M("alpaca_eval/discrete_win_rate", "discrete win rate (%)", digits=1, higher_is_better=True, producer=ALPACA_EVAL),
    M("alpaca_eval/avg_length", "mean answer length (characters)", format="count", producer=ALPACA_EVAL),
    M("alpaca_eval/n_instructions", "instructions", format="count", producer=ALPACA_EVAL),
    # evaluate: MT-Bench by FastChat's protocol (harness.evaluate.mt_bench), ratings 1-10
    M("mt_bench/score", "MT-Bench score (1-10)", header="MT-Bench", short="MT-Bench", digits=2, higher_is_better=True,
      producer=MT_BENCH, views=("table", "delta", "terminal", "plot", "compare"),
      companions=("mt_bench/turn_1", "mt_bench/turn_2"),
      lines={"evaluate": "MT-Bench {}[ ({Δ})][, turn 1 {mt_bench/turn_1}][, turn 2 {mt_bench/turn_2}]"
                         "[, {mt_bench/n_invalid} invalid]"}),
    M("mt_bench/turn_1", "MT-Bench turn 1", header="turn 1", short="turn 1", digits=2, higher_is_better=True,
      producer=MT_BENCH, views=TABLE),
    M("mt_bench/turn_2", "MT-Bench turn 2", header="turn 2", short="turn 2", digits=2, higher_is_better=True,
      producer=MT_BENCH, views=TABLE),
    M("mt_bench/n_invalid", "MT-Bench turns without a valid rating", format="count", higher_is_better=False,
      producer=MT_BENCH, views=TABLE),
    M("mt_bench/n_turns", "MT-Bench turns judged", format="count", producer=MT_BENCH),
    M("mt_bench/n_questions", "MT-Bench questions", format="count", producer=MT_BENCH),
    M("mt_bench/coverage", "MT-Bench turns with a valid rating", format="percent", higher_is_better=True,
      producer=MT_BENCH),
    M("mt_bench/n_cut", "MT-Bench answers cut at eval.mt_bench.max_new_tokens", format="count",
      higher_is_better=False, producer=MT_BENCH),
    M("mt_bench/*", "MT-Bench {words}", digits=2, higher_is_better=True, producer=MT_BENCH),
    # evaluate: over-optimisation indicators (harness.evaluate.indicators)
    M("indicators/distinct_1", "distinct 1", higher_is_better=True, producer=INDICATORS, views=ALL_PANELS),
    M("indicators/distinct_2", "distinct 2", higher_is_better=True, producer=INDICATORS, views=ALL_PANELS),
    M("indicators/mean_length", "mean length (tokens)", producer=INDICATORS, views=ALL_PANELS),
    M("indicators/topk_entropy", "top-k entropy", producer=INDICATORS, views=ALL_PANELS),
    M("indicators/topk_mass", "top-k mass", producer=INDICATORS, views=ALL_PANELS),
    M("indicators/n_cut", "indicator answers cut at max_new_tokens", format="count", producer=INDICATORS),
    M("indicators/cut_share", "share of indicator answers cut at max_new_tokens", format="percent",
      producer=INDICATORS),
    M("indicators/**", "{words}", producer=INDICATORS, views=ALL_PANELS),
    # pairs: the method's preference pairs
    M("pairs/n_pairs", "pairs", format="count", producer=PAIRS, views=TABLE, lines={"pairs": "{} pairs"}),
    M("pairs/n_prompts", "prompts", format="count", producer=PAIRS, lines={"pairs": "from {} prompts"}),
    M("pairs/n_candidates", "candidates", format="count", producer=PAIRS),
    M("pairs/chosen_mean_chars", "mean chosen length (characters)", producer=PAIRS),
    M("pairs/rejected_mean_chars", "mean rejected length (characters)", producer=PAIRS),
    M("pairs/cut_chosen_dropped", "pairs dropped: chosen answer cut at max_new_tokens", format="count",
      producer=PAIRS, lines={"pairs": "{} dropped (chosen cut)"}),
    M("pairs/cut_rejected_dropped", "pairs dropped: rejected answer cut at max_new_tokens", format="count",
      producer=PAIRS, lines={"pairs": "{} dropped (rejected cut)"}),
    M("pairs/chosen_cut", "pairs whose chosen answer was cut at max_new_tokens (trained without end-of-turn)",
      format="count", producer=PAIRS),
    M("pairs/rejected_cut", "pairs whose rejected answer was cut at max_new_tokens (trained without end-of-turn)",
      format="count", producer=PAIRS, lines={"pairs": "{} with a cut rejected"}),
    # judge: the method's judge scoring candidates (harness.judges.judging)
    M("judge/n_items", "items judged", format="count", producer=JUDGE, lines={"judge": "{} judged"}),
    M("judge/coverage", "items with a valid judgment", format="percent", higher_is_better=True, producer=JUDGE,
      views=TABLE, lines={"judge": "coverage {}"}),
    M("judge/score_mean", "mean judge score of the policy's samples", digits=2, producer=JUDGE,
      lines={"judge": "mean score {}"}),
    M("judge/teacher_score_mean", "mean judge score of the teacher's answers", digits=2, producer=JUDGE,
      lines={"judge": "teacher {}"}),
    M("judge/oracle_pair_agreement", "oracle agreement", digits=2, higher_is_better=True, producer=JUDGE,
      views=TABLE, lines={"judge": "oracle agreement {}"}),
    M("judge/n_failed", "items without a valid judgment", format="count", higher_is_better=False, producer=JUDGE),
    # train: DPO / SFT training (harness.train)
    M("train/steps", "optimizer steps", format="count", producer=TRAIN, lines=_train("{} steps")),
    M("train/n_pairs", "pairs trained on", format="count", producer=TRAIN, lines=_train("{} pairs")),
    M("train/n_pairs_truncated", "pairs (examples) with a prompt or answer cut to fit max_length", format="count",
      higher_is_better=False, producer=TRAIN, lines=_train("{} cut to fit")),
    M("train/n_pairs_dropped", "pairs (examples) that cannot fit max_length", format="count", higher_is_better=False,
      producer=TRAIN, lines=_train("{} dropped")),
    M("train/loss_first", "first loss", higher_is_better=False, producer=TRAIN),
    M("train/loss", "last loss", higher_is_better=False, producer=TRAIN,
      lines=_train("loss [{train/loss_first}→]{}")),
    M("train/reward_margin", "reward margin (train)", format="signed", higher_is_better=True, producer=TRAIN,
      views=ALL_PANELS, lines=_train("margin {}[±{train/reward_margin_stderr}]")),
    M("train/reward_margin_stderr", "standard error of the reward margin over the probe's pairs", producer=TRAIN,
      error_of="train/reward_margin"),
    M("train/reward_accuracy", "reward accuracy", digits=2, higher_is_better=True, producer=TRAIN,
      lines=_train("reward acc {}")),
    M("train/probe_pairs", "pairs in the after-training probe", format="count", producer=TRAIN),
    M("train/prefers_chosen_before", "already preferred chosen", producer=TRAIN, views=("plot",)),
    M("train/logp_chosen", "log p(chosen)", producer=TRAIN, views=("plot",)),
    M("train/logp_rejected", "log p(rejected)", producer=TRAIN, views=("plot",)),
    M("train/tokens", "tokens trained", format="count", producer=TRAIN),
    # generate: the method's sampling
    M(SAMPLES, "samples", format="count", producer=STAGE, lines={"generate": "{} samples"}),
    M("gen/tokens", "tokens generated", format="count", producer=GENERATE, views=TABLE,
      lines={"generate": "{} tokens[ · {per_s} tok/s]"}),
    M("gen/n_cut", "samples cut at max_new_tokens", format="count", higher_is_better=False, producer=GENERATE,
      lines={"generate": "{} cut[ ({gen/cut_share})]"}),
    M("gen/cut_share", "share of samples cut at max_new_tokens", format="percent", higher_is_better=False,
      producer=GENERATE),
    M("gen/n_prompts_cut", "prompts cut from the left to training.max_prompt_length before sampling",
      format="count", higher_is_better=False, producer=GENERATE, lines={"generate": "{} prompts cut"}),
    M("gen/n_prompts_too_long", "prompts that cannot fit training.max_prompt_length (their pairs are dropped)",
      format="count", higher_is_better=False, producer=GENERATE),
    M("self_instruct/n_prompts", "new prompts", format="count", producer=SELF_INSTRUCT,
      lines={"self_instruct": "{} new prompts[ of {self_instruct/n_requests}]"}),
    M("self_instruct/n_cut", "self-instruction outputs cut at their max_new_tokens", format="count",
      higher_is_better=False, producer=SELF_INSTRUCT, lines={"self_instruct": "{} cut"}),
    M("self_instruct/cut_share", "share of self-instruction outputs cut", format="percent", higher_is_better=False,
      producer=SELF_INSTRUCT),
    # validation: [eval.validation]'s judge (harness.run.selection); its other metrics are
    # "validation/" + an evaluate metric, shown with that metric's evaluate text
    M("validation/judge/score_mean", "validation judge score", digits=2, higher_is_better=True,
      producer=VALIDATION_JUDGE,
      lines={"validation": "judge score {}[ {Δ:+.3f}][ on {validation/judge/n_scored} prompts]"}),
    M("validation/judge/n_prompts", "validation prompts", format="count", producer=VALIDATION_JUDGE),
    M("validation/judge/n_scored", "validation prompts scored", format="count", producer=VALIDATION_JUDGE),
    M("validation/judge/coverage", "validation prompts scored", format="percent", producer=VALIDATION_JUDGE),
    M("validation/judge/n_cut", "validation answers cut at generation.max_new_tokens", format="count",
      producer=VALIDATION_JUDGE),
    M("validation/judge/cut_share", "share of validation answers cut at generation.max_new_tokens",
      format="percent", producer=VALIDATION_JUDGE),
    # the row: wall time, which iterate was selected, what it cost (harness.store.cost)
    M("wall_time_s", "wall time (s)", higher_is_better=False, producer=LOOP, views=TABLE),
    M("selected", "selected iterate", format="count", producer=LOOP),
    M("cost/wall_s", "wall time of the stages (s)", higher_is_better=False, producer=COST, views=TABLE),
    M("cost/gen_tokens", "tokens generated", format="count", higher_is_better=False, producer=COST, views=TABLE),
    M("cost/train_tokens", "tokens trained", format="count", higher_is_better=False, producer=COST, views=TABLE),
    M("cost/judge_calls", "judge calls", format="count", higher_is_better=False, producer=COST, views=TABLE),
    M("cost/peak_mem_mb", "peak memory (MB)", higher_is_better=False, producer=COST, views=TABLE),
    M("cost/gpu_s", "GPU time (s)", higher_is_better=False, producer=COST, views=TABLE),
    M("cost/**", "{words}", higher_is_better=False, producer=COST),
)
del M


# ---------------------------------------------------------------- lookups

def _pattern(name: str) -> re.Pattern:
    parts = re.split(r"(\*\*|\*)", name)
    return re.compile("".join(".*?" if p == "**" else "[^/]*?" if p == "*" else re.escape(p) for p in parts))


_PATTERNS = [(_pattern(m.name), m) for m in CATALOGUE]
_RANK = {m.name: i for i, m in enumerate(CATALOGUE)}


_QUALIFIED = re.compile(r"(.+)( \[[^\[\]/]+\])")


def qualified(key: str) -> tuple[str, str]:
    """(the key without its qualifier, the qualifier " [<tag>]" or "")."""
    m = _QUALIFIED.fullmatch(key)
    return (m.group(1), m.group(2)) if m else (key, "")


@lru_cache(maxsize=4096)
def find(key: str) -> Metric | None:
    """The catalogue row of ``key`` (None for a metric it does not know)."""
    key = qualified(key)[0]
    return next((m for pattern, m in _PATTERNS if pattern.fullmatch(key)), None)


def fields(key: str) -> dict[str, str]:
    """What a row's templates may use: ``task`` and ``name`` (``lm_eval/<task>/<name>,<filter>``;
    empty for a key of fewer components), ``head`` / ``last`` (before / after the last "/"),
    ``base`` (the last component without its first "_stderr") and ``words`` (the last
    component, "_" as spaces)."""
    parts = key.split("/")
    head, _, last = key.rpartition("/")
    return {"task": parts[1] if len(parts) > 1 else "", "name": parts[-1].split(",")[0] if len(parts) > 2 else "",
            "head": head, "last": last, "base": last.replace("_stderr", "", 1), "words": last.replace("_", " ")}


def _fill(template: str, key: str) -> str:
    return template.format(**fields(key)).strip()


def title(key: str) -> str:
    """A plot's title for ``key`` (an unknown key: its last component, in words)."""
    m = find(key)
    key, tag = qualified(key)
    return _fill(m.title if m is not None else "{words}", key) + tag


def header(key: str, short: bool = False) -> str:
    """The terminal table's column header for ``key``."""
    m = find(key)
    text = (m.short if short else m.header) if m is not None else ""
    base, tag = qualified(key)
    return _fill(text, base) + tag if text else key.rsplit("/", 1)[-1] if short else key


def stderr_of(key: str) -> str | None:
    """The metric ``key`` is the standard error of, or None when it is none's."""
    m = find(key)
    key, tag = qualified(key)
    return _fill(m.error_of, key) + tag if m is not None and m.error_of else None


def shows(key: str, view: str) -> bool:
    m = find(key)
    return m is not None and view in m.views


def rank(key: str) -> int:
    """The position of ``key``'s row in the catalogue (display order); unknown keys last."""
    m = find(key)
    return _RANK[m.name] if m is not None else len(CATALOGUE)


def ordered(keys: Iterable[str], view: str) -> list[str]:
    """The keys ``view`` shows, row by row in catalogue order (keys of one row as given)."""
    shown = [(rank(k), i, k) for i, k in enumerate(keys) if shows(k, view)]
    return [k for _, _, k in sorted(shown)]


def produced_by(producer: str) -> tuple[str, ...]:
    """The exact names a producer writes (families like lm_eval's are not listed)."""
    return tuple(m.name for m in CATALOGUE if m.producer == producer and "*" not in m.name)


def companions(key: str) -> tuple[str, ...]:
    m = find(key)
    tag = qualified(key)[1]
    return tuple(c + tag for c in m.companions) if m is not None else ()
