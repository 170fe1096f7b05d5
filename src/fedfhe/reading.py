"""How a table file becomes cells: the separator, decimal mark, encoding and missing-value tokens of real exports.

Spreadsheets write CSV in the locale's dialect (`;` and decimal commas in much of Europe, a BOM, CRLF, an
Excel `sep=;` first line, cp1252 text). Each is detected from the file or declared (schema "format", or
--sep/--decimal); what was read is recorded so `schema check` can say it, and an ambiguous file is refused
in one line rather than guessed. Cells are read as text first: a column is numeric when every cell that is
not a missing-value token is a number, so a few `?` never turn a number column into categories.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfhe.errors import FedfheError

SEPARATORS = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}
DECIMALS = (".", ",")
MISSING = ("", "NA", "N/A", "n/a", "#N/A", "NaN", "nan", "null", "NULL", "None", "?")  # the documented default
SNIFF_LINES = 50  # lines the separator is judged on
NUMBER = {".": r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", ",": r"[-+]?(\d+,?\d*|,\d+)([eE][-+]?\d+)?"}


@dataclass(frozen=True)
class Dialect:
    """How to read a file: None where it is detected; `missing` lists the cells that mean "no value"."""

    sep: str | None = None
    decimal: str | None = None
    encoding: str | None = None
    missing: tuple[str, ...] = MISSING

    @classmethod
    def from_dict(cls, raw: Any, missing: Any, fail: Any) -> Dialect:
        """A schema's "format" ({"sep", "decimal", "encoding"}) and "missing_values", checked."""
        raw = {} if raw is None else raw
        if not isinstance(raw, dict) or set(raw) - {"sep", "decimal", "encoding"}:
            raise fail('"format" must be an object with "sep", "decimal" and/or "encoding"')
        if missing is not None and (not isinstance(missing, list) or not all(isinstance(t, str) for t in missing)):
            raise fail('"missing_values" must be a list of texts (the cells that mean "no value", "" for empty)')
        tokens = MISSING if missing is None else tuple(missing)
        try:
            return cls(raw.get("sep"), raw.get("decimal"), raw.get("encoding"), tokens).checked()
        except FedfheError as exc:
            raise fail(str(exc)) from None

    def checked(self) -> Dialect:
        """Refuse a separator, decimal mark or encoding that cannot be used."""
        if self.sep is not None and self.sep not in SEPARATORS:
            raise FedfheError(f"separator {self.sep!r} is not one of {', '.join(SEPARATORS.values())}")
        if self.decimal is not None and self.decimal not in DECIMALS:
            raise FedfheError(f"decimal mark {self.decimal!r} is not '.' or ','")
        if self.sep is not None and self.sep == self.decimal:
            raise FedfheError(f"the separator and the decimal mark are both {self.sep!r}")
        if self.encoding is not None:
            try:
                "".encode(self.encoding)
            except LookupError:
                raise FedfheError(f"unknown text encoding {self.encoding!r}") from None
        return self

    def override(self, sep: str | None, decimal: str | None) -> Dialect:
        """This dialect with a command's --sep/--decimal (`\\t` or `tab` for a tab), checked."""
        sep = "\t" if sep in ("\\t", "tab") else sep
        return Dialect(sep or self.sep, decimal or self.decimal, self.encoding, self.missing).checked()

    def to_dict(self) -> dict[str, str]:
        """The declared parts, as a schema's "format" writes them."""
        return {k: v for k, v in (("sep", self.sep), ("decimal", self.decimal), ("encoding", self.encoding)) if v}


def read_csv(path: Path, dialect: Dialect, as_text: Collection[str] = ()) -> Any:
    """A CSV export as a DataFrame (numbers where a column holds only numbers, except `as_text`'s),
    `attrs["read_as"]` saying how."""
    import pandas as pd

    raw = path.read_bytes()
    text, encoding = _decode(raw, dialect.encoding, path)
    said = [encoding]
    lines = text.splitlines()
    if lines and (excel := re.fullmatch(r'"?sep=(.)"?,*', lines[0].strip())):  # Excel's "sep=;" line
        if dialect.sep is not None and excel.group(1) != dialect.sep:
            raise FedfheError(f"{path}: its first line declares separator {excel.group(1)!r}, not {dialect.sep!r}")
        dialect = Dialect(excel.group(1), dialect.decimal, dialect.encoding, dialect.missing)
        text = text.split("\n", 1)[1] if "\n" in text else ""
        said.append(f"an Excel 'sep={excel.group(1)}' line")
    if "\r\n" in text[:65536]:
        said.append("CRLF line ends")
    sep = dialect.sep or _separator(text, path)
    header = next(csv.reader(io.StringIO(text.split("\n", 1)[0]), delimiter=sep), [])
    if duplicated := repeated([h.strip() for h in header]):
        raise FedfheError(f"{path}: column {duplicated[0]!r} appears more than once")  # pandas would rename them
    frame = pd.read_csv(
        io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True, quotechar='"'
    )
    frame.columns = [str(c).strip() for c in frame.columns]
    decimal = dialect.decimal or _decimal(frame, sep, path)
    frame = typed(frame, dialect.missing, decimal, as_text)
    frame.attrs["read_as"] = f"separator {SEPARATORS[sep]}, decimal {decimal!r}, " + ", ".join(said)
    return frame


