"""A persistent judgment cache, so a restarted judging stage does not re-ask the judge.

Key = sha256 of (judge identity, instruction, response, meta). The identity is
a canonical JSON string of everything that determines a judgment other than the
item (kind, model, revision, a fingerprint of local weights, adapter hash /
iteration for the self judge, template text, samples, temperature, max new
tokens, seed): never a run or model name alone, so one judge's scores are
never served for another.

Storage is ``harness.store.files.JsonlLog``: one fsynced line per judgment, a torn
last line dropped on open. The inner judge is called in chunks and each chunk
is written before the next starts, so a killed process loses at most a chunk.
Verdicts holding a transport error (``parsing.is_error``) are returned but not
stored, so the next run asks again; so are failed judgments (no score, or a score
that cannot be on the judge's scale: ``base.checked``), which are returned as
failures and never served from the cache. When the inner judge raises with ``partial`` verdicts
(``http.JudgeRequestError``), the finished ones are stored before re-raising.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from harness.judges.base import JudgeItem, Verdict, checked, possible
from harness.judges.parsing import is_error
from harness.store.files import JsonlLog


def judge_identity(**fields: Any) -> str:
    """Canonical text of the fields that determine a judgment."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)


def _cacheable(v: Verdict, scale) -> bool:
    """A valid judgment: an answer was obtained and its score can be."""
    return not any(is_error(r) for r in v.raw) and possible(v.score, scale)


class CachedJudge:
    """Judge protocol around ``inner`` with a JSONL cache at ``path``.

    ``hits`` / ``misses`` count items per ``score`` call, summed. Other
    attributes (e.g. a native ``compare``) are forwarded to ``inner`` uncached.
    """

    def __init__(self, inner, path: str | Path, identity: str, chunk_size: int = 64):
        if not identity:
            raise ValueError("CachedJudge needs a non-empty identity (all fields that determine a judgment)")
        self.inner = inner
        self.identity = identity
        self.log = JsonlLog(Path(path))
        self.chunk_size = max(1, chunk_size)
        self.name = inner.name
        self.scale = inner.scale
        self.hits = 0
        self.misses = 0

    def __getattr__(self, attr: str):
        if attr == "inner":  # not yet set: avoid recursion during construction
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def key(self, item: JudgeItem) -> str:
        blob = json.dumps({"judge": self.identity, "instruction": item.instruction,
                           "response": item.response, "meta": dict(item.meta)},
                          sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _store(self, pairs: Sequence[tuple[str, JudgeItem, Verdict]]) -> None:
        self.log.append({"id": k, "prompt_id": it.prompt_id, "score": v.score, "raw": list(v.raw),
                         "scores": list(v.scores), "truncated": list(v.truncated)}
                        for k, it, v in pairs if _cacheable(v, self.scale))

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        keys = [self.key(it) for it in items]
        found: dict[str, Verdict] = {}
        todo: dict[str, JudgeItem] = {}
        for k, it in zip(keys, items):
            rec = self.log.records.get(k)
            if rec is not None and possible(rec["score"], self.scale):  # a stored failure is asked again
                found[k] = Verdict(score=rec["score"], raw=tuple(rec["raw"]), scores=tuple(rec["scores"]),
                                   truncated=tuple(rec.get("truncated", ())))
            elif k not in todo:
                todo[k] = it
        self.hits += sum(k in found for k in keys)
        self.misses += sum(k not in found for k in keys)
        pending = list(todo.items())
        for i in range(0, len(pending), self.chunk_size):
            chunk = pending[i:i + self.chunk_size]
            try:
                verdicts = self.inner.score([it for _, it in chunk])
            except Exception as e:
                partial = getattr(e, "partial", None) or []
                self._store([(k, it, v) for (k, it), v in zip(chunk, partial) if v is not None])
                raise
            if len(verdicts) != len(chunk):
                raise RuntimeError(f"judge {self.name!r} returned {len(verdicts)} verdicts for {len(chunk)} items")
            verdicts = [checked(v, self.scale) for v in verdicts]
            self._store([(k, it, v) for (k, it), v in zip(chunk, verdicts)])
            found.update((k, v) for (k, _), v in zip(chunk, verdicts))
        return [found[k] for k in keys]
