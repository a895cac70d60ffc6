"""What produced a result: versions, git commit (+ dirty flag), hardware, seeds, model ids."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from harness.models.load import pick_device

PACKAGES = ("torch", "transformers", "tokenizers", "peft", "trl", "accelerate", "datasets", "bitsandbytes",
            "lm_eval", "alpaca_eval", "pandas", "numpy")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(path: Path | None = None) -> dict:
    """Commit of the harness source tree and whether it has uncommitted changes.

    "unknown" (dirty flag None) when the harness is not a git checkout of its own:
    an installed package, a copy without .git, a tree inside some other repository,
    or no git at all. git's own messages never reach the terminal."""
    root = Path(path or Path(__file__).resolve().parents[2]).resolve()
    unknown = {"git_commit": "unknown", "git_dirty": None}

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True, stdin=subprocess.DEVNULL).stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != root:
            return unknown  # e.g. site-packages inside someone's repository: not our commit
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"git_commit": commit, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return unknown


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            # the GPUs a launcher gave this run (--jobs, or Ray for a task with num_gpus); None when unset
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def collect(cfg, model_ids: dict) -> dict:
    return {"config_hash": cfg.hash(), "config_file": cfg.source, "seed": cfg.experiment.seed,
            "versions": versions(), **git_state(), "hardware": hardware(), "models": model_ids,
            "argv": sys.argv, "eval_batch_size": cfg.eval.batch_size,
            "tf32": pick_device(cfg.model.device) == "cuda"}  # harness.models.load.use_tf32 on every CUDA load
