"""Test rows among the training rows, and repeated rows, found by a sha256 of each row as the model reads it.

A row's hash covers its encoded inputs and its label, not the file's bytes: a copy of the test file saved
in another format, dialect or column order is found all the same. Equal rows of different records (a
table of few, coarse columns) are found too: `--allow-overlap` trains anyway.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from fedfhe.errors import FedfheError

HASHES = ".hashes"  # a file of row hashes: one hex sha256 a line, sorted (`fedfhe schema hashes`)
_HEX = re.compile(r"[0-9a-f]{64}")


def row_hashes(X: np.ndarray, y: np.ndarray) -> list[str]:
    """One hex sha256 per row of encoded inputs and label, as float64 (-0.0 counted as 0.0)."""
    rows = np.column_stack([X, y]).astype("<f8") + 0.0
    return [hashlib.sha256(row.tobytes()).hexdigest() for row in rows]


def shared(rows: list[str], others: list[str]) -> int:
    """How many of `rows` have a copy among `others`."""
    present = set(others)
    return sum(h in present for h in rows)


def counts(training: list[str], test: list[str]) -> dict[str, int]:
    """What a run records: test rows also among the training rows, and rows repeating an earlier one of their side."""
    return {
        "training_rows": len(training),
        "test_rows": len(test),
        "test_in_training": shared(test, training),
        "training_duplicates": len(training) - len(set(training)),
        "test_duplicates": len(test) - len(set(test)),
    }


def describe(found: dict[str, int]) -> str:
    """The counts in one clause."""
    return (
        f"{found['test_in_training']} of the {found['test_rows']} test rows are also training rows; "
        f"{found['training_duplicates']} of the {found['training_rows']} training rows and "
        f"{found['test_duplicates']} of the test rows repeat an earlier one"
    )


def parse(text: str, source: str) -> dict[str, int]:
    """Counts as JSON (a run config carries them to the ServerApp), checked."""
    keys = counts([], [])
    try:
        found = json.loads(text)
    except ValueError:
        found = None
    if not isinstance(found, dict) or set(found) != set(keys) or not all(type(v) is int for v in found.values()):
        raise FedfheError(f"{source}: not row-hash counts (a JSON object of {', '.join(keys)})")
    return found


def check_owners(owners: dict[str, list[str]], test: str, test_rows: list[str], allow: bool) -> dict[str, int]:
    """The counts of the owners' files (their rows' hashes by file) against the test file's; an overlap is refused
    unless `allow`: a model tested on rows it trained on looks better than it is."""
    found = counts([h for rows in owners.values() for h in rows], test_rows)
    if found["test_in_training"] and not allow:
        files = ", ".join(f"{Path(name).name} {n}" for name, rows in owners.items() if (n := shared(rows, test_rows)))
        raise FedfheError(
            f"{test}: {found['test_in_training']} of its {found['test_rows']} rows are also in the owners' files "
            f"(rows equal to a test row: {files}); testing on training rows overstates every figure: take them out, "
            "or train with --allow-overlap if they are other records with equal values"
        )
    return found


def read(path: str | Path) -> list[str]:
    """A file of row hashes as `fedfhe schema hashes` writes it; a bad line is one error naming it."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FedfheError(f"{path}: cannot read ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not _HEX.fullmatch(line):
            raise FedfheError(f"{path}, line {number}: not a row hash (64 lowercase hex digits)")
    return lines


def write(path: str | Path, rows: list[str]) -> None:
    """Row hashes, sorted (the rows' order is not given away), one a line."""
    Path(path).write_text("".join(f"{h}\n" for h in sorted(rows)))
