"""When a finished stage may be reused: its inputs, recorded while it ran.

A stage's inputs are of two kinds.

- **upstream**: content hashes of what the loop hands it (other stages' outputs, the prompts
  with their answers, the pairs, the policy's adapter chain), known before it runs;
- **config**: every config field its compute read, recorded while it ran through a
  ``ConfigView``, with the content fingerprint of every local file such a field names (data
  files, templates, task files, a local model directory).

No stage lists its config fields by hand, so none can forget one. A finished stage is reused
only when its upstream is unchanged and every field it read still has the value it had (and
every file it named the same content); otherwise ``StageChanged`` names what changed. A
field no stage read may change freely: raising ``method.iterations`` continues a finished
run, because no stage's work depends on the count.

Soundness: a stage's compute is a deterministic function of its upstream and of the config
fields it reads, and which fields it reads is itself decided by fields it read. So if every
recorded field has its old value, a rerun would read the same fields and compute the same
result.

This module records and compares; ``harness.store.files`` writes the directories and
``harness.run.loop`` says what each stage computes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from harness.config.schema import to_dict
from harness.models.sources import is_built, is_tiny_ref, resolve_ref
from harness.store.rundir import MANIFEST, TMP_SUFFIX, RunDir
from harness.store.files import Stage, StageChanged, dict_hash, diff_keys, path_fingerprint, read_json

__all__ = ["ConfigView", "RecordedStage", "StageChanged", "config_value", "status"]

_MISSING = "<absent>"


def _normal(value: Any) -> Any:
    """A config value as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(to_dict(value), default=str))


def _stat_key(path: Path) -> tuple:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return tuple((str(f), (s := f.stat()).st_size, s.st_mtime_ns) for f in files)


_FINGERPRINTS: dict[tuple, str] = {}


def file_fingerprint(value: Any) -> str | list | None:
    """Content fingerprint of the local file or directory a config string names, a list of them
    for a list of strings, or None when the value names no local file (a plain setting, a hub
    id, a built-in name, a tiny-world file not built yet)."""
    if isinstance(value, (list, tuple)):
        fps = [file_fingerprint(v) for v in value]
        return fps if any(f is not None for f in fps) else None
    if not isinstance(value, str) or not _names_a_file(value):
        return None
    if is_tiny_ref(value):
        if not is_built(value):
            return None
        value = resolve_ref(value)
    path = Path(value)
    try:
        if not path.exists():
            return None
        data = [Path(f) for f in _task_data_files(path)]
        key = (str(path.resolve()), _stat_key(path), tuple(_stat_key(f) for f in data if f.exists()))
    except OSError:
        return None
    if key not in _FINGERPRINTS:  # stat-keyed: an edited file is hashed again
        _FINGERPRINTS[key] = path_fingerprint(path) + "".join(f"+{path_fingerprint(f)}" for f in data if f.exists())
    return _FINGERPRINTS[key]


def _task_data_files(path: Path) -> list[str]:
    """The local data files an lm-eval task YAML (or a directory of them) reads
    (``dataset_kwargs.data_files``): a task file's content alone would miss an edited data file."""
    out: list[str] = []
    yamls = sorted(path.rglob("*.y*ml")) if path.is_dir() else [path] if path.suffix in (".yaml", ".yml") else []
    for f in yamls:
        try:
            doc = yaml.safe_load(f.read_text())
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            continue  # not a task file we can read: its own bytes are still fingerprinted
        files = ((doc or {}).get("dataset_kwargs") or {}).get("data_files") if isinstance(doc, dict) else None
        values = files.values() if isinstance(files, dict) else [files] if files else []
        for v in values:
            out += [str(x) for x in (v if isinstance(v, list) else [v]) if isinstance(x, str)]
    return out


_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".yaml", ".yml", ".txt", ".jinja", ".gguf", ".safetensors")


def _names_a_file(value: str) -> bool:
    """A config string that refers to a local file or directory: a tiny-world reference, a path
    with a directory part, or a file name with a data / template / model suffix. A bare word
    (a setting, an experiment name, a hub-less model name) does not, even when a file of that
    name happens to sit in the working directory."""
    if not value or value.startswith("builtin:"):
        return False
    return is_tiny_ref(value) or "/" in value or value.lower().endswith(_FILE_SUFFIXES)


