"""The config section of one judge (``JudgeSection``): what every judge has (its kind
``name``, batch size, minimum coverage) and the kind's own options, parsed from the table
named after the kind, e.g.

    [judge]                      [eval.alpaca_eval.judge]
    name = "openai"              name = "hf"
    batch_size = 32              [eval.alpaca_eval.judge.hf]
    [judge.openai]               model = "Qwen/Qwen2.5-7B-Instruct"
    base_url = "http://..."

The kinds and their option schemas come from ``harness.config.registry.JUDGES`` (filled by
importing ``harness.judges``); a kind's config checks run when its table is parsed.
``harness.config.experiment`` re-exports the class. Not here: building or running a judge, and
pre-flight checks (``harness.judges``, ``harness.validate.experiment``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from harness.config.registry import JUDGES
from harness.config.schema import FieldError, opt, parse_fields, to_dict, unknown_key_error

NONE = "none"  # no judge


@dataclass(frozen=True)
class JudgeSection:
    name: str = opt(NONE, 'Judge kind: "none" (no judge) or a registered judge; its own options go in the table named after it, [<this section>.<name>] (listed below as judge.<name>.*).')
    batch_size: int = opt(16, "Judge batch size (an endpoint judge: requests in flight).", min=1)
    min_coverage: float = opt(0.9, "Fail the stage when fewer than this fraction of items get a valid judgment.", min=0.0, max=1.0)
    options: Any = None  # the kind's own dataclass, from [<path>.<name>]; None for "none"

    def __post_init__(self):
        if self.name == NONE:
            if self.options is not None:
                raise ValueError(f"judge 'none' takes no options, got {self.options!r}")
            return
        kind = JUDGES.get(self.name)
        if self.options is None:
            object.__setattr__(self, "options", kind.Options())
        elif not isinstance(self.options, kind.Options):
            raise ValueError(f"the options of judge {self.name!r} are a {kind.Options.__name__}, "
                             f"not a {type(self.options).__name__}")

    @property
    def kind(self) -> Any:
        """The registered ``harness.judges.kind.JudgeKind``; None for "none"."""
        return None if self.name == NONE else JUDGES.get(self.name)

    @property
    def needs_policy(self) -> bool:
        """The judge is the policy being trained (build_judge needs policy=(model, tokenizer))."""
        return self.kind is not None and self.kind.needs_policy

    @property
    def loads_model(self) -> bool:
        """The judge loads a model of its own on this machine (the policy is unloaded first)."""
        return self.kind is not None and self.kind.loads_model

    @classmethod
    def of(cls, name: str, **values: Any) -> JudgeSection:
        """A section from keyword values, shared and kind-specific mixed (for code and tests):
        ``JudgeSection.of("openai", model="m", base_url=..., batch_size=4)``."""
        shared = {k: values.pop(k) for k in _SHARED if k in values}
        options = JUDGES.get(name).Options(**values) if name != NONE else None
        if name == NONE and values:
            raise TypeError(f"judge 'none' takes no options, got {sorted(values)}")
        return cls(name=name, options=options, **shared)

    @classmethod
    def from_table(cls, data: dict, path: str, errors: list[FieldError]) -> JudgeSection | None:
        """Parse [<path>] and its kind's table [<path>.<name>] (the ``harness.config.schema`` hook);
        the kind's own checks run on its options. Options written in [<path>] itself (the
        flat spelling of older files) are errors naming the table they belong in."""
        n_errors = len(errors)
        name = data.get("name", NONE)
        kind = None
        if isinstance(name, str) and name != NONE:
            kind = JUDGES.get_or_error(name, f"{path}.name", errors)
        unknown = isinstance(name, str) and name != NONE and kind is None  # reported; parsed as "none"
        flat = {k: v for k, v in data.items() if k in _SHARED and not (k == "name" and unknown)}
        for key, value in data.items():
            if key in _SHARED:
                continue
            if key in JUDGES:
                if not isinstance(value, dict):
                    errors.append(FieldError(f"{path}.{key}", f"expected a table ([{path}.{key}]), got "
                                                              f"{type(value).__name__} {value!r}"))
                elif key != name:
                    errors.append(FieldError(f"{path}.{key}", f"options of another judge; {path}.name is {name!r}"))
                continue
            errors.append(_misplaced(key, path, name if isinstance(name, str) else NONE, kind))
        section = parse_fields(cls, flat, path, errors)
        if kind is None or section is None:
            return section
        where = f"{path}.{name}"
        table = data.get(name, {})
        options = parse_fields(kind.Options, table, where, errors) if isinstance(table, dict) else None
        if options is None:
            return None
        if len(errors) == n_errors:  # the kind's rules, once its table and [<path>] parse
            errors.extend(kind.check(options, where))
        return dataclasses.replace(section, options=options)

    def table_key(self, field: str) -> str:
        """The key a field has in the TOML table: the options sit under the kind's name."""
        return self.name if field == "options" else field

    def to_table(self) -> dict:
        """The section as its TOML tables spell it (the inverse of ``from_table``)."""
        out = {k: getattr(self, k) for k in _SHARED}
        if self.name != NONE:  # (not reading options: a recording view would note a read of nothing)
            out[self.name] = to_dict(self.options)
        return out


_SHARED = tuple(f.name for f in fields(JudgeSection) if f.name != "options")


def _misplaced(key: str, path: str, name: str, kind: Any) -> FieldError:
    """The error for a key of [<path>] that is not a shared field or a kind's table."""
    if kind is not None and key in _option_names(kind):
        return FieldError(f"{path}.{key}", f"an option of the {name!r} judge: set it as [{path}.{name}].{key}, "
                                           "in the judge's own table")
    owners = [k for k in JUDGES.names() if key in _option_names(JUDGES.get(k))]
    if owners:
        return FieldError(f"{path}.{key}", (
            f"an option of the {', '.join(map(repr, owners))} judge{'s' if len(owners) > 1 else ''} "
            f"([{path}.<kind>].{key}), and {path}.name is {name!r}"))
    return unknown_key_error(key, [*_SHARED, *JUDGES.names()], f"{path}.{key}")


def _option_names(kind: Any) -> set[str]:
    return {f.name for f in fields(kind.Options)}
