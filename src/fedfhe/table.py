"""A data owner's own table and its schema: named columns, declared ranges, text categories and labels.

The schema (JSON) is what every party agrees on before training: each feature's range (the FHE circuit
is compiled for it) or its categories (one-hot encoded on the owner's side, before training and before
encryption), the label's classes or range, and the columns to ignore. Columns are matched by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedfhe import leakage
from fedfhe.data import Dataset, assemble, check_size, pyarrow_parquet, split_dataset
from fedfhe.data import as_text as _as_text
from fedfhe.errors import FedfheError
from fedfhe.reading import Dialect, read_csv, read_excel, repeated, typed

FORMATS = (".csv", ".xlsx", ".parquet", ".npz")
# The model file keeps the schema, its one-hot column names and class names in its JSON header (model.MAX_HEADER):
# a schema is refused when they would not fit, before any training.
MAX_NAME = 1_000  # characters of a column name, a category or a class
MAX_SCHEMA_BYTES = 960 << 10  # the schema's share of the header; the rest (training facts) takes a few KiB
INDICATOR = "indicator"  # a feature's "missing": an extra 0/1 input says the cell was missing
LISTED = 20  # bad rows listed one by one; the rest are counted
OBSERVED_BYTES = 2 * len("-1.2345678901234567e-308, ")  # an input's observed (low, high) in JSON, at the longest


@dataclass(frozen=True)
class Feature:
    """One input column: a number in [low, high], or one of its categories (one-hot)."""

    name: str
    low: float = 0.0
    high: float = 1.0
    categories: tuple[str, ...] = ()
    missing: Any = None  # the value a missing cell takes, or INDICATOR; None: missing cells are refused
    aliases: dict[str, str] = field(default_factory=dict)  # another owner's spelling -> one of the categories

    @property
    def encoded(self) -> list[str]:
        """The model's input columns for this feature (an indicator's after its value's)."""
        columns = [f"{self.name}={c}" for c in self.categories] if self.categories else [self.name]
        return columns + ([f"{self.name} (missing)"] if self.missing == INDICATOR else [])

    @property
    def ranges(self) -> list[tuple[float, float]]:
        """Each of its input columns' declared (low, high): [0, 1] for one-hot and indicator columns."""
        values = [(0.0, 1.0)] * len(self.categories) if self.categories else [(self.low, self.high)]
        return values + ([(0.0, 1.0)] if self.missing == INDICATOR else [])


@dataclass(frozen=True)
class Label:
    """The column to predict: one of its classes, or a number in [low, high]; `positive` names the class
    sensitivity, PPV and AUC are about (two classes)."""

    name: str
    classes: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 1.0
    positive: Any = None
    aliases: dict[str, str] = field(default_factory=dict)  # another owner's spelling -> one of the classes


