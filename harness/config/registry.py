"""Name -> implementation tables with helpful failures (did you mean, the known names).

``METHODS`` is filled by ``harness.methods`` and ``JUDGES`` by ``harness.judges`` when
they are imported: each method module registers its strategy object, each judge module
its kind object (both carry their options schema). ``harness.config.experiment`` reads the tables
without importing those packages, so dependencies point one way (methods -> config ->
registry, judges -> config -> registry); the entry points (cli, loop, validate) import
both packages. Not here: what a method or a judge kind is (``harness.methods.base``,
``harness.judges.kind``).
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from harness.config.schema import FieldError, closest

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind. ``home`` is the package whose import fills the table.
    When a base class is declared (``entries_of``), every entry must be an instance of it."""

    def __init__(self, kind: str, home: str):
        self.kind = kind
        self.home = home
        self.base: type | None = None
        self._items: dict[str, T] = {}

    def entries_of(self, base: type) -> type:
        """Class decorator: every entry registered from now on must be an instance of ``base``."""
        self.base = base
        return base

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if self.base is not None and not isinstance(obj, self.base):
                raise TypeError(f"{self.kind} {name!r}: a {type(obj).__name__} is not a {self.base.__name__}")
            if getattr(obj, "name", name) != name:
                raise ValueError(f"{self.kind} {name!r} is registered under another name than its own "
                                 f"({getattr(obj, 'name')!r})")
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj
        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(self.unknown_message(name))
        return self._items[name]

    def get_or_error(self, name: str, path: str, errors: list[FieldError]) -> T | None:
        if name in self._items:
            return self._items[name]
        errors.append(FieldError(path, self.unknown_message(name)))
        return None

    def unknown_message(self, name: str) -> str:
        if not self._items:
            return f"unknown {self.kind} {name!r}: none is registered (import {self.home} first)"
        hint = closest(name, self.names())
        extra = f"did you mean {hint!r}? " if hint else ""
        return f"unknown {self.kind} {name!r}; {extra}known: {', '.join(self.names())}"


METHODS: Registry[Any] = Registry("method", "harness.methods")
JUDGES: Registry[Any] = Registry("judge", "harness.judges")
