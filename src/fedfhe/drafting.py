"""A draft schema from every owner's file, as a careful analyst would write it, each decision said in one line.

Ranges and categories are taken over all the files. What a draft cannot decide for the owners is flagged, never
guessed: identifiers, dates and free text are left out (`--keep` keeps one); spellings that differ only by case or
surrounding spaces are mapped onto the most frequent one; categories found in some files only, odd cells in a
number column and missing cells are named with what to write in the schema. Missing cells stay refused until the
schema says how to fill them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfhe.data import as_text
from fedfhe.errors import FedfheError
from fedfhe.problem import shared_range
from fedfhe.table import INDICATOR, Feature, Label, Schema, plain

MAX_CLASSES = 20  # a whole-number label with more distinct values is a regression target
MOSTLY = 0.9  # a column is numbers (or dates) when at least this share of its cells are
ID_SHARE, ID_MIN = 0.9, 20  # an identifier: at least this share of its cells distinct, and at least ID_MIN values
TEXT_DISTINCT, TEXT_LONG = 50, 100  # free text: over 50 values and over half its cells distinct, or a longer cell
FILL = f'until its entry says "missing": {{}} to fill them with, or "{INDICATOR}" (an extra 0/1 input marks them)'
UNLABELLED = "(a row needs its label): fill them in, or drop those rows"
SHOWN = 5  # values quoted in a line; the rest are counted
_MONTH = r"(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
DATE = re.compile(
    rf"(\d{{4}}[-/.]\d{{1,2}}[-/.]\d{{1,2}}|\d{{1,2}}[-/.]\d{{1,2}}[-/.]\d{{2,4}}"  # 2026-05-29, 29.05.2026, 5/29/26
    rf"|\d{{1,2}}[- ]?{_MONTH}[- ,]*\d{{2,4}}|{_MONTH} \d{{1,2}},? \d{{4}})"  # 29-May-2026, May 29, 2026
    r"([ T]\d{1,2}:\d{2}(:\d{2}([.,]\d+)?)?\s*([ap]m)?\s*(z|[+-]\d{2}:?\d{2})?)?",  # a time of day, a zone
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Note:
    """One line of the draft's account: a decision taken, or (`warning`) one the owners must check or take."""

    text: str
    warning: bool = False


@dataclass(frozen=True)
class Draft:
    """A draft schema, and how each of its columns was decided."""

    schema: Schema
    notes: tuple[Note, ...]


def infer(frames: dict[str, Any], label: str, ignore: tuple[str, ...] = (), keep: tuple[str, ...] = ()) -> Draft:
    """A draft schema from the owners' tables (by file name): ranges rounded outward to 2 significant digits
    over every file, text as categories (their union), identifiers, dates and free text ignored; of two classes
    the rarer (the first on a tie) is proposed as the positive one, the event to find."""
    sources, notes = ", ".join(frames), []
    for source, frame in frames.items():
        if label not in frame.columns:
            raise FedfheError(f"{source}: no column {label!r} to use as the label")
        read = f", read with {frame.attrs['read_as']}" if "read_as" in frame.attrs else ""
        notes.append(Note(f"{source}: {len(frame)} rows{read}"))
    columns = list(dict.fromkeys(str(c) for frame in frames.values() for c in frame.columns))
    for option, names in (("ignore", ignore), ("keep", keep)):
        if label in names:
            raise FedfheError(f"{sources}: {label!r} is the label; it cannot be given to --{option} too")
        if unknown := [c for c in names if c not in columns]:
            raise FedfheError(f"{sources}: no column {unknown[0]!r} to {option}")
    if both := sorted(set(ignore) & set(keep)):
        raise FedfheError(f"{both[0]!r} is given to both --ignore and --keep")
    features, ignored = [], list(dict.fromkeys(ignore))
    for name in columns:
        cells = {source: frame[name] for source, frame in frames.items() if name in frame.columns}
        if lacking := [source for source in frames if source not in cells]:
            warning = f"{name}: not in {', '.join(lacking)}: owners' files need the same columns, beyond ignored ones"
            notes.append(Note(warning, True))
        if name == label:
            continue
        if name in ignore:
            notes.append(Note(f"{name}: ignored (--ignore)"))
            continue
        feature = _feature(name, cells, name in keep, notes)
        if feature is None:
            ignored.append(name)
            continue
        features.append(feature)
        notes.extend(_missing(name, cells, FILL.format("one of its categories" if feature.categories else "a number")))
    if not features:
        raise FedfheError(f"{sources}: no column left to use as a feature (every column but the label is ignored)")
    target = _label(label, {source: frame[label] for source, frame in frames.items()}, notes)
    return Draft(Schema(tuple(features), target, tuple(ignored)), tuple(notes))


