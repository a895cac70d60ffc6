"""An OpenAI-compatible chat-completions endpoint as a pointwise LLM-as-a-judge.

Standard library only (urllib + a thread pool): one POST per (item, sample) to
``{base_url}/chat/completions`` with model, messages, temperature, max_tokens
and a per-request seed (derived like every other seed in the harness, so a
server that honours seeds reproduces its answers).

Failure behaviour, per request:
- timeouts, refused / reset / dropped connections, HTTP 5xx and 429: retried up
  to ``max_retries`` times with jittered exponential backoff (a numeric
  Retry-After on 429/503 is honoured; every wait is capped at ``max_backoff_s``);
  when retries run out the sample becomes an error entry (``ERROR_PREFIX`` +
  reason) -- never raised, never a judgment: callers do not persist it, so the
  next run asks again. ``timeout_s`` bounds each attempt as a whole: no reply
  within it (a hung server, or one that trickles its body) is a timeout, so one
  request takes at most about (max_retries + 1) * (timeout_s + max_backoff_s);
- HTTP 4xx other than 429 (bad key, unknown model, bad request): the same for
  every item, so retrying or continuing is pointless -> ``JudgeRequestError``
  at once, carrying the verdicts of the items already finished (``partial``);
- a reply that is not JSON or lacks choices[0].message.content: an error entry
  holding the reply text (not retried within the call: the server did answer;
  like every error entry it is not persisted, so the next run asks again);
- content without a parsable score: an ordinary parse failure, raw kept;
- an over-long reply -- a body over ``max_reply_bytes`` (read no further), or an
  answer longer than ``max_new_tokens`` could produce (``answer_cap``: an endpoint
  that ignored max_tokens) -- is a failed judgment like a parse failure: stored,
  counted and shown, with ``TOO_LONG`` and the first ``_BODY_KEEP`` characters as its
  raw answer, never the whole reply; not retried (the server did answer).
A reply's ``usage`` (prompt / completion tokens), when sent, is added to the
running stage's cost (``harness.store.cost``).
An unexpected exception in one request only fails that request's sample.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from typing import Sequence

from harness.store import cost
from harness.engines.generate import request_seed
from harness.judges.base import JudgeItem, Verdict
from harness.judges.llm import content_id
from harness.judges.parsing import (ERROR_PREFIX, fill_group_template, fill_template, group_verdicts,
                                    verdict_from_samples)

_BODY_KEEP = 2000  # characters of a bad reply kept for audit
MAX_REPLY_BYTES = 1 << 20  # default cap on a reply body read from the endpoint (1 MiB)
CHARS_PER_TOKEN = 32  # no tokenizer's tokens are this long on average: a longer answer ignored max_tokens
TOO_LONG = "[reply too long] "  # raw answer of an over-long reply (a failed judgment, stored)


def answer_cap(max_new_tokens: int) -> int:
    """The most characters an answer of ``max_new_tokens`` tokens is taken to have."""
    return max(_BODY_KEEP, CHARS_PER_TOKEN * max_new_tokens)


class _TooLong(Exception):
    """The reply body passed ``max_reply_bytes``; ``head`` is what was read of it."""

    def __init__(self, head: str):
        super().__init__(head)
        self.head = head


def _count_usage(body: str) -> None:
    """The reply's ``usage`` (prompt / completion tokens), when the endpoint sends it,
    into the running stage's cost (``harness.store.cost``)."""
    try:
        usage = json.loads(body).get("usage") or {}
        cost.add(judge_prompt_tokens=int(usage.get("prompt_tokens") or 0),
                 judge_completion_tokens=int(usage.get("completion_tokens") or 0))
    except (ValueError, AttributeError, TypeError):
        pass  # no usage, or a malformed reply (_content reports that)


class MissingAPIKey(RuntimeError):
    pass


class JudgeRequestError(RuntimeError):
    """A non-retryable HTTP error. ``partial`` holds one entry per item: its
    verdict when all its samples had finished, else None."""

    def __init__(self, message: str, status: int | None = None,
                 partial: list[Verdict | None] | None = None):
        super().__init__(message)
        self.status = status
        self.partial = partial or []


class _Retryable(Exception):
    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


