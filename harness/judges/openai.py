"""The judge kind "openai": an OpenAI-compatible chat-completions endpoint as
LLM-as-a-judge. Options: the endpoint (base URL, model name, the API key's variable,
timeout, retries) and the options every LLM judge has; pre-flight: the key is set and,
with ``harness validate --check-endpoints``, the endpoint answers. Not the HTTP client
(``harness.judges.http.OpenAIJudge``)."""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from harness.judges.kind import LLMKind, LLMOptions
from harness.config.registry import JUDGES
from harness.config.schema import FieldError, opt


@dataclass(frozen=True)
class EndpointOptions:
    base_url: str = opt("", "Base URL of an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.")
    model: str = opt("", "Model name at the endpoint.")
    api_key_env: str = opt("OPENAI_API_KEY", "Name of the environment variable holding the API key.")
    timeout_s: float = opt(60.0, "Per-request timeout in seconds.", min=0.1)
    max_retries: int = opt(3, "Retries on timeouts and 5xx answers.", min=0)
    max_reply_bytes: int = opt(1 << 20, "Most bytes of one reply body read from the endpoint (default 1 MiB; a judge's answer is a few KB). A longer reply is not read further and is a failed judgment, counted like a parse failure; so is an answer longer than max_new_tokens can hold (32 characters a token), and only its first 2000 characters are stored.", min=1024)


@dataclass(frozen=True)
class OpenAIOptions(LLMOptions, EndpointOptions):
    """[judge.openai]: the endpoint first, then the options every LLM judge has."""


def endpoint_problem(base_url: str, timeout_s: float) -> str | None:
    """None when ``{base_url}/models`` answers at all (any HTTP status), else why not."""
    try:
        urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=min(timeout_s, 10.0))
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as e:
        return f"cannot reach {base_url}: {getattr(e, 'reason', e)}"
    return None


class OpenAI(LLMKind):
    name = "openai"
    Options = OpenAIOptions
    greedy_repeats = False  # an endpoint may answer a repeated greedy request differently

    def check(self, options, where):
        errors = super().check(options, where)
        if not options.model:
            errors.append(FieldError(f"{where}.model", f"judge {self.name!r} needs a model"))
        if not options.base_url:
            errors.append(FieldError(f"{where}.base_url", f"the {self.name} judge needs base_url"))
        else:
            url = urllib.parse.urlsplit(options.base_url)
            if url.scheme not in ("http", "https") or not url.netloc:  # urllib refuses it at every request
                errors.append(FieldError(f"{where}.base_url", (
                    f"{options.base_url!r} is not an http(s) URL with a host; e.g. http://localhost:8000/v1")))
        return errors

    def preflight(self, options, where, checks):
        super().preflight(options, where, checks)
        if not os.environ.get(options.api_key_env):
            checks.unmet.append(("endpoint", FieldError(f"{where}.api_key_env",
                                                        f"environment variable {options.api_key_env} is not set")))
        if checks.check_endpoints and options.base_url:
            problem = endpoint_problem(options.base_url, options.timeout_s)
            if problem:
                checks.errors.append(FieldError(f"{where}.base_url", problem))

    def build(self, section, policy, seed_key):
        from harness.judges.http import OpenAIJudge  # request seeds from generation: torch

        o = section.options
        tpl, ident = self.template(o)
        judge = OpenAIJudge(o.base_url, o.model, template=tpl.text, lo=tpl.lo, hi=tpl.hi, api_key_env=o.api_key_env,
                            samples=o.samples, temperature=o.temperature, max_new_tokens=o.max_new_tokens,
                            timeout_s=o.timeout_s, max_retries=o.max_retries, concurrency=section.batch_size,
                            seed_key=seed_key, max_reply_bytes=o.max_reply_bytes, name=f"{self.name}:{o.model}",
                            group_template=self.group(o))
        # an over-long reply is a stored failure under this cap: another cap is another judge
        # (left out at the default, so the identities of existing caches stay as they were)
        cap = {"max_reply_bytes": o.max_reply_bytes} if o.max_reply_bytes != 1 << 20 else {}
        return judge, {**ident, **self.seed_ident(o, seed_key), "base_url": o.base_url, "model": o.model, **cap}


JUDGES.register(OpenAI.name)(OpenAI())
