"""Every linear model, federated and encrypted, end to end through `fedfhe run` (small sizes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import cli

from fedfhe import TrainConfig, train
from fedfhe.data import load_dataset
from fedfhe.errors import FedfheError
from fedfhe.fhe import compile_model, evaluate
from fedfhe.problem import shared_range


@pytest.mark.federation
@pytest.mark.fhe
@pytest.mark.parametrize(
    "dataset, model, floor",
    [
        ("breast-cancer", "logistic", 0.9),
        ("breast-cancer", "svm", 0.9),
        ("digits", "svm", 0.85),
        ("diabetes", "linear", 0.25),
        ("diabetes", "ridge", 0.25),
        ("diabetes", "lasso", 0.25),
        ("diabetes", "elasticnet", 0.25),
    ],
)
def test_every_model_runs_federated_and_encrypted_with_full_agreement(tmp_path, dataset, model, floor):
    args = ["run", "--dataset", dataset, "--model", model, "--clients", "3", "--rounds", "2", "--local-iters", "10"]
    done = cli(*args, "--fhe-samples", "3", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["model"], report["dataset"], report["clients"]) == (model, dataset, 3)
    agreement = report["agreement"]
    assert agreement["fhe_vs_clear"] == agreement["execute_vs_simulate"] == agreement["execute_vs_clear"] == 1.0
    assert agreement["fhe_vs_sklearn"] is None or agreement["fhe_vs_sklearn"] >= 0.98  # n_bits 8 may flip a near-tie
    score = report["r2"] if dataset == "diabetes" else report["accuracy"]
    assert score["fhe_simulate"] > floor and abs(score["federated"] - score["centralized"]) < 0.05
    plot = "predictions.png" if dataset == "diabetes" else "confusion_matrix.png"
    assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    info = json.loads((tmp_path / "fhe" / "fhe.json").read_text())
    assert info["kind"] == model and len(info["input_low"]) == len(info["input_high"]) == info["n_features"]


@pytest.mark.federation
def test_owners_share_rounded_ranges_never_rows(tmp_path):
    data = load_dataset("breast-cancer", seed=0)
    config = TrainConfig(clients=3, rounds=1, local_iters=5, input_ranges="clients")
    model = train(data, config, tmp_path)
    low, high = model.input_range
    everything = np.vstack([data.X_train, data.X_test])
    assert (low <= everything.min(axis=0)).all() and (high >= everything.max(axis=0)).all()
    assert (high < data.input_range[1]).all()  # tighter than the declared schema
    for bound in (*low, *high):  # two significant digits at most: no exact extreme value of any row
        assert float(f"{bound:.2g}") == pytest.approx(bound, rel=1e-9, abs=1e-12)
    resumed = train(data, config, tmp_path, resume=True)  # the checkpoint kept the agreed ranges
    assert all(np.array_equal(a, b) for a, b in zip(resumed.input_range, model.input_range))
    compiled = compile_model(model, 8)
    assert np.array_equal(compiled.predict(data.X_test, "simulate"), compiled.predict(data.X_test, "disable"))


def test_shared_range_rounds_outward():
    X = np.array([[0.0, 0.05263, 143.5, -3.21, 7.0], [0.0, 0.1634, 2501.0, 7.71, 7.0]])
    low, high = shared_range(X)
    assert np.allclose(low, [0.0, 0.052, 140.0, -3.3, 7.0]) and np.allclose(high[1:4], [0.17, 2600.0, 7.8])
    assert (high > low).all()  # constant features still get a non-empty range
    X = np.array([[0.5, 2.0, -1.0, 1.0], [1.0, 7.0, 0.5, 1.0]])  # extremes numpy's powers of ten used to round inward
    low, high = shared_range(X)
    assert (low <= X.min(axis=0)).all() and (high >= X.max(axis=0)).all() and high[3] > 1  # a constant: room above


def test_params_reach_the_estimator(tmp_path):
    data = load_dataset("breast-cancer", seed=0)
    strong = train(data, TrainConfig(clients=1, params={"C": 0.01}), tmp_path / "strong")
    weak = train(data, TrainConfig(clients=1, params={"C": 100.0}), tmp_path / "weak")
    assert strong.metadata["training"]["params"] == {"C": 0.01}
    assert np.linalg.norm(strong.coef) < np.linalg.norm(weak.coef) / 10
    sparse = train(load_dataset("diabetes"), TrainConfig(clients=1, model="lasso", params={"alpha": 0.01}), tmp_path)
    assert 0 < np.sum(sparse.coef == 0) < sparse.n_features  # L1 zeroes some weights, not all


def test_concrete_engine_fits_concrete_mls_own_estimator(tmp_path):
    data = load_dataset("breast-cancer", seed=0)
    model = train(data, TrainConfig(clients=1, engine="concrete"), tmp_path)
    metrics = model.metadata["metrics"]
    assert (
        metrics["concrete_quantized"] > 0.9 and abs(metrics["final"]["score"] - metrics["centralized"]["score"]) < 0.03
    )
    compiled = compile_model(model, 8)
    assert np.array_equal(compiled.predict(data.X_test, "simulate"), compiled.predict(data.X_test, "disable"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "digits", "--model", "ridge"], "model ridge does not fit data set digits (classification)"),
        (["--dataset", "diabetes", "--model", "svm"], "use one of: linear, ridge, lasso, elasticnet"),
        (["--model", "forest"], "unknown model 'forest'"),
        (["--param", "gamma=1"], "unknown parameter 'gamma' for LogisticRegression"),
        (["--param", "C=-1"], "--param: The 'C' parameter of LogisticRegression must be"),
        (["--param", "penalty=l1"], "--param penalty applies to centralized training (--clients 1) only"),
        (["--engine", "concrete"], "--engine concrete fits Concrete ML's estimator on one machine"),
        (["--dataset", "diabetes", "--model", "lasso", "--strategy", "fedprox"], "fedprox needs an L-BFGS model"),
        (["--dataset", "diabetes", "--model", "ridge", "--partitioning", "dirichlet"], "has none (use iid)"),
    ],
)
def test_bad_model_settings_are_one_line_errors(tmp_path, args, message):
    done = cli("train", "--clients", "3", "--rounds", "1", *args, "--out", str(tmp_path))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_regressor_refuses_out_of_range_inputs(tmp_path):
    model = train(load_dataset("diabetes"), TrainConfig(clients=1, model="ridge"), tmp_path)
    row = np.array([[50, 1, 25, 90, 200, 100, 50, 4, 5, 400]], dtype=float)  # glucose 400 > declared 150
    with pytest.raises(FedfheError, match=r"test data column 9 has values in \[400, 400\]"):
        evaluate(compile_model(model, 6), row, np.array([100.0]), 0, tmp_path)
