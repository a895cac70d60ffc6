"""Loading prompt / answer data from local files or the hub into one shape.

An ``Example`` is a chat prompt (messages ending with the user turn), an
optional answer (SPIN's human answer, a teacher answer) and any extra columns
as ``meta``. Ids are stable: the id column when configured (or an ``id``
column), else a hash of the prompt text, so resumable logs key on them.

Of a multi-turn conversation (``data.messages_field``) ``turns = "all"`` keeps the
whole conversation as the prompt and its last assistant turn as the answer;
``"first"`` keeps the first user turn (after any system message) and the assistant
turn that follows it, as SPIN's code builds its data (``select_turns``).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from harness.models.sources import HubFileMissing, HubFiles, hub_file, hub_files, resolve_ref
from harness.store.files import special_file


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

    @property
    def request(self) -> str:
        """What a judge reads as the user's request (``conversation_text``)."""
        return conversation_text(self.messages)


def conversation_text(messages: Sequence[dict]) -> str:
    """A chat prompt as one plain text for a judge's ``{instruction}``: the last turn's text
    alone when the prompt has a single user turn (system messages are not shown), else every
    user / assistant turn as "User: ..." / "Assistant: ..." paragraphs, ending with the last
    user turn, so a judge sees the conversation its answer continues."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) <= 1:
        return messages[-1]["content"]
    return "\n\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns)


class Row(dict):
    """One record of a data file: its columns, and ``where`` it came from ("FILE:LINE" for
    JSONL, "FILE: record N" for a JSON list, "FILE: row N" for parquet, "DATASET: row N" for
    a hub dataset), for messages about it."""

    def __init__(self, columns: dict, where: str):
        super().__init__(columns)
        self.where = where


def _kind_of(value: Any) -> str:
    """How a JSON value is named in messages: "a JSON array", "the number 5", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a JSON array"
    return f"a {type(value).__name__}"


def _utf8_problem(data: bytes, e: UnicodeDecodeError) -> tuple[int, str]:
    """(1-based line, problem) of the first invalid UTF-8 byte of ``data``."""
    line_start = data.rfind(b"\n", 0, e.start) + 1
    line = data.count(b"\n", 0, e.start) + 1
    return line, (f"not valid UTF-8 (byte 0x{data[e.start]:02x} at column {e.start - line_start + 1}); "
                  "save the file as UTF-8")


def _jsonl_rows(path: Path, where: str) -> list[Row]:
    data = path.read_bytes()
    rows = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: {path}:{n}: {_utf8_problem(raw, e)[1]}") from None
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(value, dict):
            raise DataError(f"{where}: {path}:{n}: {_kind_of(value)}, not a JSON object; a JSONL file holds "
                            'one object per line, e.g. {"prompt": "..."}')
        rows.append(Row(value, f"{path}:{n}"))
    return rows