@dataclass(frozen=True)
class Schema:
    """Features in model order, the label, the columns to ignore."""

    features: tuple[Feature, ...]
    label: Label
    ignore: tuple[str, ...] = ()
    description: str = ""
    source: str = field(default="schema", compare=False)  # the file, for messages
    dialect: Dialect = field(default_factory=Dialect)  # how its files are read: "format" and "missing_values"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Schema:
        """Read and check a schema file; every problem is one line naming the file."""
        path = Path(path)
        if not path.is_file():
            raise FedfheError(f"{path}: file not found")
        return cls.from_json(path.read_bytes(), str(path))

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "schema") -> Schema:
        """A schema from its JSON text (a file, a run config, a client spec), checked."""
        try:
            raw = json.loads(text)
        except ValueError as exc:  # bad JSON or UTF-8, an integer of over 4,300 digits
            raise FedfheError(f"{source}: not valid JSON ({exc})".replace("\n", " ")) from None
        except RecursionError:
            raise FedfheError(f"{source}: not a schema (JSON nested too deep to read)") from None
        return cls.from_dict(raw, source)

    @classmethod
    def from_dict(cls, raw: Any, source: str = "schema") -> Schema:
        """A schema from its JSON form, checked."""

        def fail(message: str) -> FedfheError:
            return FedfheError(f"{source}: {message}")

        if not isinstance(raw, dict):
            raise fail("must be a JSON object with features and label")
        if not isinstance(raw.get("label"), dict) or not isinstance(raw["label"].get("name"), str):
            raise fail('needs "label": {"name": COLUMN, "classes": [...]} or {"name": COLUMN, "low": L, "high": H}')
        if not isinstance(raw.get("features"), list) or not raw["features"]:
            raise fail('needs "features": a list of {"name", "low", "high"} or {"name", "categories"}')
        features = tuple(_feature(f, i, fail) for i, f in enumerate(raw["features"]))
        label = _label(raw["label"], fail)
        ignore = raw.get("ignore", [])
        if not isinstance(ignore, list) or not all(isinstance(c, str) for c in ignore):
            raise fail('"ignore" must be a list of column names')
        _check_text(ignore, "a column to ignore", fail)
        names = [f.name for f in features] + [label.name] + ignore
        if duplicated := repeated(names):
            raise fail(f"column {duplicated[0]!r} is named more than once")
        dialect = Dialect.from_dict(raw.get("format"), raw.get("missing_values"), fail)
        schema = cls(features, label, tuple(ignore), str(raw.get("description", "")), source, dialect)
        if (size := schema.stored_bytes) > MAX_SCHEMA_BYTES:
            raise fail(
                f"its names, categories, classes and observed ranges take {size:,} bytes in a model file, "
                f"more than the {MAX_SCHEMA_BYTES:,} it keeps (use fewer or shorter ones)"
            )
        return schema

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what `schema infer` writes)."""
        features: list[dict[str, Any]] = [
            {"name": f.name, "categories": list(f.categories)}
            if f.categories
            else {"name": f.name, "low": f.low, "high": f.high}
            for f in self.features
        ]
        for entry, f in zip(features, self.features):
            if f.missing is not None:
                entry["missing"] = f.missing
            if f.aliases:
                entry["aliases"] = f.aliases
        label: dict[str, Any] = {"name": self.label.name}
        label.update(
            {"classes": list(self.label.classes)}
            if self.label.classes
            else {"low": self.label.low, "high": self.label.high}
        )
        if self.label.positive is not None:
            label["positive"] = self.label.positive
        if self.label.aliases:
            label["aliases"] = self.label.aliases
        out: dict[str, Any] = {"features": features, "label": label}
        if self.ignore:
            out["ignore"] = list(self.ignore)
        if self.dialect.to_dict():
            out["format"] = self.dialect.to_dict()
        if self.dialect.missing != Dialect().missing:
            out["missing_values"] = list(self.dialect.missing)
        if self.description:
            out["description"] = self.description
        return out

    @property
    def encoded_names(self) -> list[str]:
        """The model's input columns, one-hot categories expanded, in schema order."""
        return [name for f in self.features for name in f.encoded]

    @property
    def number_inputs(self) -> dict[str, int]:
        """Each number feature's position among the model's inputs (categories, one-hot, have none)."""
        positions, start = {}, 0
        for f in self.features:
            if not f.categories:
                positions[f.name] = start
            start += len(f.encoded)
        return positions

    @property
    def stored_bytes(self) -> int:
        """The bytes the model file's header spends on this schema: itself, its inputs' and classes' names, and at
        most OBSERVED_BYTES for each input's observed range."""
        names = len(json.dumps([self.to_dict(), self.encoded_names, self.class_names]))  # escaped as model.save does
        return names + OBSERVED_BYTES * len(self.encoded_names)

    @property
    def target_range(self) -> tuple[float, float] | None:
        """A regressor's label range (training scales targets with it); None for classes."""
        return None if self.label.classes else (self.label.low, self.label.high)

    @property
    def class_names(self) -> list[str]:
        """The label's classes as text, in schema order (none for a regressor)."""
        return [_as_text(c) for c in self.label.classes]

    @property
    def positive_name(self) -> str | None:
        """The positive class as text, if the schema names one."""
        return None if self.label.positive is None else _as_text(self.label.positive)

    def check_positive(self) -> None:
        """Refuse two classes without a positive one: it is never chosen by position."""
        if len(self.label.classes) == 2 and self.label.positive is None:
            choices = " or ".join(json.dumps(c) for c in self.label.classes)
            raise FedfheError(
                f'{self.source}: two classes and none named positive: add "positive": {choices} to its label (the '
                "class sensitivity, PPV and AUC are about; `fedfhe schema infer` proposes one), or give --positive-class"
            )

    def with_positive(self, value: str | None) -> Schema:
        """The schema with `value` (a class as text: --positive-class) as its positive class; unchanged for None."""
        if value is None:
            return self
        if len(self.label.classes) != 2:
            raise FedfheError(f"--positive-class applies to two classes; {self.source} has {len(self.label.classes)}")
        if value not in self.class_names:
            raise FedfheError(
                f"--positive-class {value!r} is not a class; the classes are: {', '.join(self.class_names)}"
            )
        positive = self.label.classes[self.class_names.index(value)]
        return dataclasses.replace(self, label=dataclasses.replace(self.label, positive=positive))

    @property
    def input_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Per encoded column: the declared range, [0, 1] for a one-hot column."""
        pairs = [pair for f in self.features for pair in f.ranges]
        return np.array([low for low, _ in pairs]), np.array([high for _, high in pairs])

    def encode(
        self, frame: Any, source: str, labelled: bool = True, pinned: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Check a table against the schema and encode it: features (one-hot expanded) and, if labelled, labels.

        Every bad row is refused at once (InvalidRows lists them); see `rows` for what else it checks.
        """
        rows = self.rows(frame, source, labelled, pinned)
        rows.refuse()
        return rows.X, rows.y

    def rows(self, frame: Any, source: str, labelled: bool = True, pinned: bool = False) -> Rows:
        """A table's rows checked against the schema and encoded, bad ones listed rather than raised.

        Columns are matched by name; the label column is required when `labelled`, else ignored if present.
        A column the schema does not know is refused (with advice for a schema `pinned` in a model: drop it).
        Rows are numbered from 1, the first data row.
        """
        columns = [str(c) for c in frame.columns]
        if duplicated := repeated(columns):
            raise FedfheError(f"{source}: column {duplicated[0]!r} appears more than once")
        known = {f.name for f in self.features} | {self.label.name} | set(self.ignore)
        if unknown := [c for c in columns if c not in known]:
            advice = (
                "the model's schema is fixed: drop the column from the file"
                if pinned
                else 'list it under "ignore" to leave it out'
            )
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise FedfheError(f"{source}: column {unknown[0]!r}{more} is not in the schema ({advice})")
        wanted = [f.name for f in self.features] + ([self.label.name] if labelled else [])
        present = set(columns)
        if missing := [c for c in wanted if c not in present]:
            raise FedfheError(f"{source}: no column {missing[0]!r}, which the schema declares")
        if len(frame) == 0:
            raise FedfheError(f"{source}: no rows")
        problems: list[Problem] = []
        blocks, filled = [], []
        for feature in self.features:
            block, absent = _encode_feature(feature, frame[feature.name], problems)
            blocks.append(block)
            filled.append(absent if feature.missing is not None else np.zeros(len(frame), dtype=bool))
        X = np.column_stack(blocks).astype(np.float64)
        y = _encode_label(self.label, frame[self.label.name], problems) if labelled else None
        problems.sort(key=lambda p: p.row)
        return Rows(source, X, y, np.column_stack(filled), tuple(problems), frame.index)


