"""Atomic writes, content hashes, stage directories and manifests, resumable JSONL, the run lock,
and which files may be read whole (``special_file``).

The layout of a run directory is spelled in ``harness.store.rundir``.

Invariant: a stage directory exists only when the stage completed. A stage is
built in ``<stage>.tmp``, renamed into place, and its ``manifest.json`` is
written last inside it, so a directory with a manifest is a finished stage.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from harness.store import cost
from harness.store.rundir import MANIFEST, TMP_SUFFIX


def dict_hash(d: Any) -> str:
    """Short content hash of a JSON-able value (key order does not matter)."""
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root() -> Path:
    """Where built and converted artefacts live: ``$HARNESS_CACHE``, default ``~/.cache/harness``."""
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "harness").resolve()


def special_file(path: Path | str) -> str | None:
    """What ``path`` is when it exists but is neither a regular file nor a directory ("a FIFO",
    "a character device", ...), else None. A file is read whole, and only a regular file is
    sure to end: a FIFO waits for a writer forever, /dev/zero never ends."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISSOCK: "a socket"}
    return next((kind for test, kind in kinds.items() if test(mode)), "not a regular file")


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Blocking exclusive lock on ``path`` (created if missing), for builds shared by processes."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(final: Path, build: Callable[[Path], object]) -> Path:
    """``final`` built exactly once: ``build(tmp)`` fills a private temporary directory
    that is renamed to ``final`` when it returns, so an existing ``final`` is always
    complete. A file lock keeps two processes from building it at once; leftovers of a
    crashed build are removed first."""
    final = Path(final)
    if final.is_dir():
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f"{final.name}.lock"):
        if final.is_dir():  # another process finished it while we waited
            return final
        for stale in root.glob(f".{final.name}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename; a crash leaves the old file or none, never half.
    A failed write (a full disk) removes its temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class JsonlLog:
    """Append-only JSONL keyed by ``id``, for resuming inside a stage.

    Each record is one line, flushed and fsynced. On open, a torn last line
    (no newline, or not valid JSON) is cut off, never parsed as data.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        self._repair_and_load()

    def _repair_and_load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = 0
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # torn: no newline
            try:
                rec = json.loads(data[pos:nl])
            except json.JSONDecodeError:
                break  # torn or corrupt: drop it and everything after
            self.records[str(rec["id"])] = rec
            good_end = nl + 1
            pos = nl + 1
        if good_end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def append(self, records: Iterable[dict]) -> None:
        lines = []
        for rec in records:
            self.records[str(rec["id"])] = rec
            lines.append(json.dumps(rec, sort_keys=True, default=str) + "\n")
        with open(self.path, "a") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())


def file_hash(*paths: Path) -> str:
    """sha256 over the bytes of files (directories: every file inside, in sorted order)."""
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def adapter_hash(path: Path) -> str:
    """Content hash of a saved peft adapter directory that is the same for the same weights in
    any process: peft writes ``target_modules`` (a set) in hash-seed order, so
    ``adapter_config.json`` is hashed as canonical JSON with its set-valued lists sorted."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        if f.name == "adapter_config.json":
            cfg = json.loads(f.read_text())
            for key in ("target_modules", "modules_to_save", "exclude_modules"):
                if isinstance(cfg.get(key), list):
                    cfg[key] = sorted(cfg[key])
            h.update(json.dumps(cfg, sort_keys=True).encode())
        else:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def path_fingerprint(path: str | Path, head: int = 1 << 20) -> str:
    """Content fingerprint of a local model file or directory ("" when it is not
    local, e.g. a hub id, whose revision identifies it instead). Small files are
    hashed whole; large ones by size + first and last ``head`` bytes, which tells
    apart any two checkpoints in practice without reading gigabytes."""
    path = Path(path)
    if not path.exists():
        return ""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 2 * head:
                h.update(fh.read())
            else:
                h.update(fh.read(head))
                fh.seek(size - head)
                h.update(fh.read(head))
    return h.hexdigest()[:16]


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows))


class StageChanged(RuntimeError):
    """A finished stage was produced from different inputs than this run would use."""


class StageCorrupt(RuntimeError):
    """A finished stage's manifest cannot be read."""


