"""Strict, typed parsing of nested dicts (from TOML) into frozen dataclasses.

Each field documents itself where it is declared: ``opt(default, "doc", ...)``.
Parsing never stops at the first problem: every error of a document is
collected with its dotted path, so a user fixes a file in one pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, get_args, get_origin, get_type_hints


@dataclass(frozen=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigError(ValueError):
    """All problems of one config file, each as ``FILE: dotted.path: what is wrong``."""

    def __init__(self, source: str, errors: list[FieldError]):
        self.source = source
        self.errors = errors
        super().__init__("\n".join(f"{source}: {e}" for e in errors))


def opt(default: Any = MISSING, doc: str = "", *, choices: tuple | None = None,
        min: float | None = None, max: float | None = None, factory: Any = MISSING) -> Any:
    """Declare a config field with its documentation and value rules."""
    meta = {"doc": doc, "choices": choices, "min": min, "max": max}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))  # None = unset
    if get_origin(tp) in (list, tuple):
        return f"list of {_type_name(get_args(tp)[0])}"
    if get_origin(tp) is dict:
        return f"table of {_type_name(get_args(tp)[1])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, errors: list[FieldError]) -> Any:
    """Check ``value`` against annotation ``tp``; return the typed value or None."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[FieldError] = []
            out = _coerce(value, arg, path, trial)
            if not trial:
                return out
        errors.append(FieldError(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}"))
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(FieldError(path, f"expected a table, got {type(value).__name__}"))
            return None
        return parse_section(tp, value, path, errors)
    if origin in (list, tuple):
        if not isinstance(value, list):
            errors.append(FieldError(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}"))
            return None
        (item_tp, *_) = get_args(tp)
        return tuple(_coerce(v, item_tp, f"{path}[{i}]", errors) for i, v in enumerate(value))
    if origin is dict:  # a table of typed values under free string keys, e.g. {gsm8k = 5}
        if not isinstance(value, dict):
            errors.append(FieldError(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}"))
            return None
        _, value_tp = get_args(tp)
        return {k: _coerce(v, value_tp, f"{path}.{k}", errors) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(FieldError(path, f"expected a number, got {type(value).__name__} {value!r}"))
            return None
        if not math.isfinite(value):
            errors.append(FieldError(path, f"expected a finite number, got {value!r}"))
            return None
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(FieldError(path, f"expected an integer, got {type(value).__name__} {value!r}"))
            return None
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            errors.append(FieldError(path, f"expected {tp.__name__}, got {type(value).__name__} {value!r}"))
            return None
        return value
    if tp is dict:
        if not isinstance(value, dict):
            errors.append(FieldError(path, f"expected a table, got {type(value).__name__}"))
            return None
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _check_rules(value: Any, meta: dict, path: str, errors: list[FieldError]) -> None:
    if value is None:
        return
    if isinstance(value, tuple):  # every element, each under its own index
        for i, v in enumerate(value):
            _check_rules(v, meta, f"{path}[{i}]", errors)
        return
    if isinstance(value, dict):  # every value of a typed table, under its key
        for k, v in value.items():
            _check_rules(v, meta, f"{path}.{k}", errors)
        return
    v = value
    if meta.get("choices") and v not in meta["choices"]:
        hint = difflib.get_close_matches(str(v), [str(c) for c in meta["choices"]], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        errors.append(FieldError(path, f"{v!r} is not one of {list(meta['choices'])}{extra}"))
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if meta.get("min") is not None and v < meta["min"]:
            errors.append(FieldError(path, f"{v!r} is below the minimum {meta['min']}"))
        if meta.get("max") is not None and v > meta["max"]:
            errors.append(FieldError(path, f"{v!r} is above the maximum {meta['max']}"))


def closest(name: str, known: list[str]) -> str | None:
    """A likely intended name: a prefix match first ("evaluation" -> "eval"), else difflib's."""
    prefix = [k for k in known if name.startswith(k) or k.startswith(name)]
    if prefix:
        return max(prefix, key=len)
    hint = difflib.get_close_matches(name, known, n=1)
    return hint[0] if hint else None


def unknown_key_error(key: str, known: list[str], path: str) -> FieldError:
    hint = [h for h in [closest(key, known)] if h]
    extra = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(sorted(known))}"
    return FieldError(path, f"unknown key{extra}")


def parse_section(cls: type, data: dict, path: str, errors: list[FieldError],
                  skip: tuple[str, ...] = ()) -> Any:
    """Build ``cls`` from ``data``; unknown keys, wrong types and bad values go to ``errors``.

    Keys named in ``skip`` are left for the caller (used for tables whose schema
    depends on another field, such as a method's own options). A class with a
    ``from_table(data, path, errors)`` classmethod parses itself (a judge section,
    whose sub-table's schema depends on its ``name``), usually with ``parse_fields``.
    """
    custom = getattr(cls, "from_table", None)
    if custom is not None:
        return custom(data, path, errors)
    return parse_fields(cls, data, path, errors, skip)


def parse_fields(cls: type, data: dict, path: str, errors: list[FieldError],
                 skip: tuple[str, ...] = ()) -> Any:
    """``parse_section`` without the ``from_table`` hook: ``cls``'s own fields only."""
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known and key not in skip:
            errors.append(unknown_key_error(key, known, _join(path, key)))
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        sub = _join(path, f.name)
        if f.name in data:
            n_before = len(errors)
            value = _coerce(data[f.name], hints[f.name], sub, errors)
            if len(errors) == n_before:
                _check_rules(value, dict(f.metadata), sub, errors)
            if len(errors) == n_before:
                kwargs[f.name] = value
        elif f.default is MISSING and f.default_factory is MISSING:
            errors.append(FieldError(sub, "required key is missing"))
    try:
        return cls(**kwargs)
    except TypeError:
        return None  # a required field failed; its error is already recorded


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict with lists (for JSON/TOML dumps and hashing)."""
    if dataclasses.is_dataclass(obj):
        custom = getattr(obj, "to_table", None)  # the inverse of a ``from_table`` (see parse_section)
        if custom is not None:
            return custom()
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def explain(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows (dotted key, type, default, doc) for ``harness validate --explain``."""
    rows = []
    hints = get_type_hints(cls)
    for f in fields(cls):
        key = _join(prefix, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(explain(tp, key))
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else "(required)")
        doc = f.metadata.get("doc", "")
        if f.metadata.get("choices"):
            doc += f" One of: {', '.join(map(str, f.metadata['choices']))}."
        rows.append((key, _type_name(tp), repr(to_dict(default)), doc))
    return rows