@dataclass(frozen=True)
class Problem:
    """One refused cell: its 1-based data row, column, value and why."""

    row: int
    column: str
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}, column {self.column!r}: {self.reason}"


class InvalidRows(FedfheError):
    """Rows a table cannot be used with; `lines` lists them (up to LISTED, then a count), the message sums up."""

    def __init__(self, source: str, problems: tuple[Problem, ...], n_rows: int) -> None:
        bad = len({p.row for p in problems})
        listed = [f"{source}, {p}" for p in problems[:LISTED]] if len(problems) > 1 else []
        if len(problems) > LISTED:
            listed.append(f"{source}: {len(problems) - LISTED} more problem(s) not listed")
        self.lines, self.problems = listed, problems
        first = problems[0]
        super().__init__(
            f"{source}: {bad} of {n_rows} row(s) refused; first {first}"
            + (" (every problem listed above)" if len(problems) > 1 else "")
        )


@dataclass(frozen=True)
class Rows:
    """A table's rows encoded by a schema; rows named in `problems` hold placeholder values."""

    source: str
    X: np.ndarray
    y: np.ndarray | None
    filled: np.ndarray  # (rows, features): the cells filled as the schema declares
    problems: tuple[Problem, ...]
    index: Any  # the frame's index, row by row

    @property
    def valid(self) -> np.ndarray:
        """Rows without a problem."""
        bad = np.zeros(len(self.X), dtype=bool)
        bad[[p.row - 1 for p in self.problems]] = True
        return ~bad

    def refuse(self) -> None:
        """Raise InvalidRows when any row has a problem."""
        if self.problems:
            raise InvalidRows(self.source, self.problems, len(self.X))

    def filled_counts(self, schema: Schema) -> dict[str, int]:
        """Cells filled per feature (only features that had any)."""
        counts = self.filled.sum(axis=0)
        return {f.name: int(n) for f, n in zip(schema.features, counts) if n}


