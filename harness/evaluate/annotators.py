"""AlpacaEval's own annotators (the configs under alpaca_eval's ``evaluators_configs``, or a
user's configs.yaml in that format), run against an OpenAI-compatible endpoint of ours.

What is alpaca_eval's, through its code: the prompt templates, the choice of annotator in
a pool, the seeded random order of the two outputs (and undoing it: p -> 3 - p), the
completion parsers (log-prob weighting of ``m``/``M``, ranking, function calls, regexes)
and the preference semantics (output_1 = reference, output_2 = model, 1..2, NaN = no
annotation). ``AlpacaEvalAnnotator`` builds alpaca_eval's ``PairwiseAnnotator`` from the
config and calls its ``annotate_head2head`` exactly as ``alpaca_eval.main.evaluate`` does,
one instruction per call; only ``fn_completions`` is ours (``EndpointCompletions``).

``EndpointCompletions`` does what alpaca_eval's ``openai_completions`` does to a prompt --
strip it, turn ChatML into messages when the config's model needs chat
(``requires_chatml`` or alpaca_eval's own rule on the config's ``model_name``), send
max_tokens / temperature / top_p (alpaca_eval's defaults 1.0 and 0.7) and every other
decoding option unchanged, read the text as alpaca_eval does ("" -> " ", a function or
tool call's arguments) and return the choice dict its log-prob parser reads, priced as
alpaca_eval prices it only at OpenAI's own API (elsewhere the price is unknown: NaN) -- but over
the harness's HTTP client (``harness.judges.http.OpenAIJudge.request``: timeouts, retries
with backoff, key from an environment variable) to our ``base_url`` and ``model``. Where
alpaca_eval's decoder would give up and store an empty completion (a failed annotation),
a transport fault here raises ``AnnotatorTransportError``: the instruction is not
annotated, and the caller leaves it out of its log so that a rerun asks again. A reply
that is over ``max_reply_bytes`` or whose log-probabilities cannot be (``impossible_logprob``:
above 0 beyond float tolerance, NaN, not a number) is handed to the parser as an empty
completion: a failed annotation, counted, and asked again on a rerun.

Limits, checked by ``config_problems``: only configs whose annotators use
``openai_completions`` with ``batch_size: 1`` (every AlpacaEval 1.0/2.0 config; several
examples in one prompt would tie an instruction's prompt to its batch-mates), and no
``tokens_to_avoid`` / ``tokens_to_favor`` (they need OpenAI's tokenizer files).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from harness.config.annotator_configs import (AE2, HUB_SET, OPENAI, RUBRIC, config_path, config_problems,  # noqa: F401
                                              configs_dir, load_config, official_endpoint, resolve_protocol, shipped_names)

_SUPPORTED_PARSE = "fn_completion_parser"
LOGPROB_TOLERANCE = 1e-6  # a log-probability above this is not one (float noise around 0 is)


class AnnotatorTransportError(RuntimeError):
    """No answer was obtained from the endpoint for a prompt (retries ran out, or a reply
    that is not an OpenAI completion): not an annotation, never stored."""



# ---- fn_completions over our HTTP client ------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 3
    concurrency: int = 8
    max_reply_bytes: int = 1 << 20


def impossible_logprob(logprobs: Any) -> str | None:
    """What is wrong with a completion's ``logprobs`` (chat: ``content[i].logprob`` and its
    ``top_logprobs[j].logprob``; legacy completions: ``token_logprobs`` and the ``top_logprobs``
    mappings), or None when every value can be a log-probability: a number, not NaN, at most
    ``LOGPROB_TOLERANCE`` (``-inf`` is probability 0; a missing value, None, is not checked)."""
    if not isinstance(logprobs, dict):
        return None
    values: list = []
    for entry in logprobs.get("content") or ():
        if isinstance(entry, dict):
            values.append(entry.get("logprob"))
            values += [t.get("logprob") for t in entry.get("top_logprobs") or () if isinstance(t, dict)]
    values += list(logprobs.get("token_logprobs") or ())
    for top in logprobs.get("top_logprobs") or ():
        if isinstance(top, dict):
            values += list(top.values())
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            return f"log-probability {v!r} is not a number"
        if v > LOGPROB_TOLERANCE:
            return f"log-probability {v!r} is above 0"
    return None


# arguments of alpaca_eval's _openai_completion_helper that configure the client, not the request
_CLIENT_ONLY = ("sleep_time", "client_config_path", "openai_organization_ids", "openai_api_keys",
                "openai_api_base", "client_kwargs", "n_retries", "num_procs")


class EndpointCompletions:
    """``fn_completions`` for alpaca_eval's annotators; see the module doc. Thread-safe:
    several annotator threads share one instance."""

    def __init__(self, endpoint: Endpoint, backoff_s: float = 1.0):
        from harness.judges.http import OpenAIJudge

        self.endpoint = endpoint
        self.client = OpenAIJudge(endpoint.base_url, endpoint.model, template="", lo=0, hi=1,
                                  api_key_env=endpoint.api_key_env, timeout_s=endpoint.timeout_s,
                                  max_retries=endpoint.max_retries, backoff_s=backoff_s,
                                  max_reply_bytes=endpoint.max_reply_bytes, name=f"annotator:{endpoint.model}")
        self._lock = threading.Lock()
        self.usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        self.kinds: set[str] = set()

    def __call__(self, prompts: Sequence[str], model_name: str, max_tokens: int | Sequence[int] = 2048,
                 tokens_to_favor=None, tokens_to_avoid=None, is_skip_multi_tokens_to_avoid: bool = True,
                 is_strip: bool = True, num_procs=None, batch_size=None, price_per_token=None,
                 **decoding_kwargs) -> dict[str, list]:
        from alpaca_eval import utils as ae_utils
        from alpaca_eval.decoders.openai import _get_price_per_token, _requires_chatml

        from harness.store import cost

        if tokens_to_avoid or tokens_to_favor:
            raise ValueError("tokens_to_avoid / tokens_to_favor are not supported (they need OpenAI's tokenizer)")
        prompts = [p.strip() for p in prompts] if is_strip else list(prompts)
        chat = decoding_kwargs.pop("requires_chatml", _requires_chatml(model_name))
        chat = decoding_kwargs.pop("is_chat", chat)
        lengths = list(max_tokens) if isinstance(max_tokens, (list, tuple)) else [max_tokens] * len(prompts)
        # alpaca_eval's request: model, max_tokens, top_p (default 1.0), temperature (default 0.7), the rest as given
        request = {k: v for k, v in decoding_kwargs.items() if k not in _CLIENT_ONLY}
        request.setdefault("top_p", 1.0)
        request.setdefault("temperature", 0.7)
        request = {k: v for k, v in request.items() if v is not None}
        t0 = time.perf_counter()
        choices = []
        for prompt, n_tokens in zip(prompts, lengths):
            body = {"model": self.endpoint.model, **request, "max_tokens": n_tokens}
            if chat:
                body["messages"] = ae_utils.prompt_to_chatml(prompt)
                reply, why = self.client.request(body, "/chat/completions")
            else:
                body["prompt"] = [prompt]
                reply, why = self.client.request(body, "/completions")
            choices.append(self._choice(reply, why, chat))
        duration = time.perf_counter() - t0
        # alpaca_eval prices tokens by the config's model name; that price is OpenAI's, so only
        # OpenAI's own API gets it (a local server serving a GPT-4 name is not charged: NaN -> None)
        per_token = _get_price_per_token(model_name, price_per_token) if official_endpoint(self.endpoint.base_url) \
            else math.nan
        price = [c["total_tokens"] * per_token for c in choices]
        cost.add(judge_calls=sum(1 for c in choices if c.get("text")))
        return {"completions": [c["text"] for c in choices], "price_per_example": price,
                "time_per_example": [duration / max(1, len(prompts))] * len(prompts), "completions_all": choices}

    def _choice(self, reply: str | None, why: str, chat: bool) -> dict:
        """The choice as alpaca_eval's decoder hands it to the parser (its ``model_dump``
        plus ``text`` and ``total_tokens``)."""
        from harness.judges.parsing import ERROR_PREFIX

        if reply is None:
            if why.startswith(ERROR_PREFIX):
                raise AnnotatorTransportError(why)
            return {"text": "", "total_tokens": 0, "error": why}  # over max_reply_bytes: an empty completion
        try:
            data = json.loads(reply)
            choice = dict(data["choices"][0])
            usage = data.get("usage") or {}
            if chat:
                message = choice["message"]
                if message.get("role", "assistant") != "assistant":
                    raise ValueError("role is not assistant")
                content = message.get("content")
                text = " " if content == "" else content
                if message.get("function_call"):
                    text = message["function_call"]["arguments"]
                if message.get("tool_calls"):
                    text = message["tool_calls"][0]["function"]["arguments"]
            else:
                text = choice["text"]
            if not isinstance(text, str):
                raise TypeError("no text")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise AnnotatorTransportError(f"{ERROR_PREFIX}malformed reply ({e}): {reply[:2000]}") from None
        choice["text"] = text
        choice["total_tokens"] = float(usage.get("total_tokens") or 0)
        with self._lock:
            self.usage["calls"] += 1
            for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
                try:
                    self.usage[k] += int(usage.get(k) or 0)
                except (TypeError, ValueError):
                    pass
            self.kinds.add("chat/completions" if chat else "completions")
        bad = impossible_logprob(choice.get("logprobs"))
        if bad is not None:  # an answer that cannot be: an empty completion, i.e. a failed annotation
            return {"text": "", "total_tokens": choice["total_tokens"], "error": f"[impossible reply] {bad}"}
        return choice


# ---- alpaca_eval's PairwiseAnnotator with our fn_completions ------------------------

def _annotator_class():
    import logging

    level = logging.getLogger().level
    from alpaca_eval import utils as ae_utils
    from alpaca_eval.annotators import PairwiseAnnotator

    logging.getLogger().setLevel(level)  # importing alpaca_eval's annotators sets the root logger to INFO

    class Annotator(PairwiseAnnotator):
        """alpaca_eval's PairwiseAnnotator; each annotator of the config decodes with ``fn``."""

        def __init__(self, *args, fn_completions, **kwargs):
            self._fn = fn_completions
            super().__init__(*args, **kwargs)

        def _initialize_annotators(self, **kwargs):
            # BaseAnnotator._initialize_annotators, with fn_completions replaced
            configs = ae_utils.load_configs(self.annotators_config)
            try:
                base_dir = self.annotators_config.parents[1]
            except Exception:
                base_dir = self.base_dir
            return {name: self.SingleAnnotator(seed=self.seed, base_dir=base_dir,
                                               annotation_column=self.annotation_key,
                                               completion_column=self.completion_key,
                                               **{**cfg, "fn_completions": self._fn}, **kwargs)
                    for name, cfg in configs.items()}

    return Annotator


