"""Loading prompt / answer data from local files or the hub into one shape.

An ``Example`` is a chat prompt (messages ending with the user turn), an
optional answer (SPIN's human answer, a teacher answer) and any extra columns
as ``meta``. Ids are stable: the id column when configured (or an ``id``
column), else a hash of the prompt text, so resumable logs key on them.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from harness.sources import resolve_ref


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Example:
    id: str
    messages: tuple[dict, ...]
    response: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def instruction(self) -> str:
        return self.messages[-1]["content"]


def read_records(ref: str, *, revision: str = "main", split: str = "train", where: str = "data.train") -> list[dict]:
    """Rows of a .jsonl / .json / .parquet file, "tiny:<name>", or a hub dataset id."""
    path = Path(resolve_ref(ref))
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.exists():
            raise DataError(f"{where}: file not found: {path}")
        if path.suffix == ".jsonl":
            rows = []
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(f"{where}: {path}:{n}: not valid JSON ({e.msg})") from None
            return rows
        if path.suffix == ".json":
            rows = json.loads(path.read_text())
            if not isinstance(rows, list):
                raise DataError(f"{where}: {path}: expected a JSON list of records")
            return rows
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    if path.exists():
        raise DataError(f"{where}: {path}: unsupported file type (use .jsonl, .json or .parquet)")
    from datasets import load_dataset  # a hub dataset id; needs network (HARNESS_ONLINE=1)

    try:
        return list(load_dataset(ref, revision=revision, split=split))
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; report them uniformly
        raise DataError(f"{where}: cannot load dataset {ref!r} (revision {revision}, split {split}): {e}") from None


def with_system(system_prompt: str, messages: Sequence[dict] = ()) -> tuple[dict, ...]:
    """``messages`` after a system message of ``system_prompt`` (data.system_prompt); none
    when it is empty."""
    return (({"role": "system", "content": system_prompt},) if system_prompt else ()) + tuple(messages)


def _stable_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def to_examples(rows: list[dict], *, prompt_field: str = "prompt", response_field: str = "response",
                messages_field: str = "", id_field: str = "", system_prompt: str = "",
                where: str = "data") -> list[Example]:
    out: list[Example] = []
    seen: set[str] = set()
    for n, row in enumerate(rows):
        if messages_field:
            msgs = row.get(messages_field)
            if msgs is not None and not isinstance(msgs, (str, dict)) and hasattr(msgs, "__len__"):
                msgs = list(msgs)  # parquet gives numpy arrays for list columns
            if not isinstance(msgs, list) or not msgs:
                raise DataError(f"{where}.messages_field: row {n} has no list in column {messages_field!r}")
            response = None
            if msgs[-1].get("role") == "assistant":
                response, msgs = msgs[-1]["content"], msgs[:-1]
            messages = tuple({"role": m["role"], "content": m["content"]} for m in msgs)
        else:
            if prompt_field not in row:
                raise DataError(f"{where}.prompt_field: row {n} has no column {prompt_field!r} "
                                f"(columns: {', '.join(sorted(row))})")
            messages = ({"role": "user", "content": str(row[prompt_field])},)
            response = row.get(response_field)
        messages = with_system(system_prompt, messages)
        key = id_field or "id"
        pid = str(row[key]) if key in row else _stable_id(json.dumps(messages, sort_keys=True))
        if pid in seen:
            raise DataError(f"{where}: duplicate prompt id {pid!r} (row {n})")
        seen.add(pid)
        meta = {k: v for k, v in row.items() if k not in (prompt_field, response_field, messages_field, key)}
        out.append(Example(pid, messages, None if response is None else str(response), meta))
    return out


def load_examples(section, ref: str | None = None, where: str = "data.train", *, seed: int) -> list[Example]:
    """Examples from ``ref`` (default: ``section.train``), with the section's column mapping.
    With ``num_prompts`` set they are sorted by id, shuffled with ``seed`` (the experiment
    seed: another seed draws another subset) and cut to the first ``num_prompts``."""
    rows = read_records(ref or section.train, revision=section.revision, split=section.split, where=where)
    exs = to_examples(rows, prompt_field=section.prompt_field, response_field=section.response_field,
                      messages_field=section.messages_field, id_field=section.id_field,
                      system_prompt=section.system_prompt, where="data")
    if section.num_prompts and ref is None:
        exs = sorted(exs, key=lambda e: e.id)
        random.Random(seed).shuffle(exs)
        exs = exs[:section.num_prompts]
    return exs


def load_simple(ref: str, where: str, prompt_field: str = "prompt", response_field: str = "response") -> list[Example]:
    """Files of a method's own options (IFT/EFT, teacher outputs, prompt files)."""
    return to_examples(read_records(ref, where=where), prompt_field=prompt_field,
                       response_field=response_field, where=where)
