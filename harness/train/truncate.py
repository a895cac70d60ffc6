"""Fitting training pairs (and SFT examples) into ``max_length`` before trl sees them.

trl 1.16 cuts prompt + answer together to ``max_length`` keeping the start, and drops an
example only when its prompt alone fills ``max_length``: a long prompt silently eats the
answer, and a longer one drops the pair (all of them: the stage then fails deep in the
trainer). So every prompt is first cut to the stage's ``prompt_limit`` tokens (rendered,
chat template included) from the LEFT, keeping the conversation valid for the template:

1. whole earlier turns are dropped, oldest first, so that the kept part still starts
   with a user turn; a system message stays;
2. only if the last user turn alone (with the system message) is still too long, the
   start of its text is cut;
3. a prompt that cannot fit even so (a system message alone too long) drops its pair.

An answer longer than what is left (``max_length`` minus the prompt) keeps its start,
as trl's ``keep_start`` would cut it, but ``cut_answers`` does the cut on trl's
tokenized rows, so trl's own truncation never triggers. Every pair with a cut prompt or
answer is counted (``n_truncated``), every dropped one too (``n_dropped``), and a stage
whose share of them exceeds ``max_truncated_share`` fails (``check_share``).

Not here: training itself (``harness.train.dpo``, ``harness.train.sft``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from harness.engines.generate import chat_ids
from harness.train.ended import answer_ids
from harness.train.trainer import TrainingError


@dataclass
class Fitted:
    """Items (pairs or SFT examples) with prompts fitted, and what fitting did."""
    items: list[dict] = field(default_factory=list)   # kept items, prompts fitted (copies when cut)
    index: list[int] = field(default_factory=list)    # each kept item's position in the input
    n_truncated: int = 0                               # kept items with a cut prompt or answer
    n_dropped: int = 0                                 # items that cannot fit at all
    n_prompts_cut: int = 0
    n_answers_cut: int = 0

    def metrics(self, prefix: str = "train/n_pairs") -> dict:
        return {f"{prefix}_truncated": self.n_truncated, f"{prefix}_dropped": self.n_dropped}


def _cut_text_left(tokenizer, messages: list[dict], limit: int) -> list[dict] | None:
    """``messages`` whose last turn's text keeps as many of its last tokens as fit in
    ``limit`` rendered prompt tokens; None when even an empty text does not fit."""
    last = messages[-1]
    toks = tokenizer.encode(last["content"], add_special_tokens=False)

    def with_tail(k: int) -> list[dict]:
        text = tokenizer.decode(toks[len(toks) - k:]).lstrip("\ufffd") if k else ""
        return messages[:-1] + [{**last, "content": text}]

    def fits(k: int) -> bool:
        return len(chat_ids(tokenizer, with_tail(k), True)) <= limit

    if not fits(0):
        return None
    lo, hi = 0, len(toks)  # fits(lo) holds; largest k that fits (token merges make it nearly monotone)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return with_tail(lo)


def fit_prompt(tokenizer, messages: Sequence[dict], limit: int) -> tuple[list[dict], bool] | None:
    """(messages, whether they were cut) with at most ``limit`` rendered prompt tokens, cut
    from the left as the module doc says; None when no valid prompt fits."""
    messages = list(messages)
    if len(chat_ids(tokenizer, messages, True)) <= limit:
        return messages, False
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(head):]
    starts = [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]
    for i in starts:  # drop whole earlier turns, oldest first
        candidate = head + rest[i:]
        if len(chat_ids(tokenizer, candidate, True)) <= limit:
            return candidate, True
    last_user = starts[-1] if starts else 0
    cut = _cut_text_left(tokenizer, head + rest[last_user:], limit)
    return (cut, True) if cut is not None else None


def fit(tokenizer, items: Sequence[dict], answers: Sequence[str], max_length: int, limit: int) -> Fitted:
    """Fit each item's ``messages`` to ``limit`` prompt tokens and count the answers (the
    item's keys ``answers``) that exceed ``max_length`` with that prompt."""
    out = Fitted()
    for n, item in enumerate(items):
        got = fit_prompt(tokenizer, item["messages"], limit)
        if got is None:
            out.n_dropped += 1
            continue
        messages, prompt_cut = got
        answer_cut = any(sum(map(len, answer_ids(tokenizer, messages, item, k))) > max_length for k in answers)
        out.n_prompts_cut += prompt_cut
        out.n_answers_cut += answer_cut
        out.n_truncated += prompt_cut or answer_cut
        out.items.append({**item, "messages": messages} if prompt_cut else item)
        out.index.append(n)
    return out


def check_share(fitted: Fitted, n: int, settings, where: str, what: str = "pairs") -> None:
    """Fail when more than ``settings.max_truncated_share`` of the ``n`` items were cut or
    dropped, naming the lengths to raise."""
    bad = fitted.n_truncated + fitted.n_dropped
    if not n or bad / n <= settings.max_truncated_share:
        if not fitted.items:
            raise TrainingError(f"no {what} fit {where}.max_length = {settings.max_length}")
        return
    raise TrainingError(
        f"{bad} of {n} {what} do not fit {where}.max_length = {settings.max_length} tokens (prompts at most "
        f"{settings.prompt_limit}): {fitted.n_prompts_cut} prompts cut from the left, {fitted.n_answers_cut} "
        f"answers cut at the end, {fitted.n_dropped} dropped; more than {where}.max_truncated_share = "
        f"{settings.max_truncated_share}. Raise {where}.max_length (and max_prompt_length), shorten the data "
        f"(generation.max_new_tokens), or raise max_truncated_share to train on cut {what}")


def cut_answers(dataset, max_length: int, keys: Sequence[str] = ("chosen_ids", "rejected_ids")):
    """trl's tokenized rows with each completion cut to what ``max_length`` leaves after its
    prompt (keeping the start, as trl's ``keep_start`` collator would), so the collator
    never truncates."""
    def cut(row):
        room = max_length - len(row["prompt_ids"])
        return {k: row[k][:room] for k in keys}

    if all(len(p) + len(row) <= max_length for k in keys for p, row in zip(dataset["prompt_ids"], dataset[k])):
        return dataset
    return dataset.map(cut)
