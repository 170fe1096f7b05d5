"""The one exception type users see: a bad input or file, said in one line."""

from __future__ import annotations

from collections.abc import Iterable


class FedfheError(ValueError):
    """A user-facing error; the CLI prints its message alone and exits non-zero."""


def unknown(what: str, value: object, choices: Iterable[str]) -> FedfheError:
    """A value that is none of the choices: the closest one suggested (a typo), every one listed."""
    import difflib

    options = list(choices)
    close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return FedfheError(f"unknown {what} {value!r}{hint}; choose one of: {', '.join(options)}")