def config_value(cfg_dict: dict, path: str) -> Any:
    """The value at a dotted path of ``Config.to_dict()``, or a marker when it is absent."""
    node: Any = cfg_dict
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


# ---------------------------------------------------------------- recording

_RECORDING: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    """A subclass of a config dataclass whose field reads are recorded by its view."""
    if cls not in _RECORDING:
        names = frozenset(f.name for f in dataclasses.fields(cls))

        def __getattribute__(self, name, _names=names):
            value = object.__getattribute__(self, name)
            if name in _names:
                object.__getattribute__(self, "_view_read")(name, value)
            return value

        _RECORDING[cls] = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__,
                                                      "__module__": cls.__module__})
    return _RECORDING[cls]


class ConfigView:
    """A copy of a ``Config`` that records every field read through it.

    ``view.cfg`` behaves as the config (same classes, via subclasses; same values). Each leaf
    read lands in ``reads`` as {dotted path: value}; the method's own options are spelled
    ``method.<name>.<field>``, as in the TOML file. The loop keeps its own config as a view
    too, whose ``sink`` is the running stage's view: a read of the loop's config while a stage
    computes counts as that stage's, so no read escapes the record. Only leaves are recorded: a read of a whole
    section (``to_dict(cfg.training)``) reads, and records, each of its fields."""

    def __init__(self, cfg: Any):
        self.reads: dict[str, Any] = {}
        self.sink: ConfigView | None = None  # while set, every read also counts as the sink's
        self._options_path = f"method.{cfg.method.name}"
        self.cfg = self._wrap(cfg, "")

    def _wrap(self, obj: Any, path: str) -> Any:
        copy = object.__new__(_recording_class(type(obj)))
        # a section that spells a field under another key in its TOML table (a judge's options
        # under the kind's name) says so with ``table_key``
        key = getattr(obj, "table_key", lambda name: name)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            sub = self._sub_path(path, key(f.name))
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = self._wrap(value, sub)
            object.__setattr__(copy, f.name, value)
        object.__setattr__(copy, "_view_read", lambda name, value, _p=path: self._read(_p, key(name), value))
        return copy

    def _sub_path(self, path: str, name: str) -> str:
        if not path and name == "options":
            return self._options_path
        return f"{path}.{name}" if path else name

    def _read(self, path: str, name: str, value: Any) -> None:
        if not path and name == "source":  # the file a config came from is not one of its values
            return
        if dataclasses.is_dataclass(value):  # a section: its leaves are recorded when read
            return
        key = self._sub_path(path, name)
        self.reads.setdefault(key, value)
        if self.sink is not None:
            self.sink.reads.setdefault(key, value)

    def merge(self, reads: dict[str, Any]) -> None:
        """Count reads made through another view (e.g. while loading a cached model) as this one's."""
        for k, v in reads.items():
            self.reads.setdefault(k, v)

    def recorded(self) -> tuple[dict, dict]:
        """({path: value}, {path: file fingerprint}) of everything read, JSON-ready."""
        values = {k: _normal(v) for k, v in sorted(self.reads.items())}
        files = {k: fp for k, v in values.items()
                 if not k.startswith("experiment.") and (fp := file_fingerprint(v)) is not None}
        return values, files


# ---------------------------------------------------------------- reuse

FILE_CHANGED = object()  # config_changes' "was" for a field whose file's content changed


def config_changes(inputs: dict, cfg_dict: dict) -> list[tuple[str, Any, Any]]:
    """(path, recorded value, current value) of every config field a finished stage read that
    ``cfg_dict`` changes; for a named file whose content changed, (path, FILE_CHANGED, value)."""
    out = [(k, v, now) for k, v in inputs.get("config", {}).items() if (now := config_value(cfg_dict, k)) != v]
    out += [(k, FILE_CHANGED, now) for k, fp in inputs.get("files", {}).items()
            if file_fingerprint(now := config_value(cfg_dict, k)) != fp]
    return out


