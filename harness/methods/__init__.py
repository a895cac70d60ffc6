"""Methods register themselves by name on import (see harness.registry.METHODS)."""

from harness.methods import dno, self_rewarding, spin  # noqa: F401
