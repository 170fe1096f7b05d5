"""A real Flower simulation (small): metrics per round and per client, a saved model."""

from __future__ import annotations

import json

import pytest

from fedfhe import TrainConfig, train
from fedfhe.errors import FedfheError
from fedfhe.model import LinearModel


def test_federated_run_writes_model_metrics_and_plots(federated_run, digits):
    metrics = json.loads((federated_run / "metrics.json").read_text())
    assert [row["round"] for row in metrics["rounds"]] == [0, 1, 2]
    last = metrics["rounds"][-1]
    assert [c["client"] for c in last["clients"]] == [0, 1, 2]
    assert all(0.8 < c["score"] <= 1 for c in last["clients"])
    assert metrics["rounds"][0]["global"]["score"] < 0.2 and last["global"]["score"] > 0.85
    assert abs(metrics["final"]["score"] - metrics["centralized"]["score"]) < 0.05
    for name in ("training.png", "partitions.png"):
        assert (federated_run / name).read_bytes()[:4] == b"\x89PNG"
    model = LinearModel.load(federated_run / "model.npz")
    assert model.coef.shape == (10, 64) and model.metadata["training"]["clients"] == 3
    assert model.to_sklearn().score(digits.X_test, digits.y_test) == pytest.approx(metrics["final"]["score"])


def test_one_client_trains_centrally(tmp_path, digits):
    model = train(digits, TrainConfig(clients=1), tmp_path)
    metrics = model.metadata["metrics"]
    assert metrics["final"] == metrics["centralized"]
    assert not (tmp_path / "partitions").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rounds": 0}, "--rounds must be at least 1"),
        ({"clients": 0}, "--clients must be at least 1"),
        ({"clients": 2000}, "--clients 2000 is more than the 1437 training samples"),
        ({"fraction": 1.5}, "--fraction must be in"),
        ({"clients": "3"}, "--clients must be int"),
    ],
)
def test_bad_training_settings(tmp_path, digits, settings, message):
    with pytest.raises(FedfheError, match=message):
        train(digits, TrainConfig(**settings), tmp_path)
    assert not (tmp_path / "train_config.json").exists()


def test_same_seed_gives_the_same_model(federated_run, digits, tmp_path):
    again = train(digits, TrainConfig(clients=3, rounds=2, local_iters=10, seed=0), tmp_path)
    first = LinearModel.load(federated_run / "model.npz")
    assert (again.coef == first.coef).all() and (again.intercept == first.intercept).all()