def missing_rules(schema: dict[str, Any]) -> list[str]:
    """What a missing cell of each feature becomes (a schema's JSON form), for the report and the card."""
    rules = []
    for f in Schema.from_dict(schema).features:
        if f.missing == INDICATOR:
            value = "no category" if f.categories else f"{f.low:g} (its declared low)"
            rules.append(f"{f.name}: the extra input '{f.name} (missing)' is 1 and the value {value}")
        elif f.missing is not None:
            rules.append(f"{f.name}: filled with {f.missing!r}")
    return rules


def filled_line(filled: dict[str, dict[str, int]]) -> str:
    """Cells filled per file and feature, in one line ("none" when no file had any)."""
    parts = [
        f"{file}: " + ", ".join(f"{name} {n:,}" for name, n in counts.items())
        for file, counts in filled.items()
        if counts
    ]
    return "; ".join(parts) or "none"


def _check_text(values: Any, what: str, fail: Any) -> None:
    """Refuse a NUL character (NumPy's fixed-width text drops trailing NULs on save) or a name over MAX_NAME."""
    for text in map(_as_text, values):
        if "\x00" in text:
            raise fail(f"{what} contains a NUL character")
        if len(text) > MAX_NAME:
            raise fail(f"{what} has {len(text):,} characters, more than the {MAX_NAME:,} allowed")


