"""alpaca_eval's own evaluation of the outputs the harness annotated, against the same endpoint:
the cross-check that an annotator run through the harness (``annotators``) is alpaca_eval's.

``alpaca_eval_itself`` runs ``alpaca_eval.main.evaluate`` with alpaca_eval's own openai
decoder, pointed at ``base_url`` by a client config (the file ``OPENAI_CLIENT_CONFIG_PATH``
would name), with no cache and the plain win rate (the LC win rate needs the hub's
df_gamed.csv). The tests and ``bench/bench_alpaca_judge.py`` compare its per-instruction
preferences and statistics with the harness's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence


def alpaca_eval_itself(annotator: str, rows: Sequence[dict], outputs: dict[str, str], generator: str,
                       base_url: str, api_key: str = "unused", num_procs: int | None = None):
    """(leaderboard row of ``generator``, annotations) of alpaca_eval's own evaluate: ``rows``
    are the instructions with their reference outputs (``load_instructions``), ``outputs``
    the model's answers by instruction id; ``num_procs``: alpaca_eval's concurrent requests
    (its default when None)."""
    import yaml
    from alpaca_eval.main import evaluate

    reference = [{"dataset": r["dataset"], "instruction": r["instruction"], "output": r["output"],
                  "generator": r["generator"]} for r in rows]
    model = [{"dataset": r["dataset"], "instruction": r["instruction"], "output": outputs[r["id"]],
              "generator": generator} for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        client_config = Path(tmp) / "openai_clients.yaml"
        client_config.write_text(yaml.safe_dump({"default": [{"api_key": api_key, "base_url": base_url}]}))
        leaderboard, annotations = evaluate(
            model_outputs=model, reference_outputs=reference, annotators_config=annotator, fn_metric="get_winrate",
            sort_by="win_rate", precomputed_leaderboard=None, caching_path=None, output_path=None,
            is_return_instead_of_print=True, is_cache_leaderboard=False,
            annotation_kwargs={"client_config_path": str(client_config),
                               **({"num_procs": num_procs} if num_procs else {})})
    return leaderboard.loc[generator], annotations
