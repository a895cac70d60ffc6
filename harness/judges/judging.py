"""Judging that heals: a stage's candidates judged into a per-prompt JSONL log that
holds only real judgments.

A judge answer that does not parse, or whose score cannot be (NaN, outside the judge's
scale: ``harness.judges.base.checked``), is a *failed judgment*: it is kept in the log,
counted and shown, and it is never reused -- a rerun over the same log asks the judge
again for exactly the failed items (pointwise: the failed candidates; side by side: the
failed prompt's whole group, one answer judges it), keeping every valid judgment. So a
stage that failed on coverage heals once the judge is fixed. A *transport failure* -- no
answer obtained at all (timeouts, refused connections, 5xx after the judge's own
retries, malformed replies; marked by ``harness.judges.parsing.is_error`` in a verdict's
raw outputs) -- is never written as a judgment: the prompt stays missing from the log,
the stage fails with ``JudgeTransportError`` once everything else is judged, and the
next run asks the judge again for exactly those prompts.

Used by the loop's judge stage (``judge_groups``) and by AlpacaEval annotation
(``transport_failed`` / ``JudgeTransportError``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from harness.console import terminal as console
from harness.store import files as store
from harness.judges import CoverageError
from harness.judges.base import JudgeItem, Verdict, checked, possible, score_groups
from harness.judges.parsing import is_error

_SHOW = 3          # examples quoted in messages
_QUOTE = 160       # characters of a raw answer or error quoted


def transport_failed(v: Verdict) -> bool:
    """True when some sample of ``v`` got no answer from the judge (not a judgment)."""
    return any(is_error(r) for r in v.raw)


def _quote(text: str) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= _QUOTE else text[:_QUOTE] + "...")


class JudgeTransportError(CoverageError):
    """Items got no answer from the judge; nothing was persisted for them, and a
    rerun of the same command retries exactly those (finished ones are kept)."""

    def __init__(self, what: str, count: str, examples: Sequence[tuple[str, str]]):
        shown = "; ".join(f"{pid}: {_quote(reason)}" for pid, reason in examples[:_SHOW])
        super().__init__(
            f"{what}: {count} had judge transport errors (no answer after the judge's "
            f"retries: timeouts, refused connections, HTTP 5xx/429, malformed replies); they were not recorded "
            f"as judgments and the stage was not finished. Check the judge endpoint, then rerun the same "
            f"command: it keeps everything already judged and retries only these. First errors: {shown}")


@dataclass
class Judged:
    """The log's records in ``groups`` order, plus what to report about them.

    Items are candidates; answers are the judge's samples of an item (``samples``
    each). An item fails (no score) when none of its answers has a valid score. An
    answer is *truncated* when the judge stopped at its token limit without ending
    (no EOS): usually the score was never written, and a higher ``max_new_tokens`` ([judge.<kind>])
    is the fix. An answer that ended and still has no valid score is a *parse failure*:
    the judge did not follow the template."""
    what: str
    records: list[dict]
    n_items: int = 0                      # candidates sent to the judge (fixed scores excluded)
    n_parse_failed: int = 0               # items without a valid score (kept as judgments)
    parse_examples: list[tuple[str, str]] = field(default_factory=list)  # (prompt id, raw answer)
    n_answers: int = 0                    # judge answers (items x samples)
    n_answers_truncated: int = 0          # answers cut at the token limit
    n_answers_parse_failed: int = 0       # answers that ended without a valid score

    def parse_summary(self) -> str | None:
        """A one-line account of unparsable answers, or None when there were none."""
        if not self.n_parse_failed:
            return None
        shown = "; ".join(f"{pid}: {_quote(raw)}" for pid, raw in self.parse_examples[:_SHOW])
        cut = (f"; {self.n_answers_truncated} of {self.n_answers} answers were cut at the token limit "
               "(raise max_new_tokens in the judge's [judge.<kind>] table)") if self.n_answers_truncated else ""
        return (f"{self.what}: {self.n_parse_failed} of {self.n_items} judge items had no valid score "
                f"(failed judgments: counted in coverage, asked again if the stage is rerun){cut}; e.g. {shown}")

    def metrics(self) -> dict:
        """The judge stage's counts (see the class doc)."""
        return {"judge/n_items": self.n_items, "judge/n_failed": self.n_parse_failed,
                "judge/coverage": (self.n_items - self.n_parse_failed) / self.n_items if self.n_items else None,
                "judge/n_answers": self.n_answers, "judge/n_truncated": self.n_answers_truncated,
                "judge/n_parse_failed": self.n_answers_parse_failed}


