"""Data loading: bundled sets, IDX files written here, user files and input validation."""

from __future__ import annotations

import gzip
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedfhe.data import (
    MNIST_FILES,
    bundled_positive,
    check_features,
    fetch_mnist_openml,
    load_dataset,
    read_table,
)
from fedfhe.errors import FedfheError


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = True) -> None:
    """Write an IDX file the way the official MNIST files are laid out."""
    raw = (
        struct.pack(">I", magic)
        + b"".join(struct.pack(">I", d) for d in array.shape)
        + array.astype(np.uint8).tobytes()
    )
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_mnist(folder: Path, n_train: int = 12, n_test: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Four small MNIST-format files with random pixels and labels."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n_train + n_test, 28, 28))
    labels = rng.integers(0, 10, size=n_train + n_test)
    write_idx(folder / MNIST_FILES["train_images"], images[:n_train], 2051)
    write_idx(folder / MNIST_FILES["train_labels"], labels[:n_train], 2049)
    write_idx(folder / MNIST_FILES["test_images"], images[n_train:], 2051)
    write_idx(folder / MNIST_FILES["test_labels"], labels[n_train:], 2049)
    return images, labels


def test_bundled_sets_have_raw_features_in_their_range(digits):
    mnist = load_dataset("mnist-5k", seed=0)
    assert (mnist.X_train.shape, mnist.X_test.shape) == ((4000, 784), (1000, 784))
    assert (mnist.input_range[0] == 0).all() and (mnist.input_range[1] == 255).all() and mnist.X_train.max() == 255
    assert digits.n_features == 64 and digits.X_train.max() <= 16
    assert list(mnist.classes) == list(range(10))
    assert np.bincount(mnist.y_test).tolist() == [100] * 10  # stratified


def test_split_is_deterministic_from_the_seed():
    a, b, c = (load_dataset("digits", seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.X_test, b.X_test)
    assert not np.array_equal(a.X_test, c.X_test)


def test_mnist_idx_files_keep_the_official_split(tmp_path):
    images, labels = write_mnist(tmp_path)
    data = load_dataset("mnist", data_dir=tmp_path)
    assert data.X_train.shape == (12, 784) and data.X_test.shape == (5, 784)
    assert np.array_equal(data.X_test, images[12:].reshape(5, -1))
    assert np.array_equal(data.y_train, labels[:12])


def test_uncompressed_idx_is_read_too(tmp_path):
    from fedfhe.data import read_idx

    path = tmp_path / "labels-idx1-ubyte"
    write_idx(path, np.arange(7), 2049, compress=False)
    assert read_idx(path, 2049).tolist() == list(range(7))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / MNIST_FILES["test_labels"]).unlink(), "file not found"),
        (lambda d: write_idx(d / MNIST_FILES["train_images"], np.zeros((12, 28, 28)), 2049), "wrong magic number"),
        (
            lambda d: (d / MNIST_FILES["train_labels"]).write_bytes(
                gzip.compress(gzip.decompress((d / MNIST_FILES["train_labels"]).read_bytes())[:-3])
            ),
            "data bytes for shape",
        ),
        (lambda d: write_idx(d / MNIST_FILES["test_labels"], np.zeros(4), 2049), "4 labels for 5 images"),
        (lambda d: (d / MNIST_FILES["test_images"]).write_bytes(b"\x1f\x8bnot gzip"), "cannot read"),
        (lambda d: (d / MNIST_FILES["test_images"]).write_bytes(gzip.compress(b"\x00\x00")), "truncated header"),
    ],
)
def test_broken_idx_files_name_the_file_and_the_problem(tmp_path, damage, message):
    write_mnist(tmp_path)
    damage(tmp_path)
    with pytest.raises(FedfheError, match=message) as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_openml_download_without_network_is_one_clear_error(tmp_path, monkeypatch):
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # a closed port: the download cannot succeed
    with pytest.raises(FedfheError, match="cannot download mnist_784 from OpenML.*--data-dir"):
        fetch_mnist_openml(tmp_path)


def test_unknown_data_set_lists_the_choices():
    with pytest.raises(
        FedfheError, match=r"unknown data set 'mnsit' \(did you mean 'mnist'\?\); choose one of: digits"
    ):
        load_dataset("mnsit")
    with pytest.raises(FedfheError, match="unknown data set 'cifar'; choose one of: digits, mnist-5k, mnist"):
        load_dataset("cifar")  # nothing close: no suggestion


def test_read_table_formats(tmp_path):
    X = np.arange(12, dtype=float).reshape(3, 4)
    np.save(tmp_path / "rows.npy", X)
    np.savez(tmp_path / "data.npz", X=X, y=np.array([0, 1, 0]))
    (tmp_path / "data.csv").write_text("a,b,label\n1,2,0\n3,4,1\n")
    assert np.array_equal(read_table(tmp_path / "rows.npy")[0], X)
    Xz, yz = read_table(tmp_path / "data.npz")
    assert np.array_equal(Xz, X) and yz.tolist() == [0, 1, 0]
    Xc, yc = read_table(tmp_path / "data.csv")
    assert Xc.tolist() == [[1, 2], [3, 4]] and yc.tolist() == [0, 1]


