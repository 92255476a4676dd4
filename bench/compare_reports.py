"""Compare two report.json files leaf by leaf: is every numeric leaf of the first identical in the second?

Used to check that a change which should not move any number (a refactor) did not:

    python3 bench/compare_reports.py BEFORE/report/report.json AFTER/report/report.json

Prints the counts of numeric leaves (ints and floats, not booleans) before and after, how many are identical, and
every leaf that differs or exists on one side only; then the non-numeric leaves that differ (timestamps and paths
are expected there). Exits 1 when a numeric leaf present on both sides differs, other than a wall-clock timing
(a leaf named `seconds`, which no rerun reproduces).
"""

from __future__ import annotations

import json
import sys


def leaves(value, path: str = ""):
    """(path, value) of every leaf of a JSON document, paths like `targets.cnn.risk.leak.vs_prior.ci[0]`."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def main(before_path: str, after_path: str) -> int:
    before, after = (dict(leaves(json.load(open(path)))) for path in (before_path, after_path))
    numbers_before = {p: v for p, v in before.items() if numeric(v)}
    numbers_after = {p: v for p, v in after.items() if numeric(v)}
    both = set(numbers_before) & set(numbers_after)
    differ = sorted(p for p in both if numbers_before[p] != numbers_after[p])
    print(f"numeric leaves: before {len(numbers_before)}, after {len(numbers_after)}, "
          f"identical {len(both) - len(differ)}, different {len(differ)}")
    for label, paths in (("only before", sorted(set(numbers_before) - both)),
                         ("only after", sorted(set(numbers_after) - both)), ("different", differ)):
        print(f"{label} ({len(paths)}):", *paths[:50], sep="\n  ")
    other = sorted(p for p in set(before) & set(after) if not numeric(before[p]) and before[p] != after[p])
    print(f"non-numeric leaves that differ ({len(other)}):", *other[:20], sep="\n  ")
    return 1 if any(not p.endswith(".seconds") for p in differ) else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