def _feature(name: str, cells: dict[str, Any], keep: bool, notes: list[Note]) -> Feature | None:
    """A column as a number or categories, or None (and why) for a column to ignore."""
    present = {source: column.dropna() for source, column in cells.items()}
    total = sum(len(column) for column in present.values())
    if not total:
        notes.append(Note(f"{name}: ignored: no values in any file", True))
        return None
    numbers = {source: _numbers(column) for source, column in present.items()}
    if sum(map(len, numbers.values())) >= MOSTLY * total:
        values = np.concatenate([column.to_numpy(dtype=np.float64) for column in numbers.values()])
        low, high = (float(v[0]) for v in shared_range(values[:, None]))
        notes.append(Note(f"{name}: a number in [{low:g}, {high:g}]"))
        odd = {source: present[source].drop(column.index).map(as_text) for source, column in numbers.items()}
        if count := sum(map(len, odd.values())):
            where = ", ".join(f"{len(column)} in {source}" for source, column in odd.items() if len(column))
            shown = _quoted(sorted(set().union(*map(set, odd.values()))))
            notes.append(
                Note(
                    f"{name}: {count} cell(s) are not numbers ({where}): {shown}; they are refused until fixed, "
                    'or added to "missing_values" if they mean "no value"',
                    True,
                )
            )
        return Feature(name, low, high)
    texts = {source: column.map(as_text) for source, column in present.items()}
    if not keep and (why := _ignorable(np.concatenate([column.to_numpy(dtype=str) for column in texts.values()]))):
        notes.append(Note(f"{name}: ignored: {why}; --keep {name} to keep it", True))
        return None
    categories, aliases, flags = _spellings(name, "categories", texts)
    notes.append(Note(f"{name}: {len(categories)} categories: {_quoted(categories)}"))
    notes.extend(flags)
    return Feature(name, categories=tuple(categories), aliases=aliases)


def _label(name: str, cells: dict[str, Any], notes: list[Note]) -> Label:
    """The label: classes (text, or few whole numbers), else a regression target's range."""
    import pandas as pd

    present = {source: column.dropna() for source, column in cells.items()}
    values = pd.concat(list(present.values()))
    if values.empty:
        raise FedfheError(f"{', '.join(cells)}: the label {name!r} has no values")
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if numeric and not (bool((values % 1 == 0).all()) and values.nunique() <= MAX_CLASSES):
        low, high = (float(v[0]) for v in shared_range(values.to_numpy(dtype=np.float64)[:, None]))
        notes.append(Note(f"{name}: the label, a number in [{low:g}, {high:g}] (a regression target)"))
        notes.extend(_missing(name, cells, UNLABELLED))
        return Label(name, low=low, high=high)
    texts = {source: column.map(as_text) for source, column in present.items()}
    names, aliases, flags = _spellings(name, "classes", texts)
    classes = [plain(c) for c in sorted(values.unique().tolist(), key=str)] if numeric else names
    notes.append(Note(f"{name}: the label, {len(classes)} classes: {_quoted(list(map(as_text, classes)))}"))
    notes.extend([*flags, *_missing(name, cells, UNLABELLED)])
    if len(classes) != 2:
        return Label(name, classes=tuple(classes), aliases=aliases)
    counts = Counter(aliases.get(t, t) for column in texts.values() for t in column)
    rarer = min(classes, key=lambda c: counts[as_text(c)])
    notes.append(
        Note(
            f"positive class proposed: {as_text(rarer)!r}, the rarer of the two in {', '.join(cells)} "
            '(sensitivity, PPV and AUC will be about it): change "positive" if the class to find is the other'
        )
    )
    return Label(name, classes=tuple(classes), positive=rarer, aliases=aliases)