class Stage:
    """One stage directory of a run: built in ``<name>.tmp``, renamed into place, its
    ``manifest.json`` (inputs and outputs) written last.

    ``inputs``: what the stage was computed from, known before it runs; ``commit`` may add what
    became known while it ran (``extra_inputs``). ``changes(old_inputs)`` says which inputs of a
    finished stage differ from this run's (here: any difference of ``inputs``; subclasses compare
    more precisely). ``stamp``: the key under which an interrupted attempt's partial work is resumed.
    """

    def __init__(self, final: Path, inputs: dict, stamp: str | None = None):
        self.final = Path(final)
        self.tmp = self.final.with_name(self.final.name + TMP_SUFFIX)
        self.inputs = inputs
        self.stamp = stamp or dict_hash(inputs)

    @property
    def manifest_path(self) -> Path:
        return self.final / MANIFEST

    def manifest(self) -> dict:
        try:
            manifest = read_json(self.manifest_path)
            if not isinstance(manifest, dict) or "inputs" not in manifest or "outputs" not in manifest:
                raise ValueError("no inputs or outputs")
            return manifest
        except (ValueError, UnicodeDecodeError) as e:
            raise StageCorrupt(f"{self.manifest_path}: not a valid stage manifest ({e}); delete {self.final} "
                               "to recompute that stage (later stages that used it are then refused too)") from None

    def changes(self, old_inputs: dict) -> list[str]:
        return sorted(diff_keys(old_inputs, self.inputs))

    def done(self) -> bool:
        """True when finished with the same inputs and with its files as it wrote them; raise
        StageChanged when inputs differ, StageCorrupt when a file it wrote was changed since."""
        if not self.manifest_path.exists():
            return False
        manifest = self.manifest()
        changed = self.changes(manifest["inputs"])
        if changed:
            raise StageChanged(
                f"{self.final} was produced from different inputs; changed: {', '.join(changed)}. "
                "Revert the change or start a fresh run directory (harness run --fresh, or a new experiment.name).")
        for rel, digest in manifest.get("files", {}).items():
            f = self.final / rel
            if not f.is_file() or file_hash(f) != digest:
                what = "is missing" if not f.is_file() else f"differs from what the stage wrote (sha256 {digest})"
                raise StageCorrupt(f"{f} {what}; delete {self.final} to recompute that stage "
                                   "(later stages that used it are then refused too)")
        return True

    def begin(self) -> Path:
        """The working directory: left over from an interrupted attempt with the
        same inputs (its resumable logs are reused), or new."""
        if self.final.exists():  # renamed but manifest missing: crashed between the two
            shutil.rmtree(self.final)
        stamp = self.tmp / ".inputs_hash"
        if self.tmp.exists() and (not stamp.exists() or stamp.read_text() != self.stamp):
            shutil.rmtree(self.tmp)  # partial work for other inputs is never resumed
        self.tmp.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, self.stamp)
        self._t0 = time.perf_counter()
        self._meter = cost.start()
        return self.tmp

    def commit(self, outputs: dict | None = None, extra_inputs: dict | None = None) -> None:
        """Finish the stage: its outputs, plus its wall time (``seconds``) and what it
        cost (``cost``: see ``harness.store.cost``), go into the manifest."""
        outputs = {**(outputs or {}), "seconds": round(time.perf_counter() - self._t0, 3),
                   "cost": cost.stop(self._meter)}
        inputs = {**self.inputs, **(extra_inputs or {})}
        # every file the stage wrote, verified when the stage is reused
        files = {f.relative_to(self.tmp).as_posix(): file_hash(f) for f in sorted(self.tmp.rglob("*"))
                 if f.is_file() and f.name != ".inputs_hash"}
        os.replace(self.tmp, self.final)
        atomic_write_json(self.manifest_path, {"input_hash": dict_hash(inputs), "inputs": inputs,
                                               "outputs": outputs, "files": files})

    def outputs(self) -> dict:
        return self.manifest()["outputs"]


def diff_keys(old: Any, new: Any, prefix: str = "") -> set[str]:
    """Dotted paths at which two JSON-like values differ (tuples equal lists, as in JSON)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: set[str] = set()
        for k in set(old) | set(new):
            out |= diff_keys(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return set() if _json(old) == _json(new) else {prefix or "<root>"}


def _json(v: Any) -> Any:
    return json.loads(json.dumps(v, sort_keys=True, default=str))


class RunLocked(RuntimeError):
    pass


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on a run directory; a second process fails at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "run.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"{run_dir} is being run by another process (run.lock is held)") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