def _feature(entry: Any, i: int, fail: Any) -> Feature:
    """One feature entry, checked: a name, and a finite low < high or a list of distinct categories."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise fail(f"feature {i} needs a name")
    name = entry["name"]
    _check_text([name], f"feature {i}'s name", fail)
    if "categories" in entry:
        categories = entry["categories"]
        if not isinstance(categories, list) or not categories or len(set(map(_as_text, categories))) != len(categories):
            raise fail(f"feature {name!r}: categories must be a non-empty list of distinct values")
        _check_text(categories, f"feature {name!r}: a category", fail)
        text = tuple(_as_text(c) for c in categories)
        missing = entry.get("missing")
        if missing is not None and missing != INDICATOR and _as_text(missing) not in text:
            raise fail(f'feature {name!r}: missing value {missing!r} must be one of its categories or "{INDICATOR}"')
        aliases = _aliases(entry, text, f"feature {name!r}", fail)
        return Feature(name, categories=text, missing=missing if missing in (None, INDICATOR) else _as_text(missing),
                       aliases=aliases)  # fmt: skip
    low, high = _bounds(entry, f"feature {name!r}", '"low" and "high" (finite numbers) or "categories"', fail)
    missing = entry.get("missing")
    number = isinstance(missing, (int, float)) and not isinstance(missing, bool)
    if missing not in (None, INDICATOR) and not (number and low <= missing <= high):
        raise fail(
            f'feature {name!r}: missing value {missing!r} must be a number within [{low}, {high}] or "{INDICATOR}"'
        )
    if "aliases" in entry:
        raise fail(f"feature {name!r}: aliases map text to categories; a number feature has none")
    return Feature(name, low, high, missing=missing)


def _aliases(entry: dict[str, Any], targets: tuple[str, ...], what: str, fail: Any) -> dict[str, str]:
    """An entry's {"spelling": "category or class"}: each maps onto one of `targets` and is not one itself."""
    aliases = entry.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) for k in aliases):
        raise fail(f'{what}: "aliases" must map texts to its values, e.g. {{"male": "M"}}')
    mapped = {k: _as_text(v) for k, v in aliases.items()}
    if wrong := [v for v in mapped.values() if v not in targets]:
        raise fail(f"{what}: alias target {wrong[0]!r} is not one of {list(targets)}")
    if clash := [k for k in mapped if k in targets]:
        raise fail(f"{what}: {clash[0]!r} is one of its values and cannot also be an alias")
    _check_text(mapped, f"{what}: an alias", fail)
    return mapped


def _label(entry: dict[str, Any], fail: Any) -> Label:
    """The label entry, checked: classes (text or numbers, distinct) or a finite low < high."""
    name = entry["name"]
    _check_text([name], "the label's name", fail)
    if "classes" in entry:
        classes = entry["classes"]
        if not isinstance(classes, list) or len(classes) < 2 or len(set(map(_as_text, classes))) != len(classes):
            raise fail(f"label {name!r}: classes must be a list of at least 2 distinct values")
        _check_text(classes, f"label {name!r}: a class", fail)
        positive = entry.get("positive")
        if positive is not None and (len(classes) != 2 or _as_text(positive) not in map(_as_text, classes)):
            raise fail(f"label {name!r}: positive {positive!r} must be one of its two classes {classes}")
        aliases = _aliases(entry, tuple(map(_as_text, classes)), f"label {name!r}", fail)
        return Label(name, classes=tuple(classes), positive=positive, aliases=aliases)
    low, high = _bounds(entry, f"label {name!r}", '"classes" or "low" and "high" (finite numbers)', fail)
    return Label(name, low=low, high=high)


def _bounds(entry: dict[str, Any], what: str, needs: str, fail: Any) -> tuple[float, float]:
    """An entry's finite low < high."""
    low, high = entry.get("low"), entry.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
        raise fail(f"{what} needs {needs}")
    assert isinstance(low, (int, float)) and isinstance(high, (int, float))  # checked just above
    if not low < high:
        raise fail(f"{what}: low {low} must be below high {high}")
    return float(low), float(high)


def _note(problems: list[Problem], column: Any, mask: np.ndarray, name: str, why: Any) -> None:
    """A problem for each row of `mask`; `why(value)` says what is wrong with its cell."""
    for i in np.flatnonzero(mask):
        value = column.iloc[i]
        problems.append(Problem(int(i) + 1, name, value, why(value)))