class RecordedStage(Stage):
    """A stage directory whose reuse is decided by its upstream and its recorded config reads."""

    def __init__(self, final: Path, upstream: dict, cfg: Any):
        self.upstream = upstream
        self._cfg_dict = cfg.to_dict()
        # partial work (.tmp) is resumed only for the same upstream and the same whole config:
        # which fields an unfinished attempt read is not known
        super().__init__(final, {"upstream": upstream}, stamp=dict_hash([upstream, cfg.hash()]))

    def changes(self, old: dict) -> list[str]:
        out = [f"upstream.{k}" for k in diff_keys(old.get("upstream", {}), self.upstream)]
        for path, was, now in config_changes(old, self._cfg_dict):
            out.append(f"config.{path}" if was is not FILE_CHANGED else f"the contents of config.{path}")
        return sorted(set(out))

    def commit_view(self, outputs: dict, view: ConfigView) -> None:
        values, files = view.recorded()
        self.commit(outputs, extra_inputs={"config": values, "files": files})


# ---------------------------------------------------------------- before a run

def finished_conflicts(cfg: Any) -> list[str]:
    """What the finished stages of ``cfg``'s run directory read that this config changes, one
    line per stage ("iter_001/generate: generation.max_new_tokens was 24, now 20"), known before
    any model loads. Upstream changes (the data a stage consumed) are found when the stage is
    reached; config fields and the files they name are found here."""
    cfg_dict = cfg.to_dict()
    out = []
    for t, st in RunDir(cfg.run_dir).stage_dirs():
        if st.name.endswith(TMP_SUFFIX) or not (st / MANIFEST).exists():
            continue
        try:
            inputs = read_json(st / MANIFEST)["inputs"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            out.append(f"{st.parent.name}/{st.name}: its {MANIFEST} is unreadable")
            continue
        changed = [f"the contents of {k} changed" if was is FILE_CHANGED
                   else f"{k} was {json.dumps(was)}, now {json.dumps(now, default=str)}"
                   for k, was, now in config_changes(inputs, cfg_dict)]
        if changed:
            out.append(f"{st.parent.name}/{st.name}: " + "; ".join(changed))
    return out


def last_finished_iteration(run_dir: Path) -> int | None:
    """The highest iteration whose evaluate stage is finished, or None."""
    done = [t for t, st in RunDir(run_dir).stage_dirs() if st.name == "evaluate" and (st / MANIFEST).exists()]
    return max(done) if done else None


# ---------------------------------------------------------------- sharing

def adopt_iteration0(source_run: Path, cfg: Any) -> list[str]:
    """Iteration 0 of another run of the same experiment (another seed), copied into ``cfg``'s run
    directory when this run would reuse it unchanged: every config field its stages read has the
    same value here (so none of them read experiment.seed). All of iteration 0 or nothing, since
    its stages feed one another. Returns the names of the stages copied."""
    src, dst = RunDir(source_run), RunDir(cfg.run_dir)
    stages = [st for t, st in src.stage_dirs() if t == 0]
    if not stages or any(st.name.endswith(TMP_SUFFIX) or not (st / MANIFEST).exists() for st in stages):
        return []
    if any(dst.stage(0, st.name).exists() for st in stages):
        return []
    for st in stages:
        inputs = read_json(st / MANIFEST)["inputs"]
        if RecordedStage(dst.stage(0, st.name), inputs.get("upstream", {}), cfg).changes(inputs):
            return []
    for st in stages:
        tmp = dst.stage(0, st.name + TMP_SUFFIX)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(st, tmp)
        os.replace(tmp, dst.stage(0, st.name))
    return [st.name for st in stages]


# ---------------------------------------------------------------- status

def status(run_dir: Path) -> list[dict]:
    """Finished / partial stages of a run directory, for ``harness status``."""
    out = []
    for t, st in RunDir(run_dir).stage_dirs():
        if st.name.endswith(TMP_SUFFIX):
            logs = [p.name for p in st.glob("*.jsonl")]
            n = sum(1 for p in st.glob("*.jsonl") for _ in open(p, "rb"))
            out.append({"iteration": t, "stage": st.name.removesuffix(TMP_SUFFIX), "state": "partial",
                        "detail": f"{n} records in {', '.join(logs)}" if logs else ""})
        elif (st / MANIFEST).exists():
            try:
                detail = f"inputs {read_json(st / MANIFEST)['input_hash']}"
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                detail = f"{MANIFEST} is unreadable: delete {st} to recompute it"
            out.append({"iteration": t, "stage": st.name, "state": "done", "detail": detail})
    return out