def _plain(v: Any) -> Any:
    """numpy / pandas scalars -> Python, NaN -> None, recursively (JSON-safe records)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            v = v.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(v, float) and not math.isfinite(v):
        return None
    try:
        import pandas as pd

        if v is pd.NA or v is pd.NaT:
            return None
    except ImportError:
        pass
    return v


class AlpacaEvalAnnotator:
    """One alpaca_eval annotator config against our endpoint."""

    def __init__(self, name: str, endpoint: Endpoint, backoff_s: float = 1.0):
        problems = config_problems(name)
        if problems:
            raise ValueError(f"eval.alpaca_eval.annotator {name!r}: " + "; ".join(problems))
        self.name = name
        self.path = config_path(name)
        self.configs = load_config(self.path)
        self.endpoint = endpoint
        self.fn = EndpointCompletions(endpoint, backoff_s=backoff_s)
        self._local = threading.local()
        self.templates = [self._template_text(cfg) for cfg in self.configs.values()]

    def _template_text(self, cfg: dict) -> str:
        from alpaca_eval import utils as ae_utils

        return ae_utils.read_or_return(cfg["prompt_template"], relative_to=self.path.parents[1])

    @property
    def template_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.templates).encode()).hexdigest()

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def identity(self) -> dict:
        """What determines an annotation beyond the two outputs (hashed into log keys)."""
        from importlib.metadata import version

        return {"annotator": self.name, "config_sha256": self.config_hash, "template_sha256": self.template_hash,
                "base_url": self.endpoint.base_url, "model": self.endpoint.model,
                "alpaca_eval": version("alpaca-eval")}

    def _annotator(self):
        ann = getattr(self._local, "annotator", None)
        if ann is None:
            ann = _annotator_class()(annotators_config=self.path, fn_completions=self.fn, caching_path=None,
                                     is_avoid_reannotations=False)
            self._local.annotator = ann
        return ann

    def annotate(self, reference: dict, model: dict) -> dict:
        """alpaca_eval's annotation of one instruction: ``reference`` / ``model`` are rows as
        ``alpaca_eval.main.evaluate`` reads them (instruction, output, generator, ...).
        Raises AnnotatorTransportError when the endpoint gave no answer."""
        with quiet():
            (row,) = self._annotator().annotate_head2head(outputs_1=[reference], outputs_2=[model])
        return _plain(row)

    def protocol(self) -> dict:
        parsers = sorted({str(c.get(_SUPPORTED_PARSE, "regex_parser")) for c in self.configs.values()})
        models = sorted({str((c.get("completions_kwargs") or {}).get("model_name", "")) for c in self.configs.values()})
        return {"annotator": self.name, "annotators_config": str(self.path), "config_sha256": self.config_hash,
                "template_hash": self.template_hash, "completion_parser": parsers, "config_model_name": models,
                "judge_model": self.endpoint.model, "base_url": self.endpoint.base_url,
                "endpoint_kind": "openai:" + "+".join(sorted(self.fn.kinds) or ["chat/completions"])}


class quiet:
    """alpaca_eval logs every call at INFO on the root logger and draws tqdm bars: keep them
    out of the harness's console while annotating (warnings still show)."""
    _depth = 0
    _lock = threading.Lock()

    def __enter__(self):
        import logging

        _quiet_chunk_bars()
        with quiet._lock:
            if quiet._depth == 0:
                root = logging.getLogger()
                quiet._saved = root.level
                root.setLevel(max(root.level, logging.WARNING))
            quiet._depth += 1

    def __exit__(self, *exc):
        import logging

        with quiet._lock:
            quiet._depth -= 1
            if quiet._depth == 0:
                logging.getLogger().setLevel(quiet._saved)


class _Bars:
    """Stands in for the ``tqdm`` module inside ``alpaca_eval.utils``: the "Annotation chunk"
    bar (one per call, i.e. per instruction here) is not drawn while the harness annotates;
    every other bar, and every bar outside ``quiet``, is tqdm's."""

    def __init__(self, real):
        self._real = real

    def tqdm(self, iterable=None, *args, desc=None, **kwargs):
        if quiet._depth > 0 and desc == "Annotation chunk":
            return iterable
        return self._real.tqdm(iterable, *args, desc=desc, **kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)


def _quiet_chunk_bars() -> None:
    from alpaca_eval import utils as ae_utils

    if not isinstance(ae_utils.tqdm, _Bars):
        ae_utils.tqdm = _Bars(ae_utils.tqdm)