def _encode_feature(feature: Feature, column: Any, problems: list[Problem]) -> tuple[np.ndarray, np.ndarray]:
    """One feature's column(s) and which cells were missing; bad cells go to `problems`."""
    import pandas as pd

    absent = column.isna().to_numpy()
    if feature.missing is None:
        _note(
            problems,
            column,
            absent,
            feature.name,
            lambda _: 'missing value (the schema says how to fill it: "missing")',
        )
    fill = feature.low if feature.missing == INDICATOR and not feature.categories else feature.missing
    indicator = [absent[:, None].astype(np.float64)] if feature.missing == INDICATOR else []
    if feature.categories:
        text = np.where(absent, "", [feature.aliases.get(t, t) for t in map(_as_text, column)])
        unknown = ~absent & ~np.isin(text, feature.categories)
        choices = list(feature.categories) + [f"or an alias {a!r}" for a in feature.aliases][:3]
        _note(problems, column, unknown, feature.name, lambda v: f"{v!r} is not one of its categories {choices}")
        if fill is not None and fill != INDICATOR:
            text = np.where(absent, fill, text)
        onehot = (text[:, None] == np.array(feature.categories)[None, :]).astype(np.float64)
        return np.column_stack([onehot, *indicator]), absent
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~absent & ~np.isfinite(values)
    _note(problems, column, bad, feature.name, lambda v: f"{v!r} is not a finite number")
    outside = np.isfinite(values) & ((values < feature.low) | (values > feature.high))
    declared = f"[{feature.low:g}, {feature.high:g}]"
    _note(problems, column, outside, feature.name, lambda v: f"{float(v):g} is outside its declared range {declared}")
    values = np.where(absent, feature.low if fill is None else fill, values)
    return np.column_stack([np.where(bad | outside, feature.low, values), *indicator]), absent


def _encode_label(label: Label, column: Any, problems: list[Problem]) -> np.ndarray:
    """Labels as class indices into the schema's classes, or range-checked numbers; bad cells go to `problems`."""
    import pandas as pd

    absent = column.isna().to_numpy()
    _note(problems, column, absent, label.name, lambda _: "missing label")
    if label.classes:
        names = [_as_text(c) for c in label.classes]
        text = np.where(absent, "", [label.aliases.get(t, t) for t in map(_as_text, column)])
        unknown = ~absent & ~np.isin(text, names)
        _note(problems, column, unknown, label.name, lambda v: f"{v!r} is not one of the classes {list(label.classes)}")
        index = {name: i for i, name in enumerate(names)}
        return np.array([index.get(t, 0) for t in text], dtype=np.int64)
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~absent & (~np.isfinite(values) | (values < label.low) | (values > label.high))
    _note(problems, column, bad, label.name, lambda v: f"{v!r} is not a number in [{label.low:g}, {label.high:g}]")
    return np.where(bad | absent, label.low, values)


def load(
    path: str | os.PathLike[str], schema: Schema, seed: int = 0, test_size: float = 0.2, max_bytes: int | None = None
) -> Dataset:
    """A user's table as a data set: encoded by the schema, split as the bundled ones (seeded, stratified).

    A file over `max_bytes` is not read. Repeated rows are counted (a copy may land on both sides of the split).
    """
    path = Path(path).resolve()
    rows = read_rows(path, schema, max_bytes)
    X, y = rows.X, rows.y
    assert y is not None  # read_rows reads the label
    try:
        data = split_dataset(str(path), X, y, schema.input_range, seed, test_size, schema.target_range)
    except ValueError as exc:  # scikit-learn's split: too few rows, or a class with one row
        raise FedfheError(f"{path}: cannot split {len(y)} rows into train and test ({exc})") from None
    filled = {path.name: rows.filled_counts(schema)}
    source, found = {"data": str(path)}, _split_rows(data)
    data = dataclasses.replace(data, schema=schema.to_dict(), source=source, filled=filled, leakage=found)
    return _checked(data, schema)