class OpenAIJudge:
    def __init__(self, base_url: str, model: str, *, template: str, lo: int, hi: int,
                 api_key_env: str = "OPENAI_API_KEY", samples: int = 1, temperature: float = 0.0,
                 max_new_tokens: int = 256, timeout_s: float = 60.0, max_retries: int = 3, concurrency: int = 8,
                 seed_key: tuple = (), backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 max_reply_bytes: int = MAX_REPLY_BYTES, name: str = "openai", group_template: str | None = None):
        key = os.environ.get(api_key_env, "")
        if not key:
            raise MissingAPIKey(
                f"judge.openai.api_key_env: environment variable {api_key_env} is not set (or empty); "
                f"export {api_key_env}=<key> (for a local server that ignores keys, any value works)")
        if not base_url:
            raise ValueError("judge.openai.base_url: the openai judge needs the endpoint's base URL")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        self.template = template
        self.samples = samples
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.concurrency = max(1, concurrency)
        self.seed_key = tuple(seed_key)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_reply_bytes = max_reply_bytes
        self.group_template = group_template  # {instruction}/{responses}, same scale; None = no group mode
        self.answer_cap = answer_cap(max_new_tokens)
        self.name = name
        self.lo, self.hi = lo, hi  # the template's declared score range (parsing.load_judge_template)
        self.scale = (float(lo), float(hi))

    # ---- one request ----------------------------------------------------
    def _post_once(self, payload: bytes, url: str = "") -> str:
        """The reply body; raises _Retryable or JudgeRequestError."""
        req = urllib.request.Request(url or self.url, data=payload, headers=self._headers, method="POST")
        deadline = time.monotonic() + self.timeout_s
        try:
            # the socket timeout bounds connecting and each wait for data; the deadline
            # bounds the whole reply (a server trickling bytes never hangs the stage)
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                chunks, size = [], 0
                while chunk := resp.read1(min(1 << 16, self.max_reply_bytes + 1 - size)):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > self.max_reply_bytes:  # read no further: the rest is never held
                        raise _TooLong(b"".join(chunks)[:_BODY_KEEP].decode("utf-8", errors="replace"))
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the reply took longer than {self.timeout_s}s")
                return b"".join(chunks).decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:  # before URLError: it is a subclass
            try:
                body = e.read(_BODY_KEEP).decode("utf-8", errors="replace")
            except (OSError, http.client.HTTPException) as read_error:  # the error body itself got lost
                body = f"(body unreadable: {type(read_error).__name__})"
            if e.code == 429 or e.code >= 500:
                wait = e.headers.get("Retry-After") if e.code in (429, 503) and e.headers else None
                raise _Retryable(f"HTTP {e.code}: {body}",
                                 float(wait) if wait and wait.strip().isdigit() else None) from None
            raise JudgeRequestError(f"judge endpoint {self.url} answered HTTP {e.code} (not retried): {body}",
                                    status=e.code) from None
        except (OSError, http.client.HTTPException) as e:  # timeouts, refused/reset connections, URLError
            reason = getattr(e, "reason", None) or e
            raise _Retryable(f"{type(e).__name__}: {reason} (timeout {self.timeout_s}s)") from None

    def _content(self, body: str) -> tuple[str, bool]:
        """(the answer, whether it stopped at max_tokens: finish_reason "length")."""
        try:
            choice = json.loads(body)["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return f"{ERROR_PREFIX}malformed reply: {body[:_BODY_KEEP]}", False
        if not isinstance(content, str):
            return f"{ERROR_PREFIX}malformed reply (content is not text): {body[:_BODY_KEEP]}", False
        if len(content) > self.answer_cap:
            return (f"{TOO_LONG}the answer has {len(content)} characters, more than {self.max_new_tokens} tokens "
                    f"(max_new_tokens) can hold (at most {self.answer_cap} taken): the endpoint ignored max_tokens; "
                    f"kept: {content[:_BODY_KEEP]} [cut]"), False
        return content, choice.get("finish_reason") == "length"

    def request(self, body: dict, path: str = "/chat/completions") -> tuple[str | None, str]:
        """(the reply body, "") of one POST of ``body`` to ``{base_url}{path}`` with the retries
        above, or (None, why) when retries ran out (``why`` starts with ERROR_PREFIX) or the
        reply passed max_reply_bytes (TOO_LONG). Usage is counted; a non-retryable HTTP error
        raises JudgeRequestError."""
        payload = json.dumps(body).encode()
        reason = ""
        for attempt in range(self.max_retries + 1):
            try:
                reply = self._post_once(payload, self.base_url + path)
                _count_usage(reply)
                return reply, ""
            except _TooLong as e:  # the server answered: a failed judgment, not retried
                return None, (f"{TOO_LONG}the reply body passed {self.max_reply_bytes} bytes (max_reply_bytes in "
                              f"[judge.openai]) and was not read further; its start: {e.head} [cut]")
            except _Retryable as e:
                reason = str(e)
                if attempt < self.max_retries:
                    # jitter spreads the retries of concurrent requests after a shared outage
                    wait = e.wait if e.wait is not None else self.backoff_s * 2 ** attempt * random.uniform(0.5, 1.0)
                    time.sleep(min(wait, self.max_backoff_s))
        return None, f"{ERROR_PREFIX}gave up after {self.max_retries + 1} attempts: {reason}"

    def _ask(self, text: str, seed: int) -> tuple[str, bool]:
        """(one judge answer, whether it was cut at max_tokens), or an error entry once
        retries are exhausted."""
        reply, why = self.request({"model": self.model, "messages": [{"role": "user", "content": text}],
                                   "temperature": self.temperature, "max_tokens": self.max_new_tokens,
                                   "seed": seed})
        return (why, False) if reply is None else self._content(reply)

    def _ask_safe(self, text: str, seed: int) -> tuple[str, bool]:
        try:
            return self._ask(text, seed)
        except JudgeRequestError:
            raise
        except Exception as e:  # a bug or odd failure in one request must not sink the others
            return f"{ERROR_PREFIX}{type(e).__name__}: {e}", False

    # ---- the Judge protocol --------------------------------------------
    def _answers(self, texts: Sequence[str]) -> tuple[dict[str, list[tuple[str, bool]]], JudgeRequestError | None]:
        """({content id: its samples' (answer, cut)} of each distinct text whose samples all
        finished, the first non-retryable error or None)."""
        unique = dict(zip((content_id(t) for t in texts), texts))  # identical texts are asked once
        answers: dict[tuple[str, int], tuple[str, bool]] = {}
        fatal: JudgeRequestError | None = None
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self._ask_safe, text, request_seed(*self.seed_key, cid, j) % 2**31): (cid, j)
                       for cid, text in unique.items() for j in range(self.samples)}
            for fut in as_completed(futures):
                try:
                    answers[futures[fut]] = fut.result()
                except JudgeRequestError as e:
                    if fatal is None:
                        fatal = e
                        for other in futures:
                            other.cancel()  # requests not yet started are dropped
                except CancelledError:
                    pass  # dropped after a fatal error; _ask_safe catches everything else
        done = {}
        for cid in unique:
            got = [answers.get((cid, j)) for j in range(self.samples)]
            if all(g is not None for g in got):
                done[cid] = got
        return done, fatal

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        texts = [fill_template(self.template, it.instruction, it.response) for it in items]
        done, fatal = self._answers(texts)
        verdicts = {cid: verdict_from_samples([g[0] for g in got], self.lo, self.hi, truncated=[g[1] for g in got])
                    for cid, got in done.items()}
        ids = [content_id(t) for t in texts]
        if fatal is not None:
            fatal.partial = [verdicts.get(cid) for cid in ids]
            raise fatal
        return [verdicts[cid] for cid in ids]

    def score_groups(self, groups: Sequence[Sequence[JudgeItem]]) -> list[list[Verdict]]:
        """Each group (one prompt's candidates) in one request of the group template: one
        verdict per candidate, all failed when an answer does not score every one. A
        non-retryable error's ``partial`` holds one entry per item of all groups, in order."""
        if self.group_template is None:
            raise ValueError(f"judge {self.name!r} has no group template (group_template in [judge.openai])")
        groups = [list(g) for g in groups]
        texts = [fill_group_template(self.group_template, g[0].instruction, [it.response for it in g]) if g else ""
                 for g in groups]
        done, fatal = self._answers([t for t, g in zip(texts, groups) if g])
        out: list[list[Verdict] | None] = []
        for t, g in zip(texts, groups):
            got = done.get(content_id(t)) if g else []
            out.append(None if got is None else
                       group_verdicts([a for a, _ in got], len(g), self.lo, self.hi, [c for _, c in got]) if g else [])
        if fatal is not None:
            fatal.partial = [v for g, vs in zip(groups, out) for v in (vs if vs is not None else [None] * len(g))]
            raise fatal
        return out
