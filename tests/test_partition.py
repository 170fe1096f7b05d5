"""Partitions: IID and Dirichlet with flwr-datasets, deterministic, with a plot."""

from __future__ import annotations

import numpy as np
import pytest

from fedfhe.errors import FedfheError
from fedfhe.partition import label_counts, partition, plot_label_distribution, save_partitions


def test_iid_partitions_cover_every_sample_once(digits):
    parts = partition(digits.y_train, 5, "iid", seed=0)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(digits.y_train)))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_partitions_are_deterministic_from_the_seed(digits):
    a = partition(digits.y_train, 4, "dirichlet", alpha=0.3, seed=7)
    b = partition(digits.y_train, 4, "dirichlet", alpha=0.3, seed=7)
    c = partition(digits.y_train, 4, "dirichlet", alpha=0.3, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_skews_labels_more_than_iid(digits):
    def skew(parts):
        counts = label_counts(digits.y_train, parts, digits.classes).astype(float)
        shares = counts / counts.sum(axis=1, keepdims=True)
        return float(np.abs(shares - 0.1).sum(axis=1).mean())

    assert skew(partition(digits.y_train, 5, "dirichlet", alpha=0.1, seed=0)) > 3 * skew(
        partition(digits.y_train, 5, "iid", seed=0)
    )


def test_bad_partition_requests(digits):
    with pytest.raises(FedfheError, match="5000 clients but only 1437 training samples"):
        partition(digits.y_train, 5000)
    with pytest.raises(FedfheError, match="unknown partitioning 'random'"):
        partition(digits.y_train, 3, "random")
    with pytest.raises(FedfheError, match="alpha must be > 0"):
        partition(digits.y_train, 3, "dirichlet", alpha=0)


def test_saved_partitions_and_plot(tmp_path, digits):
    parts = partition(digits.y_train, 3, seed=0)
    paths = save_partitions(digits.X_train, digits.y_train, parts, tmp_path / "p")
    with np.load(paths[1], allow_pickle=False) as f:
        assert np.array_equal(f["X"], digits.X_train[parts[1]])
    plot_label_distribution(label_counts(digits.y_train, parts, digits.classes), digits.classes, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
