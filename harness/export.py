"""``harness export``: one iterate of a run as a standalone Hugging Face model directory.

Which iterate: ``final`` = the one ``final.json`` names (the method's choice); a run without a
current final.json (it has not finished, or was resumed for more iterations since) gives its
last finished iteration, and says so. An iteration
is finished when its results row is in ``results.jsonl``; its adapters are checked against the
hashes their stages recorded, and the base's weights against the run's provenance, so an
export never pairs adapters with weights they were not trained on.

The model of iteration t is the run's base with its adapter chain (harness.models.load): merge
chain, every adapter (Self-Rewarding's SFT adapter, then iterations 1..t) merged in order;
continue chain, the newest adapter alone. The export merges that chain in float32 into the
base's weights as the run held them: a float32 base as is, a bfloat16 base upcast (exactly),
a 4- or 8-bit base dequantized (the weights its quantized layers compute with; an 8-bit layer
also rounds its inputs, which no float32 model does: 2.2e-3 nats per sequence apart on a tiny
model, against 8e-6 for 4-bit). It is saved in float32, always: the update of a late
iteration is below half of bfloat16's spacing for most weights, so a merged model saved in
bfloat16 (even one merged in float32 and cast back) loses most of it (harness.models.load: 0.24 of
its effect kept); float32 holds it, at twice the size. The directory holds the weights, the run's tokenizer with its chat template
(``model.chat_template`` applied), the base's generation config with the end-of-turn ids the
harness stops at and its pad id (sampling settings stay the base's: the run's own are in its
config), a model card (README.md, harness.report.card) and ``harness_export.json`` (the exact
results row and what the export was made from).

``adapter_only``: the chain as one peft LoRA adapter instead of merged weights. A continue
chain, or a merge chain of one adapter, is that adapter; a longer merge chain is combined by
peft's ``add_weighted_adapter(combination_type="cat")``: the adapters' ranks side by side
(rank = their sum, scaling 1, each adapter's own scaling folded into its lora_A), whose
update is exactly the sum of theirs, i.e. what merging them in order adds. Adapters peft
cannot combine that way (DoRA, rsLoRA, modules_to_save, LoRA biases, rank or alpha patterns)
are refused. Iteration 0 without an SFT adapter is the base itself and has no adapter.

Everything is written to a temporary directory beside ``out`` and renamed into place when
complete: ``out`` is either whole or untouched. Runs on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import harness.judges  # noqa: F401  (registers the judge kinds a run's config names)
import harness.methods  # noqa: F401  (registers the methods a run's config names)
from harness.store import files as store
from harness.config.experiment import Config, parse
from harness.engines.generate import _eos_ids
from harness.models.load import load_base, load_model, load_tokenizer, offline_env
from harness.report.card import CardFacts, model_card
from harness.report.rows import ResultsError, load_rows
from harness.store.rundir import MANIFEST, RunDir
from harness.config.schema import ConfigError
from harness.models.sources import SourceError, identity, locate, materialize

EXPORT_FILE = "harness_export.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ExportError(ValueError):
    """A run, iteration or output directory that cannot be exported; one line for the user."""


@dataclass
class Iterate:
    """One finished iteration of a run, with what its model is made of."""
    layout: RunDir
    cfg: Config
    config_hash: str       # as the run recorded it in config.json
    provenance: dict
    iteration: int
    chosen_by: str         # how it was picked, for the card and the terminal
    row: dict              # its results row
    adapters: list[Path]   # its adapter chain (harness.models.load.load_policy's ``adapters``)
    base: str              # the base model's loadable path (harness.models.sources.materialize)


# ---------------------------------------------------------------- which iterate

def _read_config(layout: RunDir) -> tuple[Config, str]:
    try:
        doc = store.read_json(layout.config)
        return parse(doc["config"], str(layout.config)), str(doc["hash"])
    except ConfigError as e:
        raise ExportError(f"{layout.config}: this harness cannot read the run's config "
                          f"({e.errors[0].path}: {e.errors[0].message})") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ExportError(f"{layout.config} is unreadable ({type(e).__name__}: {e})") from None


def adapter_chain(layout: RunDir, chain: str, t: int) -> list[Path]:
    """The saved adapters of iteration ``t``'s model, oldest first, as the loop chains them
    (harness.run.stages): the SFT adapter of iteration 0 when there is one, then the train stage
    of each iteration 1..t; a continue chain keeps only the newest."""
    found = [layout.stage(0, "init_sft") / "adapter"] if layout.manifest(0, "init_sft").exists() else []
    found += [layout.stage(k, "train") / "adapter" for k in range(1, t + 1)]
    return found if chain == "merge" else found[-1:]


def _check_adapters(layout: RunDir, adapters: list[Path]) -> None:
    """Each adapter as its finished stage recorded it (its content hash)."""
    for path in adapters:
        manifest = path.parent / MANIFEST
        if not manifest.is_file():
            raise ExportError(f"{path.parent}: stage not finished (no {MANIFEST})")
        recorded = store.read_json(manifest).get("outputs", {}).get("adapter_hash")
        if recorded and store.adapter_hash(path) != recorded:
            raise ExportError(f"{path}: the adapter changed since its stage finished (content hash differs)")


def _finished(layout: RunDir) -> dict[int, dict]:
    """{iteration: results row} of the run's finished iterations."""
    if not layout.results.is_file():
        return {}
    try:
        return {r["iteration"]: {k: v for k, v in r.items() if k != "source"} for r in load_rows([layout.results])}
    except ResultsError as e:
        raise ExportError(str(e)) from None


