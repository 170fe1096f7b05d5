"""--class-weight: each class's weight in every client's loss, balanced from the owners' federated class counts."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import cli

from fedfhe import TrainConfig, train
from fedfhe.data import load_dataset
from fedfhe.federated.server_app import ServerRun
from fedfhe.kinds import KINDS
from fedfhe.objective import fit
from fedfhe.problem import Problem
from fedfhe.rundir import RunDir


def imbalanced_breast_cancer():
    """breast-cancer with 9 in 10 malignant training rows left out: about 6% malignant (the minority, class 0)."""
    data = load_dataset("breast-cancer", seed=0)
    malignant = np.flatnonzero(data.y_train == 0)
    kept = np.setdiff1d(np.arange(len(data.y_train)), malignant[len(malignant) // 10 :])
    return dataclasses.replace(data, X_train=data.X_train[kept], y_train=data.y_train[kept])


@pytest.mark.parametrize("kind", ["logistic", "svm"])
def test_a_class_weight_counts_each_row_of_its_class_that_many_times(kind):
    data = load_dataset("breast-cancer", seed=0)
    plain = Problem(KINDS[kind], data.classes, data.input_range)
    weighed = dataclasses.replace(plain, class_weight=np.array([3.0, 1.0]))
    X, y = plain.scale(data.X_train), data.y_train
    tripled = np.concatenate([np.flatnonzero(y == 0)] * 2 + [np.arange(len(y))])  # class 0's rows three times
    hyper = {"C": 1.0}
    by_weight = fit(weighed, plain.initial_params(), X, y, hyper, 300)
    by_rows = fit(plain, plain.initial_params(), X[tripled], y[tripled], hyper, 300)
    unweighed = fit(plain, plain.initial_params(), X, y, hyper, 300)
    for a, b in zip(by_weight, by_rows):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert not np.allclose(by_weight[1], unweighed[1], atol=1e-2)


@pytest.mark.federation
def test_balanced_weights_from_the_owners_counts_raise_minority_recall(tmp_path):
    data = imbalanced_breast_cancer()
    settings = {"clients": 3, "rounds": 2, "local_iters": 10}
    plain = train(data, TrainConfig(**settings), tmp_path / "plain")
    balanced = train(data, TrainConfig(**settings, class_weight="balanced"), tmp_path / "balanced")
    malignant = data.y_test == 0

    def recall(model) -> float:
        return float(np.mean(model.to_sklearn().predict(data.X_test[malignant]) == 0))

    assert recall(balanced) > recall(plain) + 0.2
    counts = [int(np.sum(data.y_train == c)) for c in data.classes]
    metrics = json.loads((tmp_path / "balanced" / "metrics.json").read_text())
    assert metrics["class_counts"] == counts and "class_counts" not in json.loads(
        RunDir(tmp_path / "plain").metrics_file.read_text()
    )
    # the centralized reference weighs as the clients did: scikit-learn's class_weight="balanced"
    reference = train(data, TrainConfig(clients=1, params={"class_weight": "balanced"}), tmp_path / "sklearn")
    assert metrics["centralized"] == reference.metadata["metrics"]["centralized"]
    resumed = train(data, TrainConfig(**settings, class_weight="balanced"), tmp_path / "balanced", resume=True)
    assert np.array_equal(resumed.coef, balanced.coef)
    assert resumed.metadata["metrics"]["centralized"] == metrics["centralized"]  # the counts came from the checkpoint


def test_named_weights_reach_the_clients_through_the_run_config(tmp_path):
    data = load_dataset("breast-cancer", seed=0)
    config = TrainConfig.from_run_config({"clients": 3, "class-weight": "malignant=4"})
    server = ServerRun(config, config.problem(data), data.X_test, data.y_test, RunDir(tmp_path))
    told = Problem.from_config(server.client_config())  # what a ClientApp reads from each train message
    assert told.class_weight is not None and told.class_weight.tolist() == [4.0, 1.0]
    assert Problem.from_config(TrainConfig().problem(data).to_config()).class_weight is None  # the default
    assert TrainConfig.from_run_config({"class-weight": ""}).class_weight is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--class-weight", "yes"], "--class-weight must be balanced or CLASS=WEIGHT,... (got 'yes')"),
        (["--class-weight", "malignant=0"], "--class-weight malignant: the weight must be a positive number (got '0')"),
        (["--class-weight", "malignant=x"], "the weight must be a positive number (got 'x')"),
        (["--class-weight", "malignant=2,malignant=3"], "--class-weight names class 'malignant' twice"),
        (["--class-weight", "sick=2"], "breast-cancer has no class 'sick' (classes: malignant, benign)"),
        (["--param", "class_weight=balanced"], "only; federated logistic uses: C (class weights: --class-weight)"),
        (["--clients", "1", "--class-weight", "balanced", "--param", "class_weight=balanced"], "not both"),
        (["--model", "ridge", "--dataset", "diabetes", "--class-weight", "balanced"], "applies to classifiers"),
    ],
)
def test_bad_class_weights_are_one_line_errors(tmp_path, args, message):
    done = cli("train", "--dataset", "breast-cancer", "--clients", "3", *args, "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