def _record(group, where: list[tuple[int, int]], verdicts: Sequence[Verdict], gi: int,
            base: dict | None = None) -> dict:
    """One prompt's judgments: per candidate its score, the judge's raw answers, their
    parsed scores and whether each was cut at the token limit (fixed scores: empty).
    ``base``: the prompt's earlier record, whose candidates not judged now are kept."""
    n = len(group.candidates)
    if base is None:
        rec = {"id": group.example.id, "scores": [c.fixed_score for c in group.candidates],
               "raw": [[] for _ in range(n)], "answer_scores": [[] for _ in range(n)],
               "truncated": [[] for _ in range(n)]}
    else:
        rec = {"id": group.example.id, **{k: [list(x) if isinstance(x, list) else x for x in base[k]]
                                          for k in ("scores", "raw", "answer_scores", "truncated")}}
    for (g, ci), v in zip(where, verdicts):
        if g == gi:
            rec["scores"][ci] = v.score
            rec["raw"][ci] = list(v.raw)
            rec["answer_scores"][ci] = list(v.scores)
            rec["truncated"][ci] = list(v.truncated) or [False] * len(v.raw)
    rec["failed"] = sum(c.fixed_score is None and s is None for c, s in zip(group.candidates, rec["scores"]))
    return rec


def _to_ask(group, rec: dict | None, scale, side_by_side: bool) -> list[int]:
    """Which of ``group``'s candidates go to the judge: every judged one when the prompt
    has no record; else those whose recorded judgment failed (no score, or one that
    cannot be on ``scale``) -- side by side, the whole group when any failed -- so a
    failed judgment is never reused and a valid one is never asked again."""
    judged = [ci for ci, c in enumerate(group.candidates) if c.fixed_score is None]
    if rec is None:
        return judged
    failed = [ci for ci in judged if not possible(rec["scores"][ci], scale)]
    return judged if failed and side_by_side else failed


def side_by_side(cfg) -> bool:
    """Whether the judge stage scores each prompt's candidates side by side (the method's
    ``judging = "group"``, [method.dno]) instead of one by one."""
    return getattr(cfg.options, "judging", "pointwise") == "group"


