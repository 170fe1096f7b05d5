"""Accuracy-vs-latency tuning over quantization bits."""

from __future__ import annotations

import json

import pytest
from conftest import cli

from fedfhe import TrainConfig, train, tuning
from fedfhe.artifacts import bit_pair, n_bits_label, parse_n_bits
from fedfhe.errors import FedfheError
from fedfhe.rundir import RunDir


@pytest.fixture(scope="module")
def central_model(tmp_path_factory, digits):
    return train(digits, TrainConfig(clients=1), tmp_path_factory.mktemp("central"))


@pytest.mark.fhe
def test_sweep_measures_every_point_and_recommends_the_fastest_accurate_one(central_model, digits, tmp_path):
    points = tuning.tune(central_model, digits.X_test, digits.y_test, {"n_bits": [3, 6]}, latency_samples=2)
    assert [p["n_bits"] for p in points] == [3, 6]
    for p in points:
        assert 0.5 < p["accuracy"] <= 1 and p["server_ms"] > 0 and p["output_bytes"] > p["input_bytes"] / 10
    assert points[0]["max_bit_width"] < points[1]["max_bit_width"]
    chosen = tuning.recommend(points)
    best = max(p["accuracy"] for p in points)
    assert chosen["accuracy"] >= best - tuning.TOLERANCE
    assert all(p["server_ms"] >= chosen["server_ms"] for p in points if p["accuracy"] >= best - tuning.TOLERANCE)
    assert all(p["param"] == {} for p in points) and tuning.label(points[0]) == "3 bits"
    tuning.write(RunDir(tmp_path), points, chosen)
    assert json.loads((tmp_path / "tune.json").read_text())["recommended"]["n_bits"] == chosen["n_bits"]
    assert "(recommended)" in (tmp_path / "tune.md").read_text()
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_recommend_prefers_speed_within_tolerance():
    points = [
        {"n_bits": 8, "accuracy": 0.900, "server_ms": 100.0},
        {"n_bits": 4, "accuracy": 0.897, "server_ms": 70.0},
        {"n_bits": 2, "accuracy": 0.800, "server_ms": 60.0},
    ]
    assert tuning.recommend(points)["n_bits"] == 4


@pytest.mark.parametrize("text, n_bits", [("6", 6), ("6/4", {"op_inputs": 6, "op_weights": 4}), (" 5 / 5", 5)])
def test_n_bits_are_written_n_or_inputs_slash_weights(text, n_bits):
    assert parse_n_bits(text) == n_bits and parse_n_bits(n_bits_label(n_bits)) == n_bits


@pytest.mark.parametrize(
    "text, message",
    [("x", "takes N or INPUTS/WEIGHTS"), ("6/4/2", "takes N or"), ("6/", "takes N or"), ("-4", "takes N or"),
     ("6/1", r"between 2 and 12 \(got 6/1\)"), ("13", r"between 2 and 12 \(got 13\)")],
)  # fmt: skip
def test_bad_n_bits_are_refused_in_one_line(text, message):
    with pytest.raises(FedfheError, match=message):
        parse_n_bits(text)


def test_neighbours_are_the_unmeasured_widths_one_step_from_the_choice():
    points = [{"n_bits": b, "param": {}} for b in (2, 3, 4, 5)] + [{"n_bits": 4, "param": {"C": 10.0}}]
    around = tuning.neighbours(points, points[2])
    assert sorted(map(bit_pair, around)) == [(3, 4), (3, 5), (4, 3), (4, 5), (5, 3), (5, 4)]
    assert tuning.neighbours(points, points[0]) == [
        {"op_inputs": 2, "op_weights": 3},
        {"op_inputs": 3, "op_weights": 2},
    ]
    assert len(tuning.neighbours(points, points[4])) == 8  # another model: only its own point was measured


def test_bad_tuning_requests(central_model, digits):
    with pytest.raises(FedfheError, match="--latency-samples must be between 1 and the 360"):
        tuning.tune(central_model, digits.X_test, digits.y_test, {"n_bits": [4]}, latency_samples=0)
    with pytest.raises(FedfheError, match="--n-bits must be between 2 and 12"):
        tuning.tune(central_model, digits.X_test, digits.y_test, {"n_bits": [1]}, latency_samples=1)


@pytest.mark.federation
@pytest.mark.fhe
def test_sweep_retrains_per_regularisation_value_without_touching_the_run(tmp_path):
    run = tmp_path / "run"
    args = ["--dataset", "breast-cancer", "--model", "svm", "--clients", "3", "--rounds", "1", "--local-iters", "5"]
    assert cli("train", *args, "--out", str(run)).returncode == 0
    before = (run / "model.npz").read_bytes()
    done = cli("tune", "--run", str(run), "--n-bits", "3,6", "--sweep", "C=0.01,1", "--latency-samples", "2")
    assert done.returncode == 0, done.stderr
    tuned = json.loads((run / "tune.json").read_text())
    grid, around = tuned["points"][:4], tuned["points"][4:]
    assert sorted((p["param"]["C"], p["n_bits"]) for p in grid) == [(0.01, 3), (0.01, 6), (1, 3), (1, 6)]
    first = tuning.recommend(grid)  # then its model, read back from RUN/tune/, at widths one step from it
    assert around and all(p["param"] == first["param"] for p in around)
    assert {bit_pair(p["n_bits"]) for p in around} == {bit_pair(n) for n in tuning.neighbours(grid, first)}
    for value in ("0.01", "1"):
        assert (run / "tune" / f"C={value}" / "model.npz").is_file()
    chosen = tuned["recommended"]["param"]["C"]
    assert (run / "tune" / f"C={chosen:g}" / "fhe" / "client.zip").is_file()
    assert (run / "model.npz").read_bytes() == before  # the run's own model is never replaced
    for sweep, message in (("max_iter=10,20", "--param max_iter applies to centralized"), ("C=x", "NAME=V1,V2")):
        done = cli("tune", "--run", str(run), "--sweep", sweep)
        assert done.returncode == 2 and message in done.stderr
