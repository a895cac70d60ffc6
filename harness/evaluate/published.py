"""Published AlpacaEval systems as leaderboard rows: their output and annotation files read
with alpaca_eval's own loader and metric functions, with the protocol their annotations record.

``harness import-alpaca-eval`` (``harness.report.published``) writes them; this module holds no
generation or judging.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path

from harness.config.annotator_configs import AE2, HUB_SET, OPENAI_API, config_path, load_config
from harness.evaluate.alpaca import _installed, compute_metrics
from harness.store.files import write_jsonl


def import_published(model_outputs: Path, annotations: Path, name: str) -> dict[str, float | int | None]:
    """Flat metrics of a published system from its AlpacaEval output and annotation files,
    read with alpaca_eval's own loader as its ``evaluate`` would."""
    return _import(model_outputs, annotations, name)[0]


def _import(model_outputs: Path, annotations: Path, name: str) -> tuple[dict, dict]:
    from alpaca_eval.utils import load_or_convert_to_dataframe

    outs = load_or_convert_to_dataframe(Path(model_outputs))
    ann = load_or_convert_to_dataframe(Path(annotations))
    for col, df, where in (("output", outs, model_outputs), ("preference", ann, annotations)):
        if col not in df.columns:
            raise ValueError(f"{where}: no {col!r} field; is it an AlpacaEval {'outputs' if col == 'output' else 'annotations'} file?")
    # a file holding several systems: keep the one named (generator_2 is the model side)
    if "generator_2" in ann.columns and ann["generator_2"].nunique() > 1:
        ann = ann[ann["generator_2"] == name]
        outs = outs[outs["generator"] == name] if "generator" in outs.columns else outs
        if ann.empty:
            raise ValueError(f"{annotations}: no annotations with generator_2 == {name!r}")
    _check_same_system(outs, ann, model_outputs, annotations)
    return compute_metrics(ann, list(outs["output"]), len(ann))


def _check_same_system(outs, ann, model_outputs: Path, annotations: Path) -> None:
    """ValueError (one line) unless the annotations judge these outputs: one system (the
    outputs' ``generator`` names = the annotations' ``generator_2`` names, where the files
    have them) on one instruction set (the same ``instruction`` values), and, where the
    annotations hold the judged answers (``output_2``), the same answer to each instruction
    (compared without surrounding whitespace). Else the row's win rate would be neither's."""
    def names(df, col: str) -> list[str]:
        return sorted({str(v) for v in df[col].dropna()}) if col in df.columns else []

    made, judged = names(outs, "generator"), names(ann, "generator_2")
    if made and judged and made != judged:
        raise ValueError(f"{model_outputs} holds the outputs of {', '.join(made)} but {annotations} annotates "
                         f"{', '.join(judged)} (generator_2): outputs and annotations must be one system's")
    for df, where in ((outs, model_outputs), (ann, annotations)):
        if "instruction" not in df.columns:
            raise ValueError(f"{where}: no 'instruction' field; is it an AlpacaEval file?")
    asked, annotated = set(outs["instruction"]), set(ann["instruction"])
    if asked != annotated:
        extra = sorted(annotated - asked) or sorted(asked - annotated)
        raise ValueError(f"{annotations} and {model_outputs} are not on the same instructions: "
                         f"{len(annotated - asked)} annotated instruction(s) have no output and {len(asked - annotated)} "
                         f"output(s) no annotation (e.g. {str(extra[0])[:60]!r})")
    if "output_2" in ann.columns:
        def text(v) -> str:  # None / NaN: no answer
            return "" if v is None or (isinstance(v, float) and v != v) else str(v).strip()

        answer = dict(zip(outs["instruction"], outs["output"]))
        differ = [i for i, o in zip(ann["instruction"], ann["output_2"]) if text(o) != text(answer[i])]
        if differ:
            raise ValueError(f"{annotations}: {len(differ)} of {len(ann)} annotated answers (output_2) differ from "
                             f"{model_outputs}'s answers to the same instructions (e.g. to {str(differ[0])[:60]!r}): "
                             "the annotations judged another system's outputs")