def _span(its) -> str:
    its = sorted(its)
    return "none" if not its else str(its[0]) if len(its) == 1 else f"{its[0]}-{its[-1]}" \
        if its == list(range(its[0], its[-1] + 1)) else ", ".join(map(str, its))


def _current_final(layout: RunDir) -> bool:
    """Whether final.json is the choice of the run as it now stands: written at the end of a
    run, after config.json, which every start rewrites; one older than config.json is the
    choice of an earlier, shorter run that has since been resumed (more iterations) and has
    not finished again."""
    return layout.final.is_file() and layout.final.stat().st_mtime_ns >= layout.config.stat().st_mtime_ns


def find_iterate(run_dir: Path, which: str | int = "final") -> Iterate:
    """The iterate ``which`` (``"final"`` or an iteration number) of the run in ``run_dir``."""
    layout = RunDir(run_dir)
    if not (layout.config.is_file() and layout.provenance.is_file()):
        seeds = sorted(p.name for p in Path(run_dir).glob("seed-*") if RunDir(p).config.is_file())
        raise ExportError(f"{run_dir} is not a run directory (no config.json and provenance.json)"
                          + (f"; its seeds' runs are {', '.join(seeds)}: export one of them" if seeds else ""))
    cfg, config_hash = _read_config(layout)
    rows = _finished(layout)
    if which == "final":
        if _current_final(layout):
            final = store.read_json(layout.final)
            t = int(final["iteration"])
            chosen_by = f"the final iterate (final.json, selected by {final.get('selected_by')})"
        elif rows:
            t = max(rows)
            chosen_by = ("final.json is older than the run's last start (config.json): the run has not finished "
                         "since; the last finished iteration" if layout.final.is_file() else
                         "no final.json (the run has not finished): the last finished iteration")
        else:
            raise ExportError(f"{run_dir}: no iteration is finished yet (no results row)")
    else:
        t, chosen_by = int(which), f"--iteration {which}"
    if t > cfg.method.iterations:
        raise ExportError(f"{run_dir}: the run has iterations 0-{cfg.method.iterations}, not {t}")
    if t not in rows:
        raise ExportError(f"{run_dir}: iteration {t} is not finished (finished iterations: {_span(rows)})")
    adapters = adapter_chain(layout, cfg.chain, t)
    _check_adapters(layout, adapters)
    provenance = store.read_json(layout.provenance)
    try:
        source = locate(cfg.model.base, cfg.model.gguf_file)
        base = materialize(source)
        now = identity(source, cfg.model.revision)
    except SourceError as e:
        raise ExportError(f"the run's base model {cfg.model.base!r}: {e}") from None
    then = (provenance.get("models") or {}).get("base")
    if then and then != now:
        raise ExportError(f"the base model {cfg.model.base!r} is not the one the run trained on "
                          f"(now {json.dumps(now, sort_keys=True)}, the run's {json.dumps(then, sort_keys=True)})")
    return Iterate(layout, cfg, config_hash, provenance, t, chosen_by, rows[t], adapters, base)


# ---------------------------------------------------------------- weights

