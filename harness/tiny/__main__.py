"""``python -m harness.tiny build [--seed N]``: build (or find) the tiny world."""

from __future__ import annotations

import argparse
import json

from harness.tiny.build import ensure_tiny


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.tiny", description=__doc__)
    ap.add_argument("command", choices=["build"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = ensure_tiny(args.seed)
    record = json.loads((path / "build.json").read_text())
    print(path)
    print(f"warm-up exact match: {record['exact_match']:.3f} {record['exact_match_per_task']}")
    print(f"habitual answers: {record['habit_rate']:.3f} {record['habit_rate_per_task']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
