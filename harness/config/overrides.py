"""The command line's edits of an experiment file: ``--set KEY=VALUE`` overrides written into
the parsed TOML, ``--sweep KEY=V1,V2`` grids of sweep points, the run directory names of a
point, and errors that name the ``--set`` or ``--sweep`` that wrote a field. Reading and
checking the file itself is ``harness.config.experiment``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from typing import Any, Sequence

from harness.config.schema import FieldError
from harness.fmt import setting, short_keys


SET = "--set"  # the prefix of an error whose field an override of the command line wrote


def parse_override(text: str) -> tuple[list[str], Any]:
    """One ``--set KEY=VALUE``: (KEY's parts, VALUE). KEY is a TOML dotted key
    (``training.learning_rate``); VALUE a TOML value (``1e-5``, ``true``, ``["a", "b"]``,
    ``"quoted"``), else the bare text as a string (``smollm2-135m-instruct``, ``cuda``).
    ValueError with a one-line reason when the pair is malformed."""
    key, sep, value = (x.strip() for x in text.partition("="))
    if not sep or not key:
        raise ValueError("expected KEY=VALUE, e.g. model.base=smollm2-135m-instruct")
    try:
        node = tomllib.loads(f"{key} = 0")
    except tomllib.TOMLDecodeError:
        node = None
    parts = []
    while isinstance(node, dict) and len(node) == 1:  # {"a": {"b": 0}} -> ["a", "b"]
        (name, node), = node.items()
        parts.append(name)
    if node != 0:
        raise ValueError(f"{key!r} is not a dotted key such as training.learning_rate")
    try:
        parsed = tomllib.loads(f"v = {value}")
    except tomllib.TOMLDecodeError:
        parsed = {}
    if list(parsed) == ["v"]:
        return parts, parsed["v"]
    if value[:1] in tuple("[{\"'"):  # meant as an array, table or quoted string: not a bare word
        raise ValueError(f"{value!r} is not a TOML value")
    return parts, value


def apply_overrides(doc: dict, overrides: Sequence[str]) -> tuple[list[str], list[FieldError]]:
    """Write each ``--set KEY=VALUE`` into the TOML document ``doc`` (in place, in order: a later
    one wins), creating missing tables. Returns the dotted paths the overrides own (each key and
    every table it created; see ``blame_overrides``) and the malformed ones, as errors."""
    owned: list[str] = []
    errors: list[FieldError] = []
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except ValueError as e:
            errors.append(FieldError(f"{SET} {text.partition('=')[0].strip()}", str(e)))
            continue
        node = doc
        for i, name in enumerate(parts[:-1]):
            where = ".".join(parts[:i + 1])
            if name not in node:
                node[name] = {}
                owned.append(where)
            elif not isinstance(node[name], dict):
                errors.append(FieldError(f"{SET} {'.'.join(parts)}", f"{where} is a value in the file, not a table"))
                break
            node = node[name]
        else:
            node[parts[-1]] = value
            owned.append(".".join(parts))
    return owned, errors


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The dotted keys of well-formed ``--set KEY=VALUE`` pairs (malformed ones are reported by
    ``apply_overrides``)."""
    keys = []
    for text in overrides:
        try:
            keys.append(".".join(parse_override(text)[0]))
        except ValueError:
            pass
    return keys


def blame_overrides(errors: list[FieldError], owned: Sequence[str]) -> list[FieldError]:
    """``errors`` with every one about a field an override wrote (the key, a table it created,
    or anything inside them: ``eval.lm_eval_tasks[0]``) named as ``--set <path>``, so the line
    points at the command line, not at the file."""
    def ours(path: str) -> bool:
        return any(path == k or path.startswith((f"{k}.", f"{k}[")) for k in owned)

    return [FieldError(f"{SET} {e.path}", e.message) if ours(e.path) else e for e in errors]


SWEEP = "--sweep"  # the prefix of an error whose field a sweep point of the command line wrote


_ABSENT = object()


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")  # outside experiment.name's safe path characters


def field_value(d: dict, key: str, default: Any = _ABSENT) -> Any:
    """The value at dotted ``key`` of a config's ``to_dict()``; ``default`` when there is none
    (KeyError without one)."""
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _ABSENT:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def point_dirs(point: dict[str, Any]) -> list[str]:
    """The run-directory levels of a sweep point {dotted key: value}: "<name>-<value>" per key,
    <name> the key's last part (the whole key when two keys share it), <value> as
    ``fmt.setting`` writes it; a value with characters outside a safe path component, or longer
    than 48 characters, keeps its first 32 safe characters and ends in "-" and 8 hex digits of
    its hash (so distinct values never share a directory)."""
    out = []
    for key, name in zip(point, short_keys(list(point))):
        text = setting(point[key])
        safe = _UNSAFE.sub("_", text)
        if safe != text or len(text) > 48:
            safe = f"{safe[:32]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
        out.append(f"{name}-{safe}")
    return out


def _split_values(text: str) -> list[str]:
    """``V1,V2,...`` split at the commas outside brackets, braces and quotes."""
    out, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote and text[i - 1] != "\\" else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    return out + [text[start:].strip()]


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """One ``--sweep KEY=V1,V2,...``: (KEY, the values' texts). KEY and each value are a
    ``--set`` pair's (``parse_override``); values are split at commas outside [...], {...} and
    quotes (a string with a comma is quoted: '"a, b"'). ValueError with a one-line reason when
    it is malformed, a value is empty or two values are equal."""
    key, sep, values = (x.strip() for x in text.partition("="))
    if not sep or not key or not values:
        raise ValueError("expected KEY=V1,V2,..., e.g. training.learning_rate=1e-5,5e-5")
    texts, seen = _split_values(values), {}
    for t in texts:
        if not t:
            raise ValueError(f"an empty value in {values!r}")
        parts, value = parse_override(f"{key}={t}")
        same = seen.setdefault(json.dumps(value, sort_keys=True), t)
        if same != t:
            raise ValueError(f"{t!r} repeats {same!r}")
    return ".".join(parts), texts


def sweep_grid(sweeps: Sequence[str]) -> list[tuple[str, ...]]:
    """The points of the ``--sweep`` options: every combination of their values, the first
    option's slowest, each point as ``KEY=VALUE`` texts (``load``'s ``point``); [()] without
    sweeps. ValueError naming the option when one is malformed or a key is swept twice."""
    axes, keys = [], []
    for text in sweeps:
        try:
            key, values = parse_sweep(text)
        except ValueError as e:
            raise ValueError(f"{SWEEP} {text}: {e}") from None
        if key in keys:
            raise ValueError(f"{SWEEP} {text}: {key} is swept twice; give all its values in one {SWEEP}")
        keys.append(key)
        axes.append([f"{key}={v}" for v in values])
    return list(itertools.product(*axes))


def blame_point(errors: list[FieldError], point: Sequence[str]) -> list[FieldError]:
    """``errors`` with every one about a field the sweep ``point`` wrote (the key or anything
    inside it) named as ``--sweep KEY=VALUE`` (``--sweep KEY=VALUE: <inner path>``), so the
    line says which value of which option it is about."""
    out = []
    for e in errors:
        if e.path.startswith(f"{SET} "):  # written by the point, reported by apply_overrides
            e = FieldError(f"{SWEEP} {e.path[len(SET) + 1:]}", e.message)
        elif point and (m := re.fullmatch(r"experiment\.sweep\[(\d+)\]", e.path)) and int(m[1]) < len(point):
            e = FieldError(f"{SWEEP} {point[int(m[1])]}", e.message)
        for pair in point:
            key = pair.partition("=")[0]
            # the key, anything inside it, or a table above it that only the point made (an unknown one)
            if e.path == key or e.path.startswith((f"{key}.", f"{key}[")) or key.startswith(f"{e.path}."):
                inner = e.path[len(key):].lstrip(".") if e.path.startswith(key) else ""
                e = FieldError(f"{SWEEP} {pair}" + (f": {inner}" if inner else ""), e.message)
                break
        out.append(e)
    return out