def _file_record(path: Path) -> dict:
    return {"path": str(Path(path).resolve()), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def write_published_run(dest_dir: Path, name: str, model_outputs: Path, annotations: Path) -> Path:
    """A run-like directory whose results.jsonl holds one row for a published system,
    so tables show it beside the iterations of our runs. Returns the results.jsonl path.

    The row's ``protocol`` record (as ``protocol_record``'s) is read from the annotations
    file: its ``annotator`` field and ``generator_1`` (whose answers are the reference).
    Where the file lacks them, AlpacaEval 2.0's: annotator weighted_alpaca_eval_gpt4_turbo
    against gpt4_1106_preview (GPT-4 Turbo) references; the instruction set is always
    AlpacaEval's ("alpaca_eval"), and the judge model is the one the annotator's shipped
    config names (None when alpaca_eval does not ship that annotator), at OpenAI's own API (the
    published annotations were made there); ``max_new_tokens`` None: the answers are the
    system's as published, made with its own generation config, not cut by the harness."""
    dest_dir = Path(dest_dir)
    metrics, notes = _import(model_outputs, annotations, name)
    records = [r for r in json.loads(Path(annotations).read_text(encoding="utf-8")) if isinstance(r, dict)]
    if len({r.get("generator_2") for r in records}) > 1:  # a file of several systems: this one's
        records = [r for r in records if r.get("generator_2") == name]
    found = {f: sorted({str(r[f]) for r in records if r.get(f) is not None}) for f in ("annotator", "generator_1")}
    who = "+".join(found["annotator"]) or AE2
    try:
        models = sorted({str((c.get("completions_kwargs") or {}).get("model_name"))
                         for c in load_config(config_path(who)).values()})
    except (ValueError, ModuleNotFoundError, OSError):  # not an annotator alpaca_eval ships here
        models = []
    lc = notes.get("length_controlled_data")
    judge_model = models[0] if len(models) == 1 else None
    protocol = {"annotator": who, "judge_model": judge_model, "config_model_name": models,
                "template_hash": None, "endpoint_kind": "published annotations",
                "endpoint": {"base_url": OPENAI_API, "model": judge_model}, "max_new_tokens": None,
                "reference": {"instructions": HUB_SET, "reference": "instructions",
                              "generator": found["generator_1"] or ["gpt4_1106_preview"]},
                "n": metrics["alpaca_eval/n_total"], "n_instructions": metrics["alpaca_eval/n_instructions"],
                "coverage": metrics["alpaca_eval/coverage"],
                "length_controlled": {"status": "computed", "df_gamed": {k: lc[k] for k in ("repo", "revision", "sha256")}}
                if lc else {"status": "unavailable", "reason": notes.get("length_controlled_winrate", "")},
                "from_annotations_file": [f for f in ("annotator", "generator_1") if found[f]]}
    row = {"experiment": name, "method": "published", "iteration": 0, "metrics": metrics,
           "protocol": {"alpaca_eval": protocol},
           "provenance": {"notes": notes, "imported_from": {"model_outputs": _file_record(model_outputs),
                                            "annotations": _file_record(annotations)},
                          "versions": {p: version(p) for p in ("alpaca-eval", "pandas", "selfimprove-harness")
                                       if _installed(p)},
                          "seed": None, "config_hash": None}}
    write_jsonl(dest_dir / "results.jsonl", [row])
    return dest_dir / "results.jsonl"


def write_published_mt_bench(dest_dir: Path, name: str, judgments: Path, model: str) -> Path:
    """A run-like directory whose results.jsonl holds one row of MT-Bench metrics for ``model``
    of a FastChat single-grading judgment file (``model_judgment/gpt-4_single.jsonl``), with the
    protocol ``harness.evaluate.mt_bench.import_judgments`` derives (the file's judge at OpenAI's
    API). Returns the results.jsonl path."""
    from harness.evaluate.mt_bench import import_judgments

    metrics, protocol = import_judgments(Path(judgments), model)
    row = {"experiment": name, "method": "published", "iteration": 0, "metrics": metrics,
           "protocol": {"mt_bench": protocol},
           "provenance": {"imported_from": {"mt_bench_judgments": _file_record(judgments), "model": model},
                          "versions": {p: version(p) for p in ("selfimprove-harness",) if _installed(p)},
                          "seed": None, "config_hash": None}}
    write_jsonl(Path(dest_dir) / "results.jsonl", [row])
    return Path(dest_dir) / "results.jsonl"