def test_read_table_rejects_pickles_and_garbage(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    for name in ("objects.npy", "junk.npz", "missing.csv"):
        with pytest.raises(FedfheError):
            read_table(tmp_path / name)
    with pytest.raises(FedfheError, match="unsupported file type"):
        (tmp_path / "x.txt").write_text("1")
        read_table(tmp_path / "x.txt")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no data"),
        ("a,b,label\n", "no data"),
        ("a,b,label\n1,2,0\n\n3,4\n", "line 4 has 2 values, the header 3"),
        ("a,b,label\n1,2,0\n3,4,1,5\n", "line 3 has 4 values, the header 3"),
    ],
)
def test_read_table_refuses_empty_and_ragged_csv_in_one_line(tmp_path, text, message):
    (tmp_path / "data.csv").write_text(text)
    with warnings.catch_warnings(), pytest.raises(FedfheError, match=message) as info:
        warnings.simplefilter("error")  # a warning would be one more line on stderr
        read_table(tmp_path / "data.csv")
    assert "\n" not in str(info.value) and str(tmp_path / "data.csv") in str(info.value)


def write_npy_header(f, shape: tuple[int, ...]) -> None:
    """A .npy header declaring float64 rows of that shape; no data follows."""
    np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": shape})


def test_read_table_refuses_files_larger_than_max_bytes_before_reading(tmp_path):
    X = np.zeros((100, 8))  # 6,400 bytes of data
    np.save(tmp_path / "rows.npy", X)
    np.savez(tmp_path / "rows.npz", X=X, y=np.zeros(100))
    (tmp_path / "rows.csv").write_text(",".join(f"f{j}" for j in range(8)) + "\n" + "0,0,0,0,0,0,0,0\n" * 100)
    for name in ("rows.npy", "rows.npz", "rows.csv"):
        assert read_table(tmp_path / name, max_bytes=1 << 20)[0].shape == (100, 8)
        with pytest.raises(FedfheError, match=r"MiB on disk, more than the 0.0009537 MiB allowed"):
            read_table(tmp_path / name, max_bytes=1000)
    with open(tmp_path / "huge.npy", "wb") as f:  # small files whose headers declare 64 TB
        write_npy_header(f, (10**12, 8))
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z, z.open("X.npy", "w") as member:
        write_npy_header(member, (10**12, 8))
    for name in ("huge.npy", "huge.npz"):
        with pytest.raises(FedfheError, match=r"MiB declared, more than the 1 MiB allowed"):
            read_table(tmp_path / name, max_bytes=1 << 20)
    with pytest.raises(FedfheError, match="must be positive"):
        read_table(tmp_path / "rows.npy", max_bytes=0)


@pytest.mark.parametrize(
    "X, message",
    [
        (np.zeros((2, 5)), r"shape \(2, 5\); expected \(n_samples, 4\)"),
        (np.array([[0, 1, np.nan, 2]]), "NaN or infinite"),
        (np.array([[0, 1, np.inf, 2]]), "NaN or infinite"),
        (np.array([[0, 1, 300, 2]]), r"outside the model's input range \[0, 255\]"),
        (np.array([[-1, 1, 3, 2]]), "outside"),
    ],
)
def test_check_features_rejects_bad_rows(X, message):
    with pytest.raises(FedfheError, match=message):
        check_features(X, 4, (0.0, 255.0))


def test_check_features_accepts_a_single_row():
    assert check_features(np.array([1, 2, 3, 4]), 4, (0.0, 255.0)).shape == (1, 4)


@pytest.mark.parametrize("name, n_features, regression", [("breast-cancer", 30, False), ("diabetes", 10, True)])
def test_tabular_sets_declare_per_feature_ranges_that_hold_their_data(name, n_features, regression):
    data = load_dataset(name, seed=0)
    low, high = data.input_range
    assert data.n_features == n_features and low.shape == high.shape == (n_features,)
    assert data.is_regression == regression and (len(data.classes) == 0) == regression
    for X in (data.X_train, data.X_test):
        check_features(X, n_features, data.input_range)
    assert len(np.unique(high)) > 5  # really per feature, not one shared range
    if regression:
        t_low, t_high = data.target_range
        assert t_low <= data.y_train.min() and data.y_train.max() <= t_high


def test_out_of_range_column_is_named():
    X = np.zeros((2, 3))
    X[1, 2] = 7.0
    with pytest.raises(
        FedfheError, match=r"X column 2 has values in \[0, 7\], outside the model's input range \[0, 5\]"
    ):
        check_features(X, 3, (np.zeros(3), np.full(3, 5.0)))


def test_bundled_data_sets_name_their_features_and_classes():
    from fedfhe.data import bundled_names

    features, classes = bundled_names("breast-cancer", 30, np.array([0, 1]))
    assert features[:2] == ["mean radius", "mean texture"] and classes == ["malignant", "benign"]
    features, classes = bundled_names("digits", 64, np.arange(10))
    assert features[9] == "pixel_1_1" and classes == [str(d) for d in range(10)]
    assert bundled_names("diabetes", 10, np.array([]))[1] == []


def test_hastie_holds_2000_rows_out_and_no_linear_model_beats_chance_on_it():
    from sklearn.linear_model import LogisticRegression

    data = load_dataset("hastie", seed=3)
    assert (len(data.y_train), len(data.y_test), data.n_features) == (10_000, 2_000, 10)
    assert data.classes.tolist() == [0, 1] and bundled_positive("hastie") == "+1"
    for X in (data.X_train, data.X_test):
        check_features(X, 10, data.input_range)
    assert load_dataset("hastie", seed=3).X_test.tobytes() == data.X_test.tobytes()  # drawn and split alike
    accuracy = LogisticRegression().fit(data.X_train, data.y_train).score(data.X_test, data.y_test)
    assert 0.45 < accuracy < 0.6, accuracy  # the circle is invisible to a hyperplane