def _json_rows(path: Path, where: str) -> list[Row]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, problem = _utf8_problem(data, e)
        raise DataError(f"{where}: {path}:{line}: {problem}") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: {path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(values, list):
        raise DataError(f"{where}: {path}: expected a JSON list of records, got {_kind_of(values)}")
    for i, value in enumerate(values):
        if not isinstance(value, dict):
            raise DataError(f"{where}: {path}: record {i} is {_kind_of(value)}, not a JSON object")
    return [Row(value, f"{path}: record {i}") for i, value in enumerate(values)]


def _regular(path: Path, where: str) -> None:
    """A ``DataError`` unless ``path`` is a regular file (checked before it is opened)."""
    kind = special_file(path) or ("a directory" if path.is_dir() else None)
    if kind:
        raise DataError(f"{where}: {path} is {kind}, not a regular file; give a data file")


def read_records(ref: str, *, revision: str = "main", split: str = "train", where: str = "data.train") -> list[Row]:
    """Rows of a .jsonl / .json / .parquet file, "tiny:<name>", or a hub dataset id (the files of
    its ``split`` at ``revision``, ``hub_split_files``, read as local files, in path order); each a
    ``Row`` (a dict of its columns) knowing where it came from. A line or record that is not
    a JSON object, invalid JSON or invalid UTF-8 is a ``DataError`` naming FILE:LINE."""
    path = Path(resolve_ref(ref))
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.exists():
            raise DataError(f"{where}: file not found: {path}")
        _regular(path, where)
        if path.suffix == ".jsonl":
            return _jsonl_rows(path, where)
        if path.suffix == ".json":
            return _json_rows(path, where)
        return _parquet_rows(path)
    if path.exists():
        _regular(path, where)
        raise DataError(f"{where}: {path}: unsupported file type (use .jsonl, .json or .parquet)")
    try:  # a hub dataset id: its split's files, read as local files
        files = hub_split_files(ref, split, revision, where)
    except HubFileMissing as e:
        raise DataError(f"{where}: {e}") from None
    rows: list[Row] = []
    for f in files.paths():
        rows += read_records(str(f), where=where)
    return rows


def _parquet_rows(path: Path) -> list[Row]:
    import pandas as pd

    return [Row(r, f"{path}: row {i}") for i, r in enumerate(pd.read_parquet(path).to_dict("records"))]


# ---- hub datasets --------------------------------------------------------------------------
# ``datasets`` 5.2 cannot read a hub dataset from the Hugging Face cache: offline, load_dataset
# skips the hub cache and looks only for a dataset it prepared before (any revision). So the
# harness finds a split's files itself, as ``datasets`` does online, and reads them as local
# files: the patterns of the dataset card's default config, else the file names ``datasets``
# gives a split by default.

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
SPLIT_PATTERNS = ("data/{split}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*", "data/{split}/*",
                  "data/{split}.*", "{split}/*", "{split}.*", "{split}-*")


def hub_split_files(ref: str, split: str, revision: str = "main", where: str = "data.train") -> HubFiles:
    """The data files of ``split`` of hub dataset ``ref`` at ``revision`` (``sources.hub_files``:
    from the local cache while the hub is off). The dataset card (README.md), when there is one,
    names them and fixes the commit; a card without configs, or none, leaves the default file
    names. ``HubFileMissing`` names the card or the patterns that matched nothing; a ``DataError`` a split
    the card does not have or files of a type the harness does not read."""
    try:
        card, no_card = hub_file(ref, "README.md", revision), None
    except HubFileMissing as e:
        card, no_card = None, e  # no card (or none cached): the default names
    files_of = _card_splits(card.paths()[0].read_text(encoding="utf-8", errors="replace"), ref, where) \
        if card else None
    if files_of is not None and split not in files_of:
        raise DataError(f"{where}: split {split!r} is not a split of hub dataset {ref} (revision {revision}); "
                        f"its card names: {', '.join(files_of)}")
    patterns = files_of[split] if files_of is not None else [p.format(split=split) for p in SPLIT_PATTERNS]
    try:
        files = hub_files(ref, patterns, card.commit if card else revision)
    except HubFileMissing:
        if card is not None:
            raise
        raise HubFileMissing(f"{no_card}; nor is any file of split {split!r} by the default names "
                             f"({', '.join(patterns)})") from None
    data = tuple(f for f in files.files if f.endswith(DATA_SUFFIXES))
    if not data:
        raise DataError(f"{where}: hub dataset {ref} (revision {revision}), split {split}: its files "
                        f"({', '.join(files.files)}) are of a type the harness does not read "
                        f"({', '.join(DATA_SUFFIXES)})")
    return HubFiles(files.repo, revision, files.commit, files.folder, data)


def _card_splits(card: str, ref: str, where: str) -> dict[str, list[str]] | None:
    """{split: file patterns} of the default config of a dataset card's YAML header, or None
    when the card declares no configs."""
    import yaml

    head = card.split("\n---", 1)[0][4:] if card.startswith("---\n") else ""
    try:
        meta = yaml.safe_load(head) if head else None
    except yaml.YAMLError:
        return None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs) or not configs:
        return None
    chosen = [c for c in configs if c.get("default")] or [c for c in configs if c.get("config_name") == "default"] \
        or (configs if len(configs) == 1 else [])
    if not chosen:
        raise DataError(f"{where}: hub dataset {ref} has several configs "
                        f"({', '.join(str(c.get('config_name')) for c in configs)}) and none is its default")
    files, base = chosen[0].get("data_files"), str(chosen[0].get("data_dir") or "").strip("/")
    if isinstance(files, (str, list)) and (isinstance(files, str) or all(isinstance(f, str) for f in files)):
        files = {"train": files}
    elif isinstance(files, list):
        files = {str(f.get("split", "train")): f.get("path") for f in files if isinstance(f, dict)}
    if not isinstance(files, dict):
        return None
    return {name: [f"{base}/{p}" if base else p for p in ([paths] if isinstance(paths, str) else list(paths or ()))]
            for name, paths in files.items()}


def text_column(row: dict, column: str, where: str, *, required: bool = True, n: int = 0) -> str | None:
    """``row[column]`` as text. A required column that is missing, null or not a string is a
    ``DataError`` naming the row (``Row.where``, else "row ``n``") and the column; an optional
    one may be missing or null (None) but, when given, must be a string."""
    at = getattr(row, "where", f"row {n}")
    if column not in row:
        if not required:
            return None
        raise DataError(f"{where}: {at}: no column {column!r} (columns: {', '.join(sorted(map(str, row)))})")
    value = row[column]
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: {at}: column {column!r} is {_kind_of(value)}, not text")
    return value


def with_system(system_prompt: str, messages: Sequence[dict] = ()) -> tuple[dict, ...]:
    """``messages`` after a system message of ``system_prompt`` (data.system_prompt); none
    when it is empty."""
    return (({"role": "system", "content": system_prompt},) if system_prompt else ()) + tuple(messages)


def _stable_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


TURNS = ("first", "all")


