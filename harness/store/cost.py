"""What a stage cost: wall time, tokens generated and trained, judge calls, peak memory, device.

One meter is active at a time: ``store.Stage.begin`` starts it and ``Stage.commit``
stops it and writes its reading into the stage's manifest outputs (``"cost"``); the
loop sums a row's stages into ``cost/*`` metrics (``row_metrics``). Counts come from
where the work happens, so no call site can forget them:

- ``gen_tokens``: every ``generate`` call of a Hugging Face model while the meter runs
  (the harness's sampler, the self / hf judges, lm-eval's ``generate_until``): new
  tokens per row up to and including its first eos or pad token. ``start`` wraps
  ``GenerationMixin.generate`` once transformers' generation module is loaded (the loop
  imports it); the wrapper returns what ``generate`` returns and counts nothing when no
  meter runs. The vLLM engine adds its samples' ``n_tokens`` (counted the same way: up to and
  including the first eos) as they arrive (``harness.engines.vllm_engine.generate``).
- ``engine_starts``: vLLM engines started (``harness.engines.vllm_engine.Session``);
  ``engine_loads``: policies' weights loaded into a running engine in place of a start.
- ``engine_mem_mb``: GPU memory in use (NVML, every process's) after each vLLM job, the largest
  reading; only where a GPU and NVML are present (vLLM's engine is another process, out of reach of
  ``peak_mem_mb``).
- ``train_tokens``: prompt + completion tokens of every training batch (both sequences
  of a DPO pair), added by ``harness.train``; the reference pass is not training.
- ``judge_calls``: judge answers obtained (items x samples; cache hits excluded),
  counted by ``count_judge`` around a built judge's ``score``;
  ``judge_prompt_tokens`` / ``judge_completion_tokens``: an HTTP judge's ``usage``
  fields, when the endpoint sends them.
- ``peak_mem_mb``: CUDA's max allocated memory when the stage used CUDA, else the
  process's peak resident set size (Linux resets it per stage through
  /proc/self/clear_refs; elsewhere it is the process's lifetime peak).
- ``device``: "cuda (<name>)" when the stage allocated CUDA memory, else "cpu".

A stage resumed after a kill reports the finishing attempt's work only: what the
killed attempt did is lost with it (its records are reused, not recounted).

``cost_summary`` says what a run's rows cost in one line per experiment (the line
``harness run`` prints under its table). Not here: the cost columns of the
leaderboard (the metric catalogue, harness.metrics).
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from harness.fmt import count, duration, plural

COUNTS = ("gen_tokens", "train_tokens", "judge_calls", "judge_prompt_tokens", "judge_completion_tokens",
          "engine_starts", "engine_loads")
MAXIMA = ("engine_mem_mb",)  # the largest reading of a stage and of a row, where one was taken

_lock = threading.Lock()   # the HTTP judge adds from its worker threads
_active: Meter | None = None
_depth = threading.local()  # re-entrant generate calls are counted once


class Meter:
    def __init__(self):
        self.counts = dict.fromkeys(COUNTS, 0)
        self.maxima: dict[str, float] = {}
        self.t0 = time.perf_counter()


def add(**counts: int) -> None:
    """Add to the active meter's counts (nothing when none is active)."""
    meter = _active
    if meter is None:
        return
    with _lock:
        for k, v in counts.items():
            meter.counts[k] += int(v)


def note_max(**values: float) -> None:
    """Keep the largest of each reading (``MAXIMA``) in the active meter (nothing when none is active)."""
    meter = _active
    if meter is None:
        return
    with _lock:
        for k, v in values.items():
            meter.maxima[k] = max(meter.maxima.get(k, 0.0), round(float(v), 1))


def _torch():
    return sys.modules.get("torch")  # never imported here: a stage without torch used no CUDA


def _cuda(torch) -> bool:
    return torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()


_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_rss_peak() -> None:
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets the peak RSS (VmHWM), Linux >= 4.0
    except OSError:
        pass


def _rss_peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start() -> Meter:
    """Start a new meter (replacing one left by a stage that failed)."""
    global _active
    torch = _torch()
    if _cuda(torch):
        torch.cuda.reset_peak_memory_stats()
    _reset_rss_peak()
    _install_generate_counter()
    _active = Meter()
    return _active


def stop(meter: Meter | None = None) -> dict:
    """The reading of ``meter`` (default: the active one), which stops counting."""
    global _active
    meter = meter or _active or Meter()
    if meter is _active:
        _active = None
    torch = _torch()
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if _cuda(torch) else 0.0
    out: dict = {"wall_s": round(time.perf_counter() - meter.t0, 3), **meter.counts,
                 "peak_rss_mb": round(_rss_peak_mb(), 1), **meter.maxima}
    if cuda_mb > 0:
        out.update(peak_mem_mb=round(cuda_mb, 1), peak_mem_kind="cuda_max_allocated",
                   device=f"cuda ({torch.cuda.get_device_name()})")
    else:
        out.update(peak_mem_mb=out["peak_rss_mb"], peak_mem_kind="rss", device="cpu")
    return out


# ---- generated tokens ---------------------------------------------------------------

_original_generate = None


def _install_generate_counter() -> None:
    global _original_generate
    gen = sys.modules.get("transformers.generation.utils")
    if gen is None or _original_generate is not None:
        return
    original = gen.GenerationMixin.generate

    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        depth = getattr(_depth, "n", 0)
        _depth.n = depth + 1
        try:
            out = original(self, *args, **kwargs)
        finally:
            _depth.n = depth
        if _active is not None and depth == 0:
            try:
                add(gen_tokens=_new_tokens(self, out, args, kwargs))
            except Exception:  # noqa: BLE001  (counting must never break generation)
                pass
        return out

    gen.GenerationMixin.generate = generate
    _original_generate = original