def _on_cpu(cfg: Config) -> Config:
    return replace(cfg, model=replace(cfg.model, device="cpu"))


def dequantized(quantized, cfg: Config, base: str):
    """A float32 model with the weights ``quantized`` (a bitsandbytes 4/8-bit load of ``base``)
    computes with: quantized layers dequantized, every other weight as the quantized load holds
    it (peft's k-bit preparation: float32), in a plain float32 load of the same checkpoint."""
    from peft.utils.integrations import dequantize_module_weight

    m = cfg.model
    plain = load_model(base, revision=m.revision, dtype="float32", device="cpu", trust_remote_code=m.trust_remote_code)
    with torch.no_grad():
        for name, param in plain.named_parameters():
            owner, _, leaf = name.rpartition(".")
            module = quantized.get_submodule(owner)
            held = dequantize_module_weight(module) if leaf == "weight" else getattr(module, leaf)
            param.copy_(held.detach().to("cpu", torch.float32).reshape(param.shape))
    return plain.eval()


def full_precision_policy(cfg: Config, adapters: list[Path], base: str):
    """(model, tokenizer): the model of the chain ``adapters`` as one plain float32 model, on
    the CPU: the base as the run loads it (harness.models.load.load_base), in float32 (dequantized
    when quantized), with every adapter of the chain merged in float32, in order."""
    from peft import PeftModel

    cfg = _on_cpu(cfg)
    model, tok = load_base(cfg, base)
    model = dequantized(model, cfg, base) if cfg.model.quantization != "none" else model.to(torch.float32)
    for path in adapters:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    model.config.dtype = torch.float32  # what the saved config.json says loaders should use
    return model.eval(), tok


def _generation_config(model, tok) -> None:
    """The base's generation config, stopping where the harness stops (harness.engines.generate's eos
    ids: the model's and the tokenizer's) and padding with the tokenizer's pad id."""
    gc = model.generation_config
    eos = sorted(_eos_ids(model, tok))
    gc.eos_token_id = eos[0] if len(eos) == 1 else eos
    gc.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else eos[0]


# ---------------------------------------------------------------- one adapter