def select_turns(msgs: list[dict], turns: str) -> tuple[list[dict], str | None]:
    """(prompt messages, answer or None) of a conversation. "all": the conversation up to its
    final assistant turn, which is the answer. "first": the messages up to the first user
    turn (system messages before it stay), and the assistant turn right after it as the
    answer (None when none follows); a conversation without a user turn is a ValueError."""
    if turns == "all":
        return (msgs[:-1], msgs[-1]["content"]) if msgs[-1]["role"] == "assistant" else (msgs, None)
    if turns != "first":
        raise ValueError(f"turns must be one of {TURNS}, got {turns!r}")
    user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
    if user is None:
        raise ValueError("no user turn")
    after = msgs[user + 1] if user + 1 < len(msgs) else None
    return msgs[:user + 1], after["content"] if after is not None and after["role"] == "assistant" else None


def _messages(row: dict, column: str, where: str, n: int, turns: str = "all") -> tuple[list[dict], str | None]:
    """(the prompt's messages, the answer's text or None) of a messages column (``select_turns``)."""
    at = getattr(row, "where", f"row {n}")
    msgs = row.get(column)
    if msgs is not None and not isinstance(msgs, (str, dict)) and hasattr(msgs, "__len__"):
        msgs = list(msgs)  # parquet gives numpy arrays for list columns
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: {at}: column {column!r} is {_kind_of(msgs) if column in row else 'missing'}, "
                        "not a list of messages [{role, content}, ...]")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {at}: column {column!r}, message {i}: not {{role, content}} with text values")
    try:
        msgs, response = select_turns(msgs, turns)
    except ValueError as e:
        raise DataError(f"{where}: {at}: column {column!r}: {e} (data.turns = {turns!r})") from None
    if not msgs:
        raise DataError(f"{where}: {at}: column {column!r} holds only the answer, no prompt")
    return [{"role": m["role"], "content": m["content"]} for m in msgs], response


def to_examples(rows: list[dict], *, prompt_field: str = "prompt", response_field: str = "response",
                messages_field: str = "", id_field: str = "", system_prompt: str = "",
                where: str = "data", file_where: str | None = None, require_response: bool = False,
                turns: str = "all") -> list[Example]:
    """Examples of ``rows``. The prompt (column ``prompt_field``, or the messages, of which
    ``turns`` are kept: ``select_turns``) is required text; the response is optional unless
    ``require_response``, and text when given (see ``text_column``). A missing column is
    reported at ``{where}.prompt_field`` / ``{where}.response_field``, a bad value in one row
    at ``file_where`` (default ``where``)."""
    file_where = file_where or where
    out: list[Example] = []
    seen: set[str] = set()
    for n, row in enumerate(rows):
        if messages_field:
            msgs, response = _messages(row, messages_field, f"{where}.messages_field", n, turns)
            messages = tuple(msgs)
            if require_response and response is None:
                raise DataError(f"{file_where}: {getattr(row, 'where', f'row {n}')}: column {messages_field!r} "
                                + ("does not end with an assistant turn (the answer)" if turns == "all" else
                                   "has no assistant turn right after its first user turn (the answer; data.turns = "
                                   '"first")'))
        else:
            if prompt_field not in row:
                text_column(row, prompt_field, f"{where}.prompt_field", n=n)
            messages = ({"role": "user", "content": text_column(row, prompt_field, file_where, n=n)},)
            if require_response and response_field not in row:
                text_column(row, response_field, f"{where}.response_field", n=n)
            response = text_column(row, response_field, file_where, required=require_response, n=n)
        messages = with_system(system_prompt, messages)
        key = id_field or "id"
        pid = str(row[key]) if key in row else _stable_id(json.dumps(messages, sort_keys=True))
        if pid in seen:
            raise DataError(f"{where}: duplicate prompt id {pid!r} (row {n})")
        seen.add(pid)
        meta = {k: v for k, v in row.items() if k not in (prompt_field, response_field, messages_field, key)}
        out.append(Example(pid, messages, response, meta))
    return out


def load_examples(section, ref: str | None = None, where: str = "data.train", *, seed: int,
                  require_response: bool = False) -> list[Example]:
    """Examples from ``ref`` (default: ``section.train``), with the section's column mapping.
    With ``num_prompts`` set they are sorted by id, shuffled with ``seed`` (the experiment
    seed: another seed draws another subset) and cut to the first ``num_prompts``.
    ``require_response``: every row must have its answer (SPIN). ``section.turns`` is the
    method's choice once ``config.parse`` resolved "auto"; a section built by hand with
    "auto" reads every turn ("all")."""
    rows = read_records(ref or section.train, revision=section.revision, split=section.split, where=where)
    exs = to_examples(rows, prompt_field=section.prompt_field, response_field=section.response_field,
                      messages_field=section.messages_field, id_field=section.id_field,
                      system_prompt=section.system_prompt, where="data", file_where=where,
                      require_response=require_response,
                      turns="all" if section.turns == "auto" else section.turns)
    if section.num_prompts and ref is None:
        exs = sorted(exs, key=lambda e: e.id)
        random.Random(seed).shuffle(exs)
        exs = exs[:section.num_prompts]
    return exs


def load_simple(ref: str, where: str, prompt_field: str = "prompt", response_field: str = "response", *,
                require_response: bool = False) -> list[Example]:
    """Files of a method's own options (IFT/EFT, teacher outputs, prompt files)."""
    return to_examples(read_records(ref, where=where), prompt_field=prompt_field,
                       response_field=response_field, where=where, require_response=require_response)
