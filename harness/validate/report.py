"""The report ``harness validate`` collects (errors, warnings, requirements this machine
lacks) and how a check says that a reference needs the hub while it is off (``hub_off``) or
that a hub file is missing from the local cache (``hub_file_missing``).
Shared by ``harness.validate.experiment`` and ``harness.validate.model``; checks nothing itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from harness.config.schema import FieldError


@dataclass
class Report:
    errors: list[FieldError] = field(default_factory=list)
    warnings: list[FieldError] = field(default_factory=list)
    unmet: set[str] = field(default_factory=set)   # declared requirements this machine lacks

    def environment(self, cfg, need: str, error: FieldError) -> None:
        """A problem of this machine: an error, unless the experiment declares that it
        needs ``need`` (then it is an unmet requirement, reported as not checked)."""
        if need in cfg.experiment.requires:
            self.unmet.add(need)
        else:
            self.errors.append(error)


# (why the reference needs the hub, what to do instead) for hub_off
HUB_MODEL = ("is a hub id with no cached copy",
              "set HARNESS_ONLINE=1 on a machine with network access, use a local directory")


def hub_off(cfg, r: Report, where: str, ref: str, why: str, instead: str) -> None:
    """A reference that needs the hub ("'<ref>' <why>") while the hub is off (HARNESS_ONLINE is
    not 1): an error saying what to do ``instead``, or an unmet "hub" requirement when the
    experiment declares one. Nothing while the hub is on."""
    if os.environ.get("HARNESS_ONLINE") != "1":
        r.environment(cfg, "hub", FieldError(where, (
            f"{ref!r} {why}, and the hub is off (HARNESS_ONLINE is not 1); {instead}, "
            "or declare experiment.requires = [\"hub\"]")))


def hub_file_missing(cfg, r: Report, where: str, problem: str) -> None:
    """A hub file that is not in the local cache while the hub is off (``problem`` names repo,
    file and revision): an error, or, when the experiment declares "hub", an unmet requirement
    and a warning that names the file all the same."""
    if "hub" in cfg.experiment.requires:
        r.unmet.add("hub")
        r.warnings.append(FieldError(where, f"not checked: {problem}"))
    else:
        r.errors.append(FieldError(where, (
            f"{problem}; put it in that cache (a download with the hub on: HARNESS_ONLINE=1), "
            "or declare experiment.requires = [\"hub\"]")))


def hub_ok(repo: str, revision: str, filename: str = "config.json") -> bool:
    """Whether hub model ``repo``'s ``filename`` can be read: the hub is on, or it is in the local cache."""
    if os.environ.get("HARNESS_ONLINE") == "1":
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename, revision=revision), str)
