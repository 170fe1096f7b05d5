"""The trained model as a safe file: arrays and JSON metadata in an .npz, guarded by a content hash."""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from fedfhe.data import Range, as_range
from fedfhe.errors import FedfheError
from fedfhe.kinds import KINDS, Kind, kind_of
from fedfhe.problem import read_observed
from fedfhe.table import MAX_SCHEMA_BYTES

FORMAT = "fedfhe-linear-model/3"  # 3: the sha256 covers only what predicts (IDENTITY), not the training facts
# The metadata that changes what a prediction means: the input columns, the class names and the operating point
# (fedfhe.decision). The rest (data set, training settings, rows, seconds, scores, how the operating point was
# chosen) is how the model came about, so it is not hashed: the same weights trained by the simulation or the
# Deployment Engine are the same model. What later changes a prediction joins here.
IDENTITY = ("schema", "feature_names", "class_names", "operating_point")

# The most a model file may hold: far above any model fedfhe trains (MNIST's logistic model has 10 x 784
# weights and a few KiB of metadata), yet read in well under a second, so a hostile file costs little.
MAX_OUTPUTS = 1_000  # weight rows (one per class, or one) and classes
MAX_FEATURES = 1_000_000
MAX_WEIGHTS = 1 << 24  # outputs x features: 128 MiB of float64
MAX_HEADER = MAX_SCHEMA_BYTES + (64 << 10)  # bytes of JSON header: 1 MiB, a schema and the training facts
NPY_PREFIX = 16 << 10  # an .npy's magic and array header (numpy refuses headers over 10,000 characters)
MEMBER_BYTES = {  # data bytes of each member; names are known and unique, so this bounds the total too
    "header": MAX_HEADER,
    "coef": 8 * MAX_WEIGHTS,
    "intercept": 8 * MAX_OUTPUTS,
    "classes": 8 * MAX_OUTPUTS,
    "input_low": 8 * MAX_FEATURES,
    "input_high": 8 * MAX_FEATURES,
}
MAX_FILE_BYTES = sum(MEMBER_BYTES.values()) + len(MEMBER_BYTES) * NPY_PREFIX + (64 << 10)  # + zip records
# What reading a damaged file can raise; RuntimeError covers RecursionError (deeply nested JSON).
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, MemoryError)


