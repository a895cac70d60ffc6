"""Name -> implementation tables with helpful failures (did you mean, the known names).

``METHODS`` is filled by ``harness.methods`` when it is imported: each method module
registers its strategy object (which carries its options schema). ``harness.config``
reads the table without importing the methods, so dependencies point one way
(methods -> config -> registry); the entry points (cli, loop, validate) import
``harness.methods``."""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from harness.schema import FieldError, closest

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj
        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

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
            return f"unknown {self.kind} {name!r}: none is registered (import harness.methods first)"
        hint = closest(name, self.names())
        extra = f"did you mean {hint!r}? " if hint else ""
        return f"unknown {self.kind} {name!r}; {extra}known: {', '.join(self.names())}"


METHODS: Registry[Any] = Registry("method")
