"""AlpacaEval's instructions with their reference outputs: a local AlpacaEval-format file,
"tiny:alpaca_eval", or the AlpacaEval 2.0 set from the hub (its plain JSON file at a
revision, from the local Hugging Face cache while the hub is off), each row with a stable
``id``; the hub file's identity for a stage's recorded inputs. Not here: answering or
judging them (``harness.evaluate.alpaca``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from harness.config.annotator_configs import HUB_SET
from harness.config.eval_sections import AlpacaEvalSection
from harness.evaluate.alpaca_metrics import LC_REPO
from harness.models.sources import HubFiles, hub_file, hub_identity, resolve_ref


# HUB_SET = "alpaca_eval": AlpacaEval 2.0 from the hub, 805 instructions, GPT-4 Turbo references: the
# plain file that alpaca_eval's loading script reads
HUB_REPO, HUB_FILE = LC_REPO, "alpaca_eval_gpt4_baseline.json"


def hub_instructions(revision: str = "main") -> HubFiles:
    """AlpacaEval 2.0's instruction file (``HUB_FILE`` of the hub dataset ``HUB_REPO``) at
    ``revision``: downloaded with the hub on, from the local Hugging Face cache with it off.
    ``HubFileMissing`` (a FileNotFoundError) names repo, file and revision. alpaca_eval's own
    loader builds the set with a dataset loading script, which ``datasets`` no longer runs."""
    return hub_file(HUB_REPO, HUB_FILE, revision)


def instructions_identity(section: AlpacaEvalSection) -> dict | None:
    """The hub file's identity (repo, revision, commit, sha256) when the section reads the hub
    set, else None (a local file is fingerprinted with the stage's other input files)."""
    return hub_identity(hub_instructions(section.revision)) if section.instructions == HUB_SET else None


def load_instructions(ref: str, limit: int = 0, revision: str = "main") -> list[dict]:
    """AlpacaEval-format rows [{instruction, output, generator, dataset, ...}] with a stable ``id``,
    from a local JSON file, "tiny:alpaca_eval", or "alpaca_eval" (the AlpacaEval 2.0 set: the hub
    file ``hub_instructions(revision)``)."""
    if ref == HUB_SET:
        path = hub_instructions(revision).paths()[0]
        label = f"{HUB_FILE} of hub dataset {HUB_REPO} (revision {revision})"
    else:
        path = Path(resolve_ref(ref) if ref.startswith("tiny:") else ref)
        label = str(path)
    try:
        rows = json.loads(path.read_text())
    except OSError as e:
        raise FileNotFoundError(f"eval.alpaca_eval.instructions: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"eval.alpaca_eval.instructions: {label} is not valid JSON: {e}") from None
    if not isinstance(rows, list):
        raise ValueError(f"eval.alpaca_eval.instructions: {label} must hold a JSON list of objects")
    seen: dict[str, int] = {}
    out = []
    for i, row in enumerate(rows[:limit or None]):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) \
                or not isinstance(row.get("output"), str):
            raise ValueError(f"eval.alpaca_eval.instructions: {label} row {i} needs string fields "
                             "'instruction' and 'output' (the reference)")
        pid = str(row.get("id") or hashlib.sha256(row["instruction"].encode()).hexdigest()[:16])
        seen[pid] = seen.get(pid, 0) + 1
        out.append({**row, "id": pid if seen[pid] == 1 else f"{pid}-{seen[pid]}"})
    if not out:
        raise ValueError(f"eval.alpaca_eval.instructions: {label} holds no instructions")
    return out


def section_instructions(section: AlpacaEvalSection, limit: int | None = None) -> list[dict]:
    """``load_instructions`` of a section (its ``limit`` unless given); ``section.revision`` is
    read only for the hub set, so a stage reading a local file does not depend on it."""
    revision = section.revision if section.instructions == HUB_SET else "main"
    return load_instructions(section.instructions, section.limit if limit is None else limit, revision)
