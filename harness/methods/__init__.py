"""The methods. Importing this package registers spin, self_rewarding and dno in
``METHODS`` (each module registers its strategy object): a method's options, what it
generates from, how its pairs are built and which iterate is final; ``base`` is the
protocol they implement. Not here: the loop and stages that call them (``harness.run``),
judging (``harness.judges``), training (``harness.train``)."""

from harness.methods import dno, self_rewarding, spin  # noqa: F401
from harness.config.registry import METHODS

__all__ = ["METHODS"]