def owner_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The data owners' files in a folder (one table each, in name order): each is one client."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FedfheError(f"{folder}: no such folder of owner files")
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if stray := [p for p in files if p.suffix.lower() not in FORMATS or not p.is_file()]:
        raise FedfheError(f"{stray[0]}: not a table ({', '.join(FORMATS)}); the owners' folder holds one per owner")
    if not files:
        raise FedfheError(f"{folder}: no owner files ({', '.join(FORMATS)}), one per data owner")
    return files


def load_owners(
    folder: str | os.PathLike[str],
    test: str | os.PathLike[str],
    schema: Schema,
    max_bytes: int | None = None,
    allow_overlap: bool = False,
) -> Dataset:
    """One file per data owner (each a client, its rows kept together) and the server's held-out test file.

    A file over `max_bytes` is not read. A row of the test file in an owner's file is refused unless `allow_overlap`.
    """
    folder, test = Path(folder).resolve(), Path(test).resolve()
    files = [p.resolve() for p in owner_files(folder)]
    if test in files:
        raise FedfheError(f"{test}: the test file is one of the owners' files; keep it outside {folder}")
    frames = [read_frame(p, max_bytes, schema.dialect) for p in files]
    first = set(map(str, frames[0].columns)) - set(schema.ignore)
    for path, frame in zip(files, frames):
        if len(frame) == 0:
            raise FedfheError(f"{path}: empty owner file (a header and no rows)")
        columns = set(map(str, frame.columns)) - set(schema.ignore)  # an ignored column may be one owner's own
        if columns != first:
            extra, lacking = sorted(columns - first), sorted(first - columns)
            differs = ", ".join([*(f"has {c!r}" for c in extra), *(f"lacks {c!r}" for c in lacking)])
            raise FedfheError(f"{path}: owners with different columns: it {differs}, unlike {files[0].name}")
    encoded = [schema.rows(frame, str(path)) for path, frame in zip(files, frames)]
    for rows in encoded:
        rows.refuse()
    tested = read_rows(test, schema, max_bytes)
    assert tested.y is not None  # read_rows reads the label
    found = _owner_rows(files, [(rows.X, rows.y) for rows in encoded], test, tested.X, tested.y, allow_overlap)
    data = assemble(
        str(folder),
        np.vstack([rows.X for rows in encoded]),
        np.concatenate([rows.y for rows in encoded if rows.y is not None]),
        tested.X,
        tested.y,
        schema.input_range,
        schema.target_range,
    )
    source = {"owners": str(folder), "test": str(test)}
    sizes = tuple(len(rows.X) for rows in encoded)
    filled = {path.name: rows.filled_counts(schema) for path, rows in zip(files, encoded)}
    filled[f"{test.name} (test)"] = tested.filled_counts(schema)
    data = dataclasses.replace(data, schema=schema.to_dict(), source=source, owners=sizes, filled=filled, leakage=found)
    return _checked(data, schema)


def _owner_rows(
    files: list[Path], encoded: list[Any], test: Path, X_test: np.ndarray, y_test: np.ndarray, allow_overlap: bool
) -> dict[str, int]:
    """The owners' rows against the test file's, by row hashes (leakage.check_owners)."""
    owned = {str(path): leakage.row_hashes(X, y) for path, (X, y) in zip(files, encoded)}
    return leakage.check_owners(owned, str(test), leakage.row_hashes(X_test, y_test), allow_overlap)


def _split_rows(data: Dataset) -> dict[str, int]:
    """A split table's test rows against its training rows, by row hashes."""
    return leakage.counts(leakage.row_hashes(data.X_train, data.y_train), leakage.row_hashes(data.X_test, data.y_test))


def held_out(test: str | os.PathLike[str], schema: Schema) -> Dataset:
    """The server's test file alone (a deployed federation's server holds no training rows)."""
    test = Path(test).resolve()
    rows = read_rows(test, schema)
    X, y = rows.X, rows.y
    assert y is not None  # read_rows reads the label
    data = assemble(str(test), X[:0], y[:0], X, y, schema.input_range, schema.target_range)
    classes = np.arange(len(schema.label.classes)) if schema.label.classes else data.classes
    filled = {f"{test.name} (test)": rows.filled_counts(schema)}
    source = {"test": str(test)}
    return dataclasses.replace(data, classes=classes, schema=schema.to_dict(), source=source, filled=filled)


