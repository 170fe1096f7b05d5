"""The model file: safe format, content hash, clear refusals."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from fedfhe import objective
from fedfhe.config import TrainConfig, parse_params
from fedfhe.errors import FedfheError
from fedfhe.kinds import KINDS, kind_of
from fedfhe.model import LinearModel
from fedfhe.problem import Problem, observed_record, read_observed


@pytest.fixture
def model() -> LinearModel:
    rng = np.random.default_rng(0)
    ranges = (np.zeros(4), np.array([255.0, 255.0, 1.0, 40.0]))
    return LinearModel(rng.normal(size=(3, 4)), rng.normal(size=3), np.array([0, 1, 2]), ranges, {"dataset": "x"})


def test_round_trip_keeps_weights_metadata_and_hash(tmp_path, model):
    model.save(tmp_path / "m.npz")
    loaded = LinearModel.load(tmp_path / "m.npz")
    assert np.array_equal(loaded.coef, model.coef) and loaded.metadata == {"dataset": "x"}
    assert loaded.sha256 == model.sha256 and loaded.kind.name == "logistic"
    assert all(np.array_equal(a, b) for a, b in zip(loaded.input_range, model.input_range))


def test_tampered_weights_are_detected(tmp_path, model):
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["coef"] = arrays["coef"] * 2
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(FedfheError, match="content hash mismatch"):
        LinearModel.load(tmp_path / "m.npz")


def test_the_hash_covers_what_predicts_and_nothing_else(model):
    facts = {"dataset": "y", "n_train": 7, "metrics": {"train_seconds": 3.5}, "training": {"clients": 3}}
    assert LinearModel(model.coef, model.intercept, model.classes, model.input_range, facts).sha256 == model.sha256
    for predicts in ({"class_names": ["a", "b", "c"]}, {"feature_names": ["w", "x", "y", "z"]}, {"schema": {}}):
        changed = LinearModel(model.coef, model.intercept, model.classes, model.input_range, predicts)
        assert changed.sha256 != model.sha256, predicts
    svm = LinearModel(model.coef, model.intercept, model.classes, model.input_range, kind="svm")
    assert svm.sha256 != model.sha256


def test_the_observed_range_is_kept_outside_the_hash_and_a_bad_one_is_refused_in_one_line(model):
    observed = (np.array([1.0, 2.0, 0.0, 15.0]), np.array([200.0, 99.0, 1.0, 30.0]))
    kept = LinearModel(
        model.coef, model.intercept, model.classes, model.input_range, {"observed_range": observed_record(observed)}
    )
    assert kept.sha256 == model.sha256 and model.observed_range is None  # how the model came about, not what it is
    assert np.array_equal(kept.observed_range, observed)
    bad = [[], {"low": [0.0] * 4}, {"low": [0.0] * 3, "high": [1.0] * 3}, {"low": [0, 0, 0, 0], "high": [1, 1, 1, None]},
           {"low": [0, 0, 2, 0], "high": [1, 1, 1, 1]}, {"low": ["a", 0, 0, 0], "high": [1, 1, 1, 1]}]  # fmt: skip
    for stored in bad:
        broken = LinearModel(model.coef, model.intercept, model.classes, model.input_range, {"observed_range": stored})
        with pytest.raises(FedfheError, match="^model file: (refused|unreadable)"):
            _ = broken.observed_range
    with pytest.raises(FedfheError, match="^server client spec: unreadable observed range"):  # the client's member
        read_observed(b"{", 4, "server client spec")


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


@pytest.mark.parametrize(
    ("coef", "intercept", "classes", "message"),
    [
        ([[1.0, np.inf], [0.0, 1.0]], [0.0, 0.0], [0, 1], "coef holds inf or NaN"),
        ([[1.0, 2.0], [0.0, 1.0]], [np.nan, 0.0], [0, 1], "intercept holds inf or NaN"),
        (np.eye(2) + 1j, [0.0, 0.0], [0, 1], "coef must hold real numbers, not complex128"),
        (np.array([[None, 1]], dtype=object), [0.0], [0], "coef must hold real numbers, not object"),
        (np.eye(2), [0.0, 0.0], [1, 1], r"classes repeat: \[1\]"),
        (np.eye(2), [0.0, 0.0], [0.5, 1.5], "classes must be integers, not float64"),
        ([1.0, 2.0], [0.0], [0], "inconsistent weight shapes"),
    ],
)
def test_a_model_no_circuit_could_compute_is_refused_before_it_can_be_saved(coef, intercept, classes, message):
    with pytest.raises(FedfheError, match=message):
        LinearModel(np.asarray(coef), np.asarray(intercept), np.asarray(classes), (0.0, 1.0))


def test_weights_of_any_real_dtype_are_kept_as_float64_so_the_file_reloads(tmp_path):
    model = LinearModel(np.ones((2, 3), dtype=np.int32), np.zeros(2, dtype=np.float32), [0, 1], (0.0, 1.0))
    assert model.coef.dtype == model.intercept.dtype == np.float64 and model.classes.dtype == np.int64
    model.save(tmp_path / "m.npz")
    assert LinearModel.load(tmp_path / "m.npz").sha256 == model.sha256


def test_a_regressor_has_no_classes_and_round_trips(tmp_path):
    model = LinearModel(np.ones((1, 3)), np.zeros(1), np.array([]), (0.0, 1.0), kind="ridge")
    model.save(tmp_path / "m.npz")
    loaded = LinearModel.load(tmp_path / "m.npz")
    assert loaded.is_regression and loaded.classes.dtype == np.int64 and loaded.sha256 == model.sha256


def test_missing_model_file(tmp_path):
    with pytest.raises(FedfheError, match="model file not found"):
        LinearModel.load(tmp_path / "nope.npz")


def test_unscaled_weights_on_raw_inputs_equal_scaled_weights_on_scaled_inputs():
    rng = np.random.default_rng(1)
    coef, intercept = rng.normal(size=(1, 6)), rng.normal(size=1)
    low, high = rng.uniform(-5, 0, size=6), rng.uniform(1, 300, size=6)
    X = rng.uniform(low, high, size=(20, 6))
    problem = Problem(KINDS["ridge"], np.array([]), (low, high), (25.0, 346.0))
    raw_coef, raw_intercept = problem.unscale([coef, intercept])
    scaled_prediction = problem.scale(X) @ coef.T + intercept
    assert np.allclose(X @ raw_coef.T + raw_intercept, 25.0 + 321.0 * scaled_prediction)
    model = LinearModel(raw_coef, raw_intercept, np.array([], dtype=np.int64), (low, high), kind="ridge")
    assert np.allclose(model.to_scaled_sklearn().predict(model.scale(X)), model.to_sklearn().predict(X))


def test_features_no_output_weighs_leave_the_circuit_and_change_no_prediction():
    rng = np.random.default_rng(2)
    coef = rng.normal(size=(3, 6))
    coef[:, [1, 4]] = 0.0  # no class weighs features 1 and 4
    model = LinearModel(coef, rng.normal(size=3), np.arange(3), (np.zeros(6), np.full(6, 10.0)))
    X = rng.uniform(0, 10, size=(20, 6))
    assert model.used_features.tolist() == [0, 2, 3, 5]
    lean = model.to_scaled_sklearn(model.used_features).decision_function(model.scale(X)[:, [0, 2, 3, 5]])
    assert np.allclose(lean, model.to_sklearn().decision_function(X))
    silent = LinearModel(np.zeros((1, 3)), np.zeros(1), np.array([], dtype=np.int64), (0.0, 1.0), kind="ridge")
    assert silent.used_features.tolist() == [0]  # a circuit needs an input


@pytest.mark.parametrize("name", ["logistic", "svm"])
def test_fit_keeps_rows_for_classes_a_client_lacks(name):
    rng = np.random.default_rng(0)
    X, y = rng.uniform(0, 1, size=(30, 5)), rng.integers(0, 2, size=30)
    problem = Problem(KINDS[name], np.arange(4), (np.zeros(5), np.ones(5)))
    params = objective.fit(problem, problem.initial_params(), X, y, {"C": 1.0}, iterations=20)
    assert params[0].shape == (4, 5) and params[1].shape == (4,)
    assert set(KINDS[name].fitted(params, problem.classes).predict(X)) <= {0, 1}


def test_params_are_checked_against_the_estimator():
    assert KINDS["svm"].resolve({"C": 0.5})["C"] == 0.5
    assert parse_params(["C=0.5", "penalty=l1", "fit_intercept=false", "tol=None"]) == {
        "C": 0.5,
        "penalty": "l1",
        "fit_intercept": False,
        "tol": None,
    }
    with pytest.raises(FedfheError, match="unknown parameter 'gamma' for Ridge; valid: alpha, copy_X"):
        KINDS["ridge"].resolve({"gamma": 1})
    with pytest.raises(FedfheError, match="--param: The 'C' parameter of LogisticRegression must be"):
        KINDS["logistic"].resolve({"C": -1})
    with pytest.raises(FedfheError, match="--param: Solver lbfgs supports only 'l2' or None penalties"):
        KINDS["logistic"].resolve({"penalty": "l1"})  # a combination scikit-learn refuses, found before training
    with pytest.raises(FedfheError, match="NAME=VALUE"):
        parse_params(["C"])
    with pytest.raises(FedfheError, match="unknown model 'forest'"):
        kind_of("forest")
    with pytest.raises(FedfheError, match="--param penalty applies to centralized training"):
        TrainConfig(clients=3, params={"penalty": "l1", "solver": "saga"})


@pytest.mark.parametrize(
    "name, n_classes, rows",
    [("logistic", 10, 10), ("logistic", 2, 2), ("logistic", 2, 1), ("svm", 10, 10), ("svm", 2, 1), ("ridge", 0, 1)],
)
def test_numpy_scoring_equals_scikit_learns_metrics(name, n_classes, rows):
    from sklearn.metrics import hinge_loss, log_loss, mean_squared_error, r2_score

    rng = np.random.default_rng(3)
    X = rng.uniform(0, 1, size=(200, 6))
    classes = np.arange(n_classes)
    y = rng.choice(classes, size=200) if n_classes else rng.uniform(0, 100, size=200)
    params = [rng.normal(size=(rows, 6)) * 3, rng.normal(size=rows)]
    problem = Problem(KINDS[name], classes, (np.zeros(6), np.ones(6)), None if n_classes else (0.0, 100.0))
    score, loss = objective.evaluate(problem, params, X, y)
    fitted = KINDS[name].fitted(params, classes)
    if not n_classes:
        predicted = problem.unscale_target(fitted.predict(X))
        assert (score, loss) == pytest.approx((r2_score(y, predicted), mean_squared_error(y, predicted)), rel=1e-12)
    elif name == "svm":
        expected = hinge_loss(y, fitted.decision_function(X), labels=classes)
        assert (score, loss) == pytest.approx((fitted.score(X, y), expected), rel=1e-12)
    else:
        expected = log_loss(y, fitted.predict_proba(X), labels=classes)
        assert (score, loss) == pytest.approx((fitted.score(X, y), expected), rel=1e-12)