@dataclass
class LinearModel:
    """Weights of a `kind` of linear model that take raw features in `input_range`, plus their origin.

    coef has one row per output (class scores, or one row for a regressor); classes is empty for
    regressors.
    """

    coef: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray
    input_range: Range  # one (low, high) for every feature is accepted too
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: Kind = KINDS["logistic"]

    def __post_init__(self) -> None:
        """Refuse what no model can compute with; accept one range for all features and a kind's name."""
        self.coef, self.intercept = _weights(self.coef, "coef"), _weights(self.intercept, "intercept")
        self.classes = _classes(self.classes)
        if self.coef.ndim != 2 or self.intercept.shape != (self.coef.shape[0],) or self.classes.ndim != 1:
            shapes = f"{self.coef.shape}, {self.intercept.shape} and {self.classes.shape}"
            raise FedfheError(f"inconsistent weight shapes {shapes} (coef, intercept and classes)")
        self.input_range = as_range(self.input_range, self.coef.shape[1])
        if isinstance(self.kind, str):
            self.kind = kind_of(self.kind)

    @property
    def n_features(self) -> int:
        """Number of input features."""
        return int(self.coef.shape[1])

    @property
    def is_regression(self) -> bool:
        """Whether the model predicts values rather than classes."""
        return len(self.classes) == 0

    @property
    def sha256(self) -> str:
        """Hash of what predicts (weights, classes, ranges, kind, IDENTITY metadata): the model's one identity."""
        digest = hashlib.sha256()
        for array in (self.coef, self.intercept, self.classes, *self.input_range):
            digest.update(str((array.dtype.str, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        predicts = {key: self.metadata[key] for key in IDENTITY if key in self.metadata}
        digest.update(json.dumps([self.kind.name, predicts], sort_keys=True).encode())
        return digest.hexdigest()

    @property
    def feature_names(self) -> list[str]:
        """The input columns in model order: as trained (a table's one-hot columns expanded), else x0, x1, ..."""
        names = self.metadata.get("feature_names")
        return [str(n) for n in names] if isinstance(names, list) else [f"x{i}" for i in range(self.n_features)]

    @property
    def class_names(self) -> list[str]:
        """What each class means (the schema's values, e.g. malignant), else its number; none for a regressor."""
        names = self.metadata.get("class_names")
        return [str(n) for n in names] if isinstance(names, list) else [str(int(c)) for c in self.classes]

    @property
    def observed_range(self) -> Range | None:
        """The owners' training rows' range of each input, rounded outward (a user's table): outside is extrapolation."""
        stored = self.metadata.get("observed_range")
        return None if stored is None else read_observed(stored, self.n_features, "model file")

    def scale(self, X: np.ndarray) -> np.ndarray:
        """Features mapped to [0, 1] by the public input ranges: what the FHE circuit takes.

        Concrete ML quantizes all inputs with one scale, so features of very different magnitudes
        must share a range before encryption or the small ones round to nothing.
        """
        low, high = self.input_range
        return (np.asarray(X, dtype=np.float64) - low) / (high - low)

    @property
    def used_features(self) -> np.ndarray:
        """The features some output weighs (at least one): the only ones the FHE circuit takes.

        A feature every output ignores (an always-blank MNIST pixel: 127 of 784) costs an encryption
        and a multiply-add per output for nothing, so it leaves the circuit and is never encrypted.
        """
        used = np.flatnonzero(np.any(self.coef != 0, axis=0))
        return used if len(used) else np.arange(1)

    def to_scaled_sklearn(self, features: np.ndarray | None = None) -> Any:
        """The same model as a scikit-learn estimator taking scaled features (see `scale`), or only `features`."""
        low, high = self.input_range
        coef = self.coef * (high - low)
        coef = coef if features is None else coef[:, features]
        return self.kind.fitted([coef, self.intercept + self.coef @ low], self.classes)

    def to_sklearn(self) -> Any:
        """The fitted scikit-learn estimator of this kind holding these weights."""
        return self.kind.fitted([self.coef, self.intercept], self.classes)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a crash mid-write never leaves a half file under the real name."""
        header = {
            "format": FORMAT,
            "kind": self.kind.name,
            "metadata": self.metadata,
            "sha256": self.sha256,
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f,
                coef=self.coef,
                intercept=self.intercept,
                classes=self.classes,
                input_low=self.input_range[0],
                input_high=self.input_range[1],
                header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            )
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LinearModel:
        """Read a model file, refusing anything that is not an untouched fedfhe model, before reading much."""
        path = Path(path)
        if not path.is_file():
            raise FedfheError(f"{path}: model file not found")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise FedfheError(f"{path}: not a fedfhe model file ({size} bytes, more than {MAX_FILE_BYTES})")
        try:
            with zipfile.ZipFile(path) as npz:
                header = _read_header(npz)
                arrays = _read_arrays(npz) if header.get("format") == FORMAT else {}
        except READ_ERRORS as exc:
            raise FedfheError(f"{path}: not a fedfhe model file ({first_line(exc)})") from None
        if header.get("format") != FORMAT:
            found = header.get("format")
            raise FedfheError(f"{path}: not a fedfhe model file of this version (format {found!r}, expected {FORMAT})")
        kind = KINDS.get(str(header.get("kind")))
        if kind is None or not isinstance(header.get("metadata"), dict):
            raise FedfheError(f"{path}: not a fedfhe model file (its header lacks a known kind or the metadata)")
        try:
            input_range = (arrays["input_low"], arrays["input_high"])
            model = cls(arrays["coef"], arrays["intercept"], arrays["classes"], input_range, header["metadata"], kind)
            intact = header.get("sha256") == model.sha256
        except (FedfheError, RecursionError) as exc:
            raise FedfheError(f"{path}: not a fedfhe model file ({first_line(exc)})") from None
        if not intact:
            raise FedfheError(f"{path}: content hash mismatch, the file was modified after it was written")
        return model


def _weights(values: Any, name: str) -> np.ndarray:
    """Weights as float64, refused unless real and finite: a circuit compiled from inf, NaN or complex is garbage."""
    array = np.asarray(values)
    if array.dtype.kind not in "iuf":
        raise FedfheError(f"{name} must hold real numbers, not {array.dtype}")
    array = array.astype(np.float64, copy=False)
    if not np.isfinite(array).all():
        raise FedfheError(f"{name} holds inf or NaN")
    return array


def _classes(values: Any) -> np.ndarray:
    """Class labels as int64, refused when one repeats: its weight rows would compete for the same label."""
    array = np.asarray(values)
    if array.size and array.dtype.kind not in "iu":
        raise FedfheError(f"classes must be integers, not {array.dtype}")
    labels, counts = np.unique(array.astype(np.int64, copy=False), return_counts=True)
    if (counts > 1).any():
        raise FedfheError(f"classes repeat: {labels[counts > 1].tolist()}")
    return array.astype(np.int64, copy=False)


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (numpy's and zipfile's can run to several)."""
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__


def read_npy(
    f: IO[bytes], size: int, dtype: type, fits: Callable[[tuple[int, ...]], bool], expected: str
) -> np.ndarray:
    """An .npy of `size` bytes whose dtype, shape and length are checked from its header before any data is read.

    Raises ValueError saying what the header declares when it does not fit.
    """
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, found = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran_order, found = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f".npy version {version} is not supported")
    if found != np.dtype(dtype) or not fits(shape):
        raise ValueError(f"{found} of shape {shape}, expected {expected}")
    nbytes, left = math.prod(shape) * found.itemsize, size - f.tell()
    if left != nbytes:
        raise ValueError(f"{left} bytes of data where its header declares {nbytes}")
    array = np.frombuffer(f.read(nbytes), dtype=found)
    return array.reshape(shape, order="F" if fortran_order else "C").copy()


def _read_member(
    npz: zipfile.ZipFile, name: str, dtype: type, fits: Callable[[tuple[int, ...]], bool], expected: str
) -> np.ndarray:
    """One member of a model file, read only if its header declares what `fits`."""
    if f"{name}.npy" not in npz.namelist():
        raise ValueError(f"no {name}.npy")
    info = npz.getinfo(f"{name}.npy")
    with npz.open(info) as f:
        try:
            return read_npy(f, info.file_size, dtype, fits, expected)
        except ValueError as exc:
            raise ValueError(f"{name}.npy: {first_line(exc)}") from None


def _read_header(npz: zipfile.ZipFile) -> dict[str, Any]:
    """The JSON header, once every member is known, unique, bounded in size and plainly stored or deflated."""
    infos = npz.infolist()
    if len({info.filename for info in infos}) != len(infos):
        raise ValueError("a member name repeats")
    for info in infos:
        name = info.filename.removesuffix(".npy")
        if name not in MEMBER_BYTES or not info.filename.endswith(".npy"):
            raise ValueError(f"unknown member {info.filename!r}")
        if info.file_size > MEMBER_BYTES[name] + NPY_PREFIX:
            raise ValueError(
                f"{info.filename} unpacks to {info.file_size} bytes, more than {MEMBER_BYTES[name] + NPY_PREFIX}"
            )
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 1:
            raise ValueError(f"{info.filename} is encrypted or compressed with method {info.compress_type}")
    raw = _read_member(
        npz,
        "header",
        np.uint8,
        lambda s: len(s) == 1 and s[0] <= MAX_HEADER,
        f"1-D uint8 of at most {MAX_HEADER} bytes",
    )
    try:
        header = json.loads(raw.tobytes())
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"header.npy is not JSON: {first_line(exc)}") from None
    if isinstance(header, dict):
        return header
    raise ValueError(f"its header holds a JSON {type(header).__name__}, not an object")


def _read_arrays(npz: zipfile.ZipFile) -> dict[str, np.ndarray]:
    """Weights, classes and input ranges, each read only if its header declares the dtype and shape a model has."""
    coef = _read_member(
        npz,
        "coef",
        np.float64,
        lambda s: len(s) == 2 and 0 < s[0] <= MAX_OUTPUTS and 0 < s[1] <= MAX_FEATURES and s[0] * s[1] <= MAX_WEIGHTS,
        f"2-D float64 of at most {MAX_OUTPUTS} rows, {MAX_FEATURES} columns and {MAX_WEIGHTS} weights",
    )
    rows, features = coef.shape
    return {
        "coef": coef,
        "intercept": _read_member(npz, "intercept", np.float64, lambda s: s == (rows,), f"float64 of shape ({rows},)"),
        "classes": _read_member(
            npz,
            "classes",
            np.int64,
            lambda s: len(s) == 1 and s[0] <= MAX_OUTPUTS,
            f"1-D int64 of at most {MAX_OUTPUTS}",
        ),
        "input_low": _read_member(
            npz, "input_low", np.float64, lambda s: s == (features,), f"float64 of shape ({features},)"
        ),
        "input_high": _read_member(
            npz, "input_high", np.float64, lambda s: s == (features,), f"float64 of shape ({features},)"
        ),
    }