def read_excel(path: Path, dialect: Dialect, as_text: Collection[str] = ()) -> Any:
    """The first sheet of an .xlsx workbook, its cells as a CSV's would be (missing tokens, numbers)."""
    import pandas as pd

    sheets = pd.read_excel(path, sheet_name=None, dtype=str, keep_default_na=False, engine="openpyxl")
    if not sheets:
        raise FedfheError(f"{path}: a workbook without sheets")
    name, frame = next(iter(sheets.items()))
    frame.columns = [str(c).strip() for c in frame.columns]
    frame = typed(frame, dialect.missing, ".", as_text)
    frame.attrs["read_as"] = f"sheet {name!r}" + (f" (the first of {len(sheets)})" if len(sheets) > 1 else "")
    return frame


def typed(frame: Any, missing: tuple[str, ...], decimal: str = ".", as_text: Collection[str] = ()) -> Any:
    """Text cells as values: missing tokens become NaN; a column of numbers (and tokens) becomes numeric, unless
    it is one of `as_text` (identifiers: "00123" stays as written)."""
    import pandas as pd

    tokens = set(missing)
    out = {}
    for name in frame.columns:
        column = frame[name]
        if not (pd.api.types.is_object_dtype(column) or pd.api.types.is_string_dtype(column)):
            out[name] = column
            continue
        text = column.map(lambda v: v if v is None or isinstance(v, float) else str(v))
        stripped = text.map(lambda v: v.strip() if isinstance(v, str) else v)
        absent = stripped.isna() | stripped.isin(tokens)
        if name in as_text:
            out[name] = text.where(~absent, None).astype(object)
            continue
        present = stripped[~absent]
        number = present.str.fullmatch(NUMBER[decimal]).astype(bool)
        numbers = present[number].str.replace(",", ".", regex=False) if decimal == "," else present[number]
        if len(present) and number.all():  # a number column: int64 when whole and complete, as pandas reads it
            out[name] = pd.to_numeric(numbers.reindex(column.index))
        else:  # text, or numbers with a few other cells the schema will refuse or a draft will flag
            values = text.where(~absent, None).astype(object)
            values[numbers.index] = pd.to_numeric(numbers).astype(object)
            out[name] = values
    return pd.DataFrame(out, index=frame.index)


def repeated(names: list[str]) -> list[str]:
    """The names that occur more than once, sorted (in linear time: tables can have 200,000 columns)."""
    return sorted(name for name, n in Counter(names).items() if n > 1)


def _decode(raw: bytes, encoding: str | None, path: Path) -> tuple[str, str]:
    """The file's text and what it was: a declared encoding, UTF-8 (with or without a BOM), else cp1252."""
    if encoding is not None:
        try:
            return raw.decode(encoding), encoding
        except UnicodeDecodeError as exc:
            raise FedfheError(f"{path}: not {encoding} text (byte {exc.start} cannot be read)") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        try:
            return raw[3:].decode("utf-8"), "UTF-8 with a BOM"
        except UnicodeDecodeError as exc:
            raise FedfheError(f"{path}: a UTF-8 BOM, but byte {exc.start + 3} is not UTF-8") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16"), "UTF-16"
    try:
        return raw.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp1252"), "cp1252 (not UTF-8)"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "latin-1 (neither UTF-8 nor cp1252)"


def _separator(text: str, path: Path) -> str:
    """The one separator that splits the header and every sniffed line into the same number of fields."""
    head = text.splitlines()[:SNIFF_LINES]
    fits = []
    for sep in SEPARATORS:
        widths = {len(row) for row in csv.reader(head, delimiter=sep) if row}
        if len(widths) == 1 and widths.pop() > 1:
            fits.append(sep)
    if len(fits) > 1:
        names = " and ".join(SEPARATORS[s] for s in fits)
        raise FedfheError(
            f"{path}: cannot tell the separator ({names} both split every line alike): "
            'give --sep, or "format": {"sep": ...} in the schema'
        )
    if fits:
        return fits[0]
    fields = {sep: len(next(csv.reader(head[:1], delimiter=sep), [])) for sep in SEPARATORS}
    return max(fields, key=lambda s: fields[s])  # one column, or ragged lines: pandas names the bad line


def _decimal(frame: Any, sep: str, path: Path) -> str:
    """',' when number cells use decimal commas and none a decimal point; refused when both occur."""
    if sep == ",":
        return "."
    comma = point = None
    for name in frame.columns:
        cells = frame[name].str.strip()
        comma = comma or next(iter(cells[cells.str.fullmatch(r"[-+]?\d+,\d+")]), None)
        point = point or next(iter(cells[cells.str.fullmatch(r"[-+]?\d+\.\d+")]), None)
    if comma and point:
        raise FedfheError(
            f"{path}: cannot tell the decimal mark (cells {point!r} and {comma!r}): "
            'give --decimal, or "format": {"decimal": ...} in the schema'
        )
    return "," if comma else "."
