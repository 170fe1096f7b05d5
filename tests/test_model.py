"""The model file: safe format, content hash, clear refusals."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from fedfhe.errors import FedfheError
from fedfhe.federated import task
from fedfhe.model import LinearModel


@pytest.fixture
def model() -> LinearModel:
    rng = np.random.default_rng(0)
    return LinearModel(rng.normal(size=(3, 4)), rng.normal(size=3), np.array([0, 1, 2]), (0.0, 255.0), {"dataset": "x"})


def test_round_trip_keeps_weights_metadata_and_hash(tmp_path, model):
    model.save(tmp_path / "m.npz")
    loaded = LinearModel.load(tmp_path / "m.npz")
    assert np.array_equal(loaded.coef, model.coef) and loaded.metadata == {"dataset": "x"}
    assert loaded.sha256 == model.sha256 and loaded.input_range == (0.0, 255.0)


def test_tampered_weights_are_detected(tmp_path, model):
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["coef"] = arrays["coef"] * 2
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(FedfheError, match="content hash mismatch"):
        LinearModel.load(tmp_path / "m.npz")


@pytest.mark.parametrize(
    "write",
    [
        lambda p: p.write_bytes(b"not a zip at all"),
        lambda p: p.write_bytes(pickle.dumps({"coef": [1, 2]})),
        lambda p: np.savez(p, coef=np.zeros((2, 2))),
        lambda p: np.savez(p, header=np.array([{"x": 1}], dtype=object)),
    ],
)
def test_files_that_are_not_models_are_refused(tmp_path, write):
    path = tmp_path / "m.npz"
    write(path)
    with pytest.raises(FedfheError, match="not a fedfhe model file"):
        LinearModel.load(path)


def test_missing_model_file(tmp_path):
    with pytest.raises(FedfheError, match="model file not found"):
        LinearModel.load(tmp_path / "nope.npz")


def test_unscaled_weights_on_raw_inputs_equal_scaled_weights_on_scaled_inputs():
    rng = np.random.default_rng(1)
    coef, intercept = rng.normal(size=(10, 6)), rng.normal(size=10)
    X = rng.uniform(2, 18, size=(20, 6))
    raw_coef, raw_intercept = task.unscale(coef, intercept, (2.0, 18.0))
    assert np.allclose(X @ raw_coef.T + raw_intercept, task.scale(X, (2.0, 18.0)) @ coef.T + intercept)


def test_fit_keeps_rows_for_classes_a_client_lacks():
    rng = np.random.default_rng(0)
    X, y = rng.uniform(0, 1, size=(30, 5)), rng.integers(0, 2, size=30)
    classes = np.arange(4)
    params = task.fit(task.initial_params(5, 4), X, y, classes, C=1.0, iterations=20)
    assert params[0].shape == (4, 5) and params[1].shape == (4,)
    assert set(task.classifier(params, classes).predict(X)) <= {0, 1}