def _combinable(path: Path) -> str | None:
    """Why the adapter at ``path`` cannot be combined exactly by concatenating ranks (None: it can)."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        return f"it is a {cfg.get('peft_type')} adapter, not LoRA"
    for key, why in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA scaling"), ("modules_to_save", "modules_to_save"),
                     ("lora_bias", "LoRA biases"), ("rank_pattern", "a rank pattern"),
                     ("alpha_pattern", "an alpha pattern"), ("target_parameters", "target_parameters")):
        if cfg.get(key):
            return f"it uses {why}"
    return None


def write_adapter(cfg: Config, adapters: list[Path], base: str, out: Path) -> int:
    """The chain ``adapters`` as one peft adapter in ``out`` (see the module doc); returns its rank."""
    if len(adapters) == 1:
        for name in ADAPTER_FILES:
            shutil.copy2(adapters[0] / name, out / name)
        return int(json.loads((adapters[0] / "adapter_config.json").read_text())["r"])
    for path in adapters:
        if (why := _combinable(path)) is not None:
            raise ExportError(f"{path}: cannot be combined exactly with the chain's other adapters: {why}; "
                              "export the merged model (without --adapter-only)")
    from peft import PeftModel

    m = cfg.model  # a merge chain: an unquantized float32 base
    model = load_model(base, revision=m.revision, dtype="float32", device="cpu", trust_remote_code=m.trust_remote_code)
    names = [f"iteration_adapter_{i}" for i in range(len(adapters))]
    peft = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        peft.load_adapter(str(path), adapter_name=name)
    peft.add_weighted_adapter(names, [1.0] * len(names), "default", combination_type="cat")
    for name in names:
        peft.delete_adapter(name)
    peft.save_pretrained(str(out), selected_adapters=["default"])
    (out / "README.md").unlink(missing_ok=True)  # peft's template card; ours replaces it
    return int(peft.peft_config["default"].r)


# ---------------------------------------------------------------- the directory

def _precision(cfg: Config) -> str:
    q = cfg.model.quantization
    kind = "bitsandbytes, nf4" if q == "4bit" else "bitsandbytes"
    return cfg.model.dtype + ("" if q == "none" else f", {q} quantization ({kind})")


def _usage(it: Iterate, out: Path, adapter_only: bool) -> str:
    if not adapter_only:
        return (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})  # float32\n"
                f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r})")
    quant = (f"  # the run's base was {_precision(it.cfg)}: load it the same way for the run's model"
             if it.cfg.model.quantization != "none" else "")
    return (f"from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({it.cfg.model.base!r}){quant}\n"
            f"model = PeftModel.from_pretrained(base, {str(out)!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r})")


def _facts(it: Iterate, saved: str, adapter_only: bool) -> CardFacts:
    cfg, prov = it.cfg, it.provenance
    git = prov.get("git_commit", "")
    if git and prov.get("git_dirty"):
        git += " (with uncommitted changes)"
    return CardFacts(
        experiment=cfg.experiment.name, method=cfg.method.name, iteration=it.iteration,
        iterations=cfg.method.iterations, chosen_by=it.chosen_by, config_hash=it.config_hash, base=cfg.model.base,
        revision=cfg.model.revision, base_identity=(prov.get("models") or {}).get("base") or {},
        run_precision=_precision(cfg), chain=cfg.chain,
        adapters=[str(p.relative_to(it.layout.root)) for p in it.adapters], saved=saved, seed=cfg.experiment.seed,
        git=git, library="peft" if adapter_only else "transformers")


def _record(it: Iterate, saved: str, adapter_only: bool) -> dict:
    """harness_export.json: where the export came from and the exact results row."""
    return {"run_dir": str(it.layout.root.resolve()), "experiment": it.cfg.experiment.name,
            "method": it.cfg.method.name, "iteration": it.iteration, "chosen_by": it.chosen_by,
            "config_hash": it.config_hash, "chain": it.cfg.chain, "adapter_only": adapter_only, "saved": saved,
            "adapters": [{"path": str(p.relative_to(it.layout.root)), "adapter_hash": store.adapter_hash(p)}
                         for p in it.adapters],
            "base": {"model": it.cfg.model.base, "revision": it.cfg.model.revision,
                     "identity": (it.provenance.get("models") or {}).get("base")},
            "results_row": it.row}


def _fill(it: Iterate, tmp: Path, out: Path, adapter_only: bool) -> str:
    """Write the export of ``it`` into ``tmp`` (it will be renamed to ``out``); returns what it holds."""
    m = it.cfg.model
    if adapter_only:
        if not it.adapters:
            raise ExportError(f"iteration {it.iteration} is the base model itself: it has no adapter "
                              "(export it without --adapter-only)")
        rank = write_adapter(it.cfg, it.adapters, it.base, tmp)
        combined = f", the {len(it.adapters)} adapters of the merge chain combined exactly" \
            if len(it.adapters) > 1 else ""
        saved = (f"one peft LoRA adapter (rank {rank}{combined}) for the base `{m.base}` as the run loaded it "
                 f"({_precision(it.cfg)}), with the run's tokenizer and chat template")
        tok = load_tokenizer(it.base, m.revision, m.chat_template, m.trust_remote_code)
    else:
        model, tok = full_precision_policy(it.cfg, it.adapters, it.base)
        _generation_config(model, tok)
        model.save_pretrained(str(tmp))
        saved = ("the full model in float32 safetensors: the adapter chain merged in float32 into the base's "
                 "weights as the run held them (float32 keeps the small update a bfloat16 copy would round away), "
                 "with the run's tokenizer, chat template and the generation config's end-of-turn ids")
    tok.save_pretrained(str(tmp))
    (tmp / "README.md").write_text(model_card(_facts(it, saved, adapter_only), it.row, _usage(it, out, adapter_only)))
    store.atomic_write_json(tmp / EXPORT_FILE, _record(it, saved, adapter_only))
    return saved


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory")


def export(run_dir: Path, which: str | int, out: Path, adapter_only: bool = False) -> Iterate:
    """Export the iterate ``which`` of the run in ``run_dir`` into ``out`` (see the module doc);
    returns the iterate. ``out`` must be absent or an empty directory; it appears only complete."""
    offline_env()  # a hub base comes from the local cache unless HARNESS_ONLINE=1, as in a run
    out = Path(out)
    _check_out(out)
    it = find_iterate(Path(run_dir), which)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _fill(it, tmp, out, adapter_only)
        _check_out(out)  # nothing appeared there meanwhile
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.replace(tmp, out)  # an empty directory at ``out`` is replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return it
