"""AlpacaEval's statistics of a set of annotations: win rate, standard error, counts and
average length through ``alpaca_eval.metrics.get_winrate``, and the length-controlled win rate
through its ``get_length_controlled_winrate`` whenever its ``df_gamed.csv`` can be had (never
estimated). No generation, no judging.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from harness.evaluate.annotators import quiet
from harness.models.sources import HubFileMissing, file_sha256, hub_file

AE_SET_SIZE = 805  # the AlpacaEval instruction set; the LC model's difficulty table is indexed by position
METRICS = ("win_rate", "standard_error", "n_wins", "n_draws", "n_total", "discrete_win_rate")

LC_REPO, LC_FILE = "tatsu-lab/alpaca_eval", "df_gamed.csv"  # what alpaca_eval's LC model reads (baseline None)


def _plain(v: Any) -> float | int | None:
    """numpy scalars -> Python; NaN -> None (no number is better than a made-up one)."""
    if v is None:
        return None
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and math.isnan(v) else v


def lc_data(n_instructions: int) -> tuple[dict | None, str | None]:
    """(the df_gamed.csv that alpaca_eval's length-controlled model reads: its path, hub
    revision and sha256; None) when the LC win rate can be computed here, else (None, why
    not). The file is downloaded when the hub is allowed (HARNESS_ONLINE=1) and read from
    the local Hugging Face cache otherwise (``sources.hub_file``)."""
    if n_instructions != AE_SET_SIZE:
        return None, f"needs the {AE_SET_SIZE} AlpacaEval instructions in their order (got {n_instructions})"
    try:
        files = hub_file(LC_REPO, LC_FILE)
    except HubFileMissing as e:  # not cached, no network, no such file
        return None, f"alpaca_eval's {LC_FILE}: {e}"
    path = files.paths()[0]
    return {"repo": LC_REPO, "file": LC_FILE, "revision": files.commit, "path": str(path),
            "sha256": file_sha256(str(path))}, None


def lc_unavailable_reason(n_instructions: int) -> str | None:
    """None when alpaca_eval's length-controlled model can run here."""
    return lc_data(n_instructions)[1]


class _hub_mode:
    """huggingface_hub offline while the hub is off, so that alpaca_eval's own download of
    df_gamed.csv reads the cache and never tries the network."""

    def __init__(self, online: bool):
        self.online = online

    def __enter__(self):
        import huggingface_hub.constants as c

        self.saved = c.HF_HUB_OFFLINE
        if not self.online:
            c.HF_HUB_OFFLINE = True

    def __exit__(self, *exc):
        import huggingface_hub.constants as c

        c.HF_HUB_OFFLINE = self.saved


def compute_metrics(annotations: Sequence[dict] | Any, model_outputs: Sequence[str],
                    n_instructions: int) -> tuple[dict[str, float | int | None], dict]:
    """Flat ``alpaca_eval/*`` metrics from AlpacaEval-format annotations, via alpaca_eval."""
    import pandas as pd
    from alpaca_eval.metrics import get_length_controlled_winrate, get_winrate

    df = pd.DataFrame.from_records(list(annotations)) if not isinstance(annotations, pd.DataFrame) \
        else annotations.reset_index(drop=True)
    df["preference"] = pd.to_numeric(df["preference"], errors="coerce")  # null -> NaN, dropped by alpaca_eval
    info: dict[str, Any] = {}
    n_valid = int(df["preference"].notna().sum())
    with quiet():
        raw = get_winrate(df) if n_valid else {}
    out: dict[str, float | int | None] = {f"alpaca_eval/{k}": _plain(raw.get(k)) for k in METRICS}
    out["alpaca_eval/n_total"] = n_valid if not raw else _plain(raw["n_total"])
    # as alpaca_eval.main.evaluate: int(model_outputs["output"].str.len().mean())
    lengths = pd.Series(list(model_outputs), dtype=object)
    out["alpaca_eval/avg_length"] = int(lengths.str.len().mean()) if len(lengths) else None
    data, reason = lc_data(n_instructions)
    reason = reason or (None if n_valid else "no annotations")
    if reason is None:
        with _hub_mode(os.environ.get("HARNESS_ONLINE") == "1"), quiet():
            lc = get_length_controlled_winrate(df, save_weights_dir=None, is_add_glm_preference_inplace=False)
        out["alpaca_eval/length_controlled_winrate"] = _plain(lc["length_controlled_winrate"])
        info["length_controlled_data"] = data
    else:
        out["alpaca_eval/length_controlled_winrate"] = None
        info["length_controlled_winrate"] = f"unavailable: {reason}"
    out["alpaca_eval/n_instructions"] = n_instructions
    out["alpaca_eval/coverage"] = out["alpaca_eval/n_total"] / n_instructions if n_instructions else None
    return out, info