def _spellings(name: str, word: str, texts: dict[str, Any]) -> tuple[list[str], dict[str, str], list[Note]]:
    """A text column's values (each spelling that differs only by case or surrounding spaces mapped onto the most
    frequent one), those aliases, and the flags: aliases proposed, values found in some files only."""
    counts = Counter(t for column in texts.values() for t in column)
    spellings: dict[str, list[str]] = {}
    for text in sorted(counts):
        spellings.setdefault(text.strip().casefold(), []).append(text)
    aliases = {}
    for group in spellings.values():
        chosen = min(group, key=lambda t: -counts[t])  # the most frequent; the first in sorted order on a tie
        aliases.update({t: chosen for t in group if t != chosen})
    values = sorted(set(counts) - set(aliases))
    flags = []
    if aliases:
        onto = [
            f"{_quoted([a for a in aliases if aliases[a] == v])} onto {v!r}" for v in values if v in aliases.values()
        ]
        flags.append(
            Note(f'{name}: "aliases" map {" and ".join(onto)} (they differ only by case or spaces around)', True)
        )
    found = {source: {aliases.get(t, t) for t in set(column)} for source, column in texts.items()}
    partial: dict[tuple[str, ...], list[str]] = {}
    for value in values:
        if len(where := tuple(source for source, held in found.items() if value in held)) < len(texts):
            partial.setdefault(where, []).append(value)
    if partial:
        only = "; ".join(f"{_quoted(v)} only in {', '.join(w)}" for w, v in sorted(partial.items(), key=_fewest))
        advice = f'if some mean the same, keep one under "{word}" and map the others onto it with "aliases"'
        flags.append(Note(f"{name}: {only}: {advice}", True))
    return values, aliases, flags


def _missing(name: str, cells: dict[str, Any], advice: str) -> list[Note]:
    """A line for a column with missing cells: the count per file, and what to do about them."""
    counts = {source: int(column.isna().sum()) for source, column in cells.items()}
    if not sum(counts.values()):
        return []
    where = ", ".join(f"{n} in {source}" for source, n in counts.items())
    return [Note(f"{name}: missing cells ({where}) are refused {advice}", True)]


def _ignorable(texts: np.ndarray) -> str | None:
    """Why a text column is no feature: dates, an identifier, free text; None for categories."""
    dates = [t for t in texts if DATE.fullmatch(t.strip())]
    if len(dates) >= MOSTLY * len(texts):
        return f"dates (e.g. {dates[0]!r}; a number derived from them, such as days since an event, may do)"
    distinct, longest = len(set(texts)), max(map(len, texts))
    free = f"free text ({distinct} distinct values in {len(texts)} cells, up to {longest} characters)"
    if longest > TEXT_LONG:
        return free
    if distinct >= ID_MIN and distinct >= ID_SHARE * len(texts):
        return f"an identifier ({distinct} distinct values in {len(texts)} cells)"
    if distinct > TEXT_DISTINCT and distinct > len(texts) / 2:
        return free
    return None


def _numbers(column: Any) -> Any:
    """A column's finite number cells (booleans are not numbers; a text column's odd cells are not either)."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(column):
        return column[:0]
    if pd.api.types.is_numeric_dtype(column):
        return column[np.isfinite(column.to_numpy(dtype=np.float64))]
    number = [isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v) for v in column]
    return column[np.array(number, dtype=bool)]


def _fewest(item: tuple[tuple[str, ...], list[str]]) -> tuple[int, list[str]]:
    """Values found in the fewest files first."""
    return len(item[0]), item[1]


def _quoted(values: list[str]) -> str:
    """Up to SHOWN values quoted, the rest counted."""
    shown = ", ".join(repr(v) for v in values[:SHOWN])
    return shown + (f" and {len(values) - SHOWN} more" if len(values) > SHOWN else "")
