"""A real Flower simulation (small): metrics per round and per client, a saved model."""

from __future__ import annotations

import json
import re

import pytest

from fedfhe import TrainConfig, run, train
from fedfhe.errors import FedfheError
from fedfhe.model import LinearModel


@pytest.mark.federation
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
        ({"seed": -1}, r"--seed must be between 0 and 2\*\*32 - 1 \(got -1\)"),
        ({"seed": 2**32}, r"--seed must be between 0 and 2\*\*32 - 1"),
        ({"clients": 1400, "partitioning": "dirichlet", "alpha": 0.001}, "cannot partition 1437 samples"),
        ({"secagg_threshold": 1.5}, r"--secagg-threshold must be a fraction in \(0, 1\) or a whole number"),
    ],
)
def test_bad_training_settings(tmp_path, digits, settings, message):
    with pytest.raises(FedfheError, match=message):
        train(digits, TrainConfig(**settings), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused: not even the folder is made


def test_a_folder_holding_a_run_is_refused_unless_force(tmp_path, digits):
    config = TrainConfig(clients=1)
    train(digits, config, tmp_path)
    (tmp_path / "fhe").mkdir()
    (tmp_path / "fhe" / "client.zip").write_bytes(b"the old run's circuit")
    (tmp_path / "report.md").write_text("the old run's report")
    (tmp_path / "notes.txt").write_text("not fedfhe's")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for again in (lambda: train(digits, config, tmp_path), lambda: run(digits, config, tmp_path, fhe_samples=1)):
        with pytest.raises(FedfheError, match=re.escape(f"{tmp_path} already holds a run: pass --force")):
            again()
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    train(digits, config, tmp_path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model.npz", "notes.txt", "train_config.json"]


@pytest.mark.federation
def test_same_seed_gives_the_same_model(federated_run, digits, tmp_path):
    again = train(digits, TrainConfig(clients=3, rounds=2, local_iters=10, seed=0), tmp_path)
    first = LinearModel.load(federated_run / "model.npz")
    assert (again.coef == first.coef).all() and (again.intercept == first.intercept).all()


@pytest.mark.federation
def test_evaluate_messages_every_round_score_what_the_train_replies_scored(federated_run, digits, tmp_path):
    """By default a train reply scores the model it received; evaluate messages per round give the same figures."""
    every = train(digits, TrainConfig(clients=3, rounds=2, local_iters=10, seed=0, evaluate_every_round=True), tmp_path)
    default = LinearModel.load(federated_run / "model.npz")
    assert (every.coef == default.coef).all()
    rows = {name: json.loads((run / "metrics.json").read_text())["rounds"] for name, run in
            (("every", tmp_path), ("default", federated_run))}  # fmt: skip
    assert "clients" not in rows["every"][0]  # round 0's model is scored by round 1's train replies only
    assert "clients" in rows["default"][0]
    for every_row, default_row in zip(rows["every"][1:], rows["default"][1:]):
        assert every_row["clients"] == default_row["clients"]  # the same model scored on the same data
