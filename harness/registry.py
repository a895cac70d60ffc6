"""Name -> implementation tables for methods and judges, with helpful failures."""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from harness.schema import FieldError, closest

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._loaders: list[Callable[[], Any]] = []

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj
        return deco

    def lazy(self, loader: Callable[[], Any]) -> None:
        """Import-on-first-use, so that registering does not import torch."""
        self._loaders.append(loader)

    def _load(self) -> None:
        while self._loaders:
            self._loaders.pop()()

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise KeyError(self.unknown_message(name))
        return self._items[name]

    def get_or_error(self, name: str, path: str, errors: list[FieldError]) -> T | None:
        self._load()
        if name in self._items:
            return self._items[name]
        errors.append(FieldError(path, self.unknown_message(name)))
        return None

    def unknown_message(self, name: str) -> str:
        hint = closest(name, self.names())
        extra = f"did you mean {hint!r}? " if hint else ""
        return f"unknown {self.kind} {name!r}; {extra}known: {', '.join(self.names())}"


METHODS: Registry[Any] = Registry("method")


def _load_methods() -> None:
    import harness.methods  # noqa: F401  (registers spin, self_rewarding, dno)


METHODS.lazy(_load_methods)