def judge_groups(judge, groups: Sequence, log: store.JsonlLog, *, batch_size: int, what: str,
                 desc: str | None = None, side_by_side: bool = False) -> Judged:
    """Judge every group (``harness.methods.base.Group``) not yet in ``log``.

    ``side_by_side``: each group's judged candidates go to the judge together
    (``base.score_groups``: one prompt of its group template per group, one score per
    candidate, the whole group failed when the answer does not score each exactly once);
    else each candidate alone (``judge.score``). Either way the healing below is the same.
    Verdicts are ``checked`` against ``judge.scale``: an impossible score is a failure.

    ``what`` names the work in messages ("judging of iteration 3"); ``desc``, when
    given, labels a progress bar. Groups go to the judge in chunks of about
    ``batch_size`` items; after each chunk its finished groups are appended to
    ``log`` (one record per prompt id: scores, raw answers, number of failed
    candidates), so a killed process loses at most a chunk. A group is written only
    when none of its candidates had a transport failure. A prompt already in ``log``
    is judged again only for its failed judgments (``_to_ask``), its valid ones kept.
    When the judge raises with ``partial`` verdicts (a non-retryable HTTP error), the
    groups it had finished are written before re-raising.

    Raises ``JudgeTransportError`` after the last chunk when any group is still
    missing. On success the log file is rewritten in ``groups`` order, so its bytes
    (and hash) do not depend on which run judged which prompt.
    """
    asks = {g.example.id: _to_ask(g, log.records.get(g.example.id), judge.scale, side_by_side) for g in groups}
    todo = {g.example.id for g in groups if g.example.id not in log or asks[g.example.id]}
    # chunk boundaries are fixed positions in ``groups`` (a pure function of the prompt list),
    # so a resumed run sends the judge the same batches as an uninterrupted one
    step = max(1, batch_size // max(1, len(groups[0].candidates))) if groups else 1
    missing: list[tuple[str, str]] = []   # (prompt id, first error) of groups not written
    n_missing_items = 0
    bar = None
    if desc is not None:
        bar = console.progress(total=len(groups), initial=len(groups) - len(todo), desc=desc, unit="prompt")
    try:
        for i in range(0, len(groups), step):
            chunk = [g for g in groups[i:i + step] if g.example.id in todo]
            if not chunk:
                continue
            items, where = [], []
            for gi, g in enumerate(chunk):
                for ci in asks[g.example.id]:
                    # the conversation so far, not only its last turn (single-turn: the turn's text as is)
                    items.append(JudgeItem(g.example.id, g.example.request, g.candidates[ci].text,
                                           g.example.meta))
                    where.append((gi, ci))
            try:
                if not items:
                    verdicts = []
                elif side_by_side:
                    per_group = [[it for it, (k, _) in zip(items, where) if k == gi] for gi in range(len(chunk))]
                    verdicts = [v for vs in score_groups(judge, per_group) for v in vs]
                else:
                    verdicts = list(judge.score(items))
            except Exception as e:
                partial = [None if v is None else checked(v, judge.scale)
                           for v in getattr(e, "partial", None) or []]
                if len(partial) == len(items):
                    log.append(_record(g, where, partial, gi, log.records.get(g.example.id))
                               for gi, g in enumerate(chunk)
                               if all(v is not None and not transport_failed(v)
                                      for (k, _), v in zip(where, partial) if k == gi))
                raise
            if len(verdicts) != len(items):
                raise RuntimeError(f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(items)} items")
            verdicts = [checked(v, judge.scale) for v in verdicts]
            keep = []
            for gi, g in enumerate(chunk):
                errors = [r for (k, _), v in zip(where, verdicts) if k == gi for r in v.raw if is_error(r)]
                if errors:
                    missing.append((g.example.id, errors[0]))
                    n_missing_items += sum(k == gi and transport_failed(v) for (k, _), v in zip(where, verdicts))
                else:
                    keep.append(_record(g, where, verdicts, gi, log.records.get(g.example.id)))
            log.append(keep)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    if missing:
        raise JudgeTransportError(what, f"{len(missing)} of {len(groups)} prompts ({n_missing_items} judge items)",
                                  missing)
    records = [log.records[g.example.id] for g in groups]
    store.write_jsonl(log.path, records)  # canonical order; same bytes as the appended lines
    out = Judged(what, records, n_items=sum(c.fixed_score is None for g in groups for c in g.candidates))
    for g, rec in zip(groups, records):
        for ci, (c, score, raw) in enumerate(zip(g.candidates, rec["scores"], rec["raw"])):
            if c.fixed_score is not None:
                continue
            if score is None:
                out.n_parse_failed += 1
                out.parse_examples.append((g.example.id, raw[0] if raw else ""))
            cut = rec["truncated"][ci]
            out.n_answers += len(raw)
            out.n_answers_truncated += sum(cut)
            out.n_answers_parse_failed += sum(not t and s is None for t, s in zip(cut, rec["answer_scores"][ci]))
    return out