def reload(
    source: dict[str, str], schema: Schema, seed: int, test_only: bool = False, allow_overlap: bool = False
) -> Dataset:
    """A run's data again, from the files it recorded; `test_only` reads no owner's file when a test file will do."""
    if "test" in source and (test_only or "owners" not in source):
        return held_out(source["test"], schema)
    if "owners" in source:
        return load_owners(source["owners"], source["test"], schema, allow_overlap=allow_overlap)
    return load(source["data"], schema, seed)


def read_labelled(
    path: str | os.PathLike[str], schema: Schema, max_bytes: int | None = None, pinned: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """A labelled table, encoded by the schema (a file over `max_bytes` is not read; `pinned`: a model's schema)."""
    rows = read_rows(path, schema, max_bytes, pinned)
    assert rows.y is not None  # read_rows reads the label
    return rows.X, rows.y


def read_rows(path: str | os.PathLike[str], schema: Schema, max_bytes: int | None = None, pinned: bool = False) -> Rows:
    """A labelled table's rows, encoded by the schema, with the cells it filled; any bad row refused."""
    rows = schema.rows(read_frame(path, max_bytes, schema.dialect), str(path), pinned=pinned)
    rows.refuse()
    return rows


def _checked(data: Dataset, schema: Schema) -> Dataset:
    """Refuse a class the schema declares but no training row has: the model would have no output for it."""
    absent = [c for i, c in enumerate(schema.label.classes) if not (data.y_train == i).any()]
    if absent:
        raise FedfheError(
            f"{data.name}: class {absent[0]!r} of the schema has no training rows (remove it from the classes)"
        )
    return data


def read_frame(
    path: str | os.PathLike[str],
    max_bytes: int | None = None,
    dialect: Dialect | None = None,
    as_text: Collection[str] = (),
) -> Any:
    """A table with named columns: .csv with a header (its dialect detected or declared), .xlsx (the first
    sheet), .parquet, or .npz with one array per column; missing-value tokens become empty cells. The columns
    `as_text` keep a .csv's or .xlsx's cells as written (identifiers), never read as numbers.

    A file larger than `max_bytes` on disk (or, for .xlsx and .parquet, once unpacked) is refused before it is read.
    """
    import pandas as pd

    path, dialect = Path(path), dialect or Dialect()
    if not path.is_file():
        raise FedfheError(f"{path}: file not found")
    kind = path.suffix.lower()
    if kind not in FORMATS:
        raise FedfheError(f"{path}: unsupported table format (use {', '.join(FORMATS)})")
    try:
        if max_bytes is not None:
            check_size(path, max_bytes)
        if kind == ".csv":
            return read_csv(path, dialect, as_text)
        if kind == ".xlsx":
            return read_excel(path, dialect, as_text)
        if kind == ".parquet":
            pyarrow_parquet(path)  # pandas reads Parquet with it
            frame = pd.read_parquet(path)
        else:
            with np.load(path, allow_pickle=False) as f:
                frame = pd.DataFrame({name: f[name] for name in f.files})
        return typed(frame, dialect.missing, as_text=as_text)
    except FedfheError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt files of any kind end here
        raise FedfheError(f"{path}: cannot read ({type(exc).__name__}: {exc})".replace("\n", " ")) from None


def plain(value: Any) -> Any:
    """A cell as JSON holds it: NumPy scalars as the numbers and strings they are, an empty cell as None, any other
    value (a date) as its text."""
    import pandas as pd

    if pd.isna(value):  # None, NaN, pandas' NA and NaT
        return None
    value = value.item() if hasattr(value, "item") else value
    return value if isinstance(value, (str, int, float, bool)) else str(value)
