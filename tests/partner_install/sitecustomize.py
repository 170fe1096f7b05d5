"""The partner's install inside the full one: with this folder first on PYTHONPATH, Python finds nothing in
site-packages that requirements-client.txt's distributions did not install, as in `make client`'s .venv-client
(its child processes too). tests/test_architecture.py runs the client path so, without making a venv."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

LOCK = Path(__file__).parents[2] / "requirements-client.txt"


def pins(path: Path) -> dict[str, str]:
    """A requirements file's versions by normalised distribution name; a line that pins no exact version is refused."""
    found = {}
    for line in path.read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            pin = re.fullmatch(r"([A-Za-z0-9._-]+)==([0-9][0-9A-Za-z.]*)", requirement)
            if pin is None:
                raise ValueError(f"{path.name}: {line!r} is not NAME==VERSION")
            found[normalised(pin[1])] = pin[2]
    return found


def normalised(name: str) -> str:
    """A distribution's name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


class LockedPathFinder(importlib.machinery.PathFinder):
    """Python's path finder, blind to the files of site-packages that no distribution of the lock installed."""

    site = tuple({os.path.join(sysconfig.get_paths()[key], "") for key in ("purelib", "platlib")})
    names: frozenset[str] = frozenset()  # the lock's distributions and fedfhe, set by lock()
    files: frozenset[str] = frozenset()  # theirs

    @classmethod
    def find_spec(
        cls, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        entries = list(sys.path if path is None else path)
        while (spec := super().find_spec(fullname, entries, target)) is not None and spec.origin is not None:
            origin = os.path.normpath(spec.origin)
            if not origin.startswith(cls.site) or origin in cls.files:
                break
            later = [e for e in entries if not origin.startswith(os.path.join(os.path.normpath(e), ""))]
            if later == entries:
                return None
            entries = later  # as if it were missing: on along the path (setuptools' vendored packaging)
        return spec

    @classmethod
    def find_distributions(cls, *args: Any, **kwargs: Any) -> Iterable[importlib.metadata.Distribution]:
        return (d for d in super().find_distributions(*args, **kwargs) if normalised(d.metadata["Name"]) in cls.names)


def lock() -> None:
    """Put the locked finder in the place of Python's path finder."""
    LockedPathFinder.names = frozenset(pins(LOCK).keys() | {"fedfhe"})
    LockedPathFinder.files = frozenset(
        os.path.normpath(d.locate_file(f))
        for d in importlib.metadata.distributions()
        if normalised(d.metadata["Name"]) in LockedPathFinder.names
        for f in d.files or ()
    )
    sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = LockedPathFinder


if __name__ == "sitecustomize":  # Python's start-up hook, not a test importing pins()
    lock()
