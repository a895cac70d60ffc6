"""The methods. Importing this package registers spin, self_rewarding and dno in
``METHODS`` (each module registers its strategy object)."""

from harness.methods import dno, self_rewarding, spin  # noqa: F401
from harness.config.registry import METHODS

__all__ = ["METHODS"]