def _new_tokens(model, out, args, kwargs) -> int:
    """Generated tokens, summed over rows: up to and including a row's first eos, or, in a
    row without eos, up to its last token other than padding (``generate`` pads a row that
    a stopping criterion ended, e.g. lm-eval's stop strings)."""
    torch = _torch()
    seq = out if torch.is_tensor(out) else getattr(out, "sequences", None)
    if seq is None or getattr(model.config, "is_encoder_decoder", False):
        return 0
    prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    new = seq[:, prompt.shape[-1]:] if torch.is_tensor(prompt) else seq
    if new.numel() == 0:
        return 0
    config = kwargs.get("generation_config") or model.generation_config
    eos = config.eos_token_id
    eos = [e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    width = new.shape[-1]
    length = torch.full((new.shape[0],), width, dtype=torch.long, device=new.device)
    if config.pad_token_id is not None:
        real = new != config.pad_token_id
        length = torch.where(real.any(-1), width - real.flip(-1).int().argmax(-1), 0)
    if eos:
        hit = torch.isin(new, torch.tensor(eos, device=new.device))
        length = torch.where(hit.any(-1), hit.int().argmax(-1) + 1, length)
    return int(length.sum())


# ---- judge calls --------------------------------------------------------------------

def count_judge(judge):
    """``judge`` with its ``score`` counting answers obtained (each verdict's samples)
    into ``judge_calls``. The same object is returned (its type is unchanged)."""
    score = judge.score

    @functools.wraps(score)
    def counted(items):
        verdicts = score(items)
        add(judge_calls=sum(max(1, len(getattr(v, "raw", ()) or ())) for v in verdicts if v is not None))
        return verdicts

    judge.score = counted
    return judge


# ---- rows ---------------------------------------------------------------------------

def row_metrics(costs: list[dict]) -> tuple[dict, str | None]:
    """(``cost/*`` metrics, device) of an iteration from its stages' cost readings: counts
    and wall time summed; ``cost/peak_mem_mb`` the largest CUDA peak when a stage used
    CUDA, else the largest RSS peak (``cost/peak_rss_mb`` is always the RSS peak);
    ``cost/gpu_s`` the wall time of the stages that used CUDA; device = the devices used,
    joined (None without readings)."""
    costs = [c for c in costs if c]
    if not costs:
        return {}, None
    on_gpu = [c for c in costs if str(c.get("device", "")).startswith("cuda")]
    out = {"cost/wall_s": round(sum(c.get("wall_s", 0.0) for c in costs), 2)}
    for k in COUNTS:
        out[f"cost/{k}"] = sum(int(c.get(k, 0)) for c in costs)
    out["cost/peak_mem_mb"] = max(c.get("peak_mem_mb", 0.0) for c in on_gpu or costs)
    out["cost/peak_rss_mb"] = max(c.get("peak_rss_mb", c.get("peak_mem_mb", 0.0)) for c in costs)
    out["cost/gpu_s"] = round(sum(c.get("wall_s", 0.0) for c in on_gpu), 2)
    for k in MAXIMA:
        if any(k in c for c in costs):
            out[f"cost/{k}"] = max(c.get(k, 0.0) for c in costs)
    devices = sorted({c["device"] for c in costs if c.get("device")})
    return out, ", ".join(devices) or None


# ---- the cost line ------------------------------------------------------------------

def cost_summary(rows: Sequence[dict]) -> str:
    """One line per experiment of what its rows cost (the ``cost/*`` metrics, summed over
    iterations; peak memory the largest): iterations, wall time, tokens generated and
    trained, judge calls (and an HTTP judge's tokens), peak memory, GPU-hours where a GPU
    was used, the device: "cost: ..." for one experiment, "cost of <experiment>: ..." for
    several. Rows without cost metrics (older runs, published systems) are left out; ""
    when none has them."""
    lines = []
    experiments = list(dict.fromkeys(r["experiment"] for r in rows))
    for exp in experiments:
        mine = [r for r in rows if r["experiment"] == exp and "cost/wall_s" in r["metrics"]]
        if not mine:
            continue

        def total(key: str) -> float:
            return sum(r["metrics"].get(key) or 0 for r in mine)

        devices = sorted({d for r in mine for d in str(r.get("device") or "").split(", ") if d})
        gpu = any(d.startswith("cuda") for d in devices)
        peak = max((r["metrics"].get("cost/peak_mem_mb") or 0) for r in mine)
        n_iter = max(r["iteration"] for r in mine)
        parts = [plural(n_iter, "iteration"), f"{duration(total('cost/wall_s'))} wall",
                 f"{count(total('cost/gen_tokens'))} tokens generated", f"{count(total('cost/train_tokens'))} trained",
                 f"{count(total('cost/judge_calls'))} judge calls"]
        if total("cost/judge_prompt_tokens") or total("cost/judge_completion_tokens"):
            parts[-1] += (f" ({count(total('cost/judge_prompt_tokens'))} + "
                          f"{count(total('cost/judge_completion_tokens'))} tokens)")
        parts.append(f"peak {peak / 1024:.1f} GB {'GPU' if gpu else 'RSS'}")
        if gpu:
            parts.append(f"{total('cost/gpu_s') / 3600:.2f} GPU-hours")
        parts.append(", ".join(d[6:-1] if d.startswith("cuda (") else d for d in devices) or "device unknown")
        lines.append(f"cost{f' of {exp}' if len(experiments) > 1 else ''}: " + ", ".join(parts))
    return "\n".join(lines)
