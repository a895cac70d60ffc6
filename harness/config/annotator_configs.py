"""Which AlpacaEval annotator an evaluation uses, and whether the harness can run its config:
names and config checks only, known before any model loads (``harness validate``).

Read by the config (``AlpacaEvalSection.protocol`` / ``problems``), by
``harness.evaluate.annotators``, which runs the annotators, and by the report's protocol
labels (which endpoint is OpenAI's own); this module imports neither
alpaca_eval (its directory is found with ``find_spec``) nor any model code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from harness.config.schema import closest

RUBRIC = "harness_rubric"   # the harness's pointwise rubric comparison (judge scores, position control)
AE2 = "weighted_alpaca_eval_gpt4_turbo"   # AlpacaEval 2.0's annotator
HUB_SET = "alpaca_eval"
OPENAI = "openai_completions"
ANSWER_TOKENS = 2048   # alpaca_eval's model configs' max_new_tokens: AlpacaEval answers at this cap or above are uncut
OPENAI_API = "https://api.openai.com/v1"   # the official endpoint: the one published annotations were made at


def official_endpoint(base_url: str | None) -> bool:
    """``base_url`` is OpenAI's own API (any other, or none, is a local or unknown endpoint)."""
    return isinstance(base_url, str) and base_url.rstrip("/") == OPENAI_API


def configs_dir() -> Path:
    """alpaca_eval's evaluators_configs directory, found without importing alpaca_eval."""
    spec = importlib.util.find_spec("alpaca_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("alpaca_eval is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "evaluators_configs"


def shipped_names() -> list[str]:
    d = configs_dir()
    return sorted(p.parent.name for p in d.glob("*/configs.yaml"))


def resolve_protocol(annotator: str, instructions: str) -> str:
    """The annotator an AlpacaEval section uses: its own, else AlpacaEval 2.0's for the hub
    set and the harness rubric for any other instructions."""
    if annotator:
        return annotator
    return AE2 if instructions == HUB_SET else RUBRIC


def config_path(name: str) -> Path:
    """configs.yaml of a shipped annotator name, or a user's configs.yaml (a file, or a
    directory holding one). Raises ValueError naming what exists."""
    shipped = configs_dir() / name / "configs.yaml"
    if "/" not in name and shipped.is_file():
        return shipped
    p = Path(name).expanduser()
    if p.is_dir():
        p = p / "configs.yaml"
    if p.is_file():
        return p.resolve()
    hint = closest(name, shipped_names())
    raise ValueError(f"{name!r} is neither an annotator config that alpaca_eval ships"
                     + (f" (did you mean {hint!r}?" + ")" if hint else "")
                     + f" nor a readable configs.yaml; shipped: {', '.join(shipped_names())}")


def load_config(path: Path) -> dict[str, dict]:
    """{annotator name: its config} as alpaca_eval's loader reads it."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not doc or not all(isinstance(v, dict) for v in doc.values()):
        raise ValueError(f"{path}: expected a mapping of annotator name -> its config (alpaca_eval's configs.yaml)")
    return doc


def config_problems(name: str) -> list[str]:
    """Why ``name`` cannot be run by the harness (empty: it can)."""
    try:
        path = config_path(name)
        configs = load_config(path)
    except ValueError as e:
        return [str(e)]
    problems = []
    for ann, cfg in configs.items():
        fn = cfg.get("fn_completions", OPENAI)
        if fn != OPENAI:
            problems.append(f"annotator {ann!r} decodes with {fn!r}; the harness sends annotator prompts to an "
                            f"OpenAI-compatible endpoint, so only {OPENAI!r} configs run (serve the judge behind one)")
        if int(cfg.get("batch_size", 1)) != 1:
            problems.append(f"annotator {ann!r} puts {cfg['batch_size']} examples in one prompt (batch_size); the "
                            "harness annotates one instruction per prompt: use a batch_size 1 config")
        kw = cfg.get("completions_kwargs") or {}
        for k in ("tokens_to_avoid", "tokens_to_favor"):
            if kw.get(k):
                problems.append(f"annotator {ann!r} sets {k}, which needs OpenAI's tokenizer files; not supported")
        tpl = cfg.get("prompt_template")
        if not isinstance(tpl, str) or not ((path.parents[1] / tpl).is_file() or "{" in tpl):
            problems.append(f"annotator {ann!r}: prompt_template {tpl!r} is not readable relative to {path.parents[1]}")
    return problems
