"""Private and robust training: SecAgg+, DP, failing clients, robust strategies, checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfhe import TrainConfig, objective, train
from fedfhe.errors import FedfheError
from fedfhe.federated.privacy import privacy_spent
from fedfhe.federated.server_app import ServerRun
from fedfhe.federated.simulation import run_in_process
from fedfhe.partition import partition, save_partitions
from fedfhe.problem import Problem
from fedfhe.rundir import RunDir

pytestmark = [pytest.mark.xdist_group("private")]  # the plain and SecAgg+ runs, built once

BASE = TrainConfig(clients=4, rounds=1, local_iters=10, seed=0)


class RecordingGrid:
    """The real grid, plus a copy of every reply the server-side code receives."""

    def __init__(self, grid: Any) -> None:
        self.grid, self.replies = grid, []
        self.updates: list[tuple[np.ndarray, float]] = []  # (flat weights, weight) of each update, as received

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, *args: Any, **kwargs: Any) -> Any:
        replies = list(self.grid.send_and_receive(*args, **kwargs))
        self.replies += replies
        for m in replies:  # copied now: aggregation may release the arrays it has read
            if not m.has_error() and "arrays" in m.content.array_records:
                arrays = m.content.array_records["arrays"].to_numpy_ndarrays()
                self.updates.append((np.concatenate([a.ravel() for a in arrays]), m.content["metrics"]["weight"]))
        return replies


def problem(digits) -> Problem:
    """The digits problem every test here trains."""
    return BASE.problem(digits)


def run(
    digits, config: TrainConfig, folder: Path, broken: int | None = None, grid_box: list | None = None,
    poisoned: int | None = None,
):  # fmt: skip
    """Simulate with the partition files in folder; optionally corrupt one client's file, or put a NaN in its rows
    (that client then trains in earnest and replies with a NaN update)."""
    parts = partition(digits.y_train, config.clients, seed=config.seed)
    save_partitions(digits.X_train, digits.y_train, parts, folder / "p")
    if broken is not None:
        (folder / "p" / f"client-{broken}.npz").write_bytes(b"corrupt")
    if poisoned is not None:
        X = digits.X_train[parts[poisoned]].copy()
        X[0, 0] = np.nan
        np.savez(folder / "p" / f"client-{poisoned}.npz", X=X, y=digits.y_train[parts[poisoned]])
    server = ServerRun(config, config.problem(digits), digits.X_test, digits.y_test, RunDir(folder / "ck"))

    def recorded(grid, context):
        grid = RecordingGrid(grid)
        if grid_box is not None:
            grid_box.append(grid)
        server(grid, context)

    run_in_process(config, recorded, folder / "p")
    return server.params, server.log, parts


@pytest.fixture(scope="module")
def plain(digits, tmp_path_factory) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """BASE simulated with plain FedAvg: the final weights and each client's partition."""
    params, _, parts = run(digits, BASE, tmp_path_factory.mktemp("plain"))
    return params, parts


@pytest.fixture(scope="module")
def secure(digits, tmp_path_factory) -> tuple[list[np.ndarray], RecordingGrid]:
    """BASE simulated with SecAgg+: the final weights and every reply the server-side code received."""
    box: list = []
    params, _, _ = run(digits, dataclasses.replace(BASE, secagg=True), tmp_path_factory.mktemp("secagg"), grid_box=box)
    return params, box[0]


@pytest.mark.federation
def test_secagg_matches_fedavg_within_the_quantization_bound(plain, secure):
    (plain, parts), (secure, _) = plain, secure
    secagg_config = dataclasses.replace(BASE, secagg=True)
    # Each client sends ratio * w stochastically rounded to a grid of step 2*clip/Q (error < 1 step),
    # ratio = n_k / max_weight; the server divides the sum by sum(ratio): error < step / mean(ratio).
    step = 2 * secagg_config.secagg_clipping_range / secagg_config.secagg_quantization_range
    mean_ratio = np.mean([len(p) for p in parts]) / secagg_config.secagg_max_weight
    bound = step / mean_ratio + 1e-7
    for a, b in zip(plain, secure):
        assert np.abs(a - b).max() <= bound
    assert not all(np.array_equal(a, b) for a, b in zip(plain, secure))  # it really went through SecAgg+


@pytest.mark.federation
def test_server_receives_only_masked_vectors(secure, digits):
    _, grid = secure
    masked = [
        m.content.config_records["secaggplus_configs"]["masked_params"]
        for m in grid.replies
        if not m.has_error() and "masked_params" in m.content.config_records.get("secaggplus_configs", {})
    ]
    assert len(masked) == BASE.clients
    parts = partition(digits.y_train, BASE.clients, seed=0)
    from flwr.common import bytes_to_ndarray

    for client, blobs in enumerate(masked):
        coef = next(a for a in map(bytes_to_ndarray, blobs) if a.shape == (10, 64)).astype(np.float64)
        X = problem(digits).scale(digits.X_train[parts[client]])
        start = problem(digits).initial_params()
        true = objective.fit(problem(digits), start, X, digits.y_train[parts[client]], BASE.client_hyper(), 10)[0]
        assert abs(np.corrcoef(coef.ravel(), true.ravel())[0, 1]) < 0.15  # nothing of the update shows
        assert coef.min() < 2**28 and coef.max() > 2**31  # spread over the whole modulus


@pytest.mark.federation
def test_secagg_survives_a_client_dropping_after_key_sharing(tmp_path, digits):
    # A corrupt data file makes client 1 fail at local training, i.e. after the key-sharing stages.
    config = dataclasses.replace(BASE, secagg=True)
    params, log, _ = run(digits, config, tmp_path, broken=1)
    assert log.rows[1]["failures"] == 1
    assert objective.evaluate(problem(digits), params, problem(digits).scale(digits.X_test), digits.y_test)[0] > 0.85


@pytest.mark.federation
def test_failing_client_is_counted_and_the_minimum_enforced(tmp_path, digits):
    _, log, _ = run(digits, BASE, tmp_path / "a", broken=2)
    assert log.rows[1]["failures"] == 1 and [c["client"] for c in log.rows[1]["clients"]] == [0, 1, 3]
    with pytest.raises(FedfheError, match=r"round 1: only 3 of 4 clients returned an update \(--min-clients 4\)"):
        run(digits, dataclasses.replace(BASE, min_clients=4), tmp_path / "b", broken=2)


@pytest.mark.federation
def test_a_client_sending_nan_is_dropped_named_and_the_median_stays_finite(tmp_path, digits):
    config = dataclasses.replace(BASE, strategy="fedmedian", rounds=2)
    params, log, _ = run(digits, config, tmp_path, poisoned=2)
    for row in (log.rows[1], log.rows[2]):
        assert row["failures"] == 1 and row["dropped"] == [{"client": 2, "reason": "non-finite update or metrics"}]
    assert all(np.isfinite(p).all() for p in params)
    assert objective.evaluate(problem(digits), params, problem(digits).scale(digits.X_test), digits.y_test)[0] > 0.85
    with pytest.raises(FedfheError, match=r"round 1: only 3 of 4 clients returned an update \(--min-clients 4\)"):
        run(digits, dataclasses.replace(BASE, min_clients=4), tmp_path / "b", poisoned=0)


@pytest.mark.federation
def test_dp_adds_noise_and_reports_epsilon(tmp_path, digits, plain):
    config = dataclasses.replace(BASE, dp=True, noise_multiplier=1.0, clipping_norm=5.0)
    model = train(digits, config, tmp_path)
    privacy = model.metadata["metrics"]["privacy"]
    assert 0 < privacy["epsilon"] < float("inf") and privacy["delta"] == 1e-5
    assert privacy == privacy_spent(config, clipping_norm=privacy["clipping_norm"])  # the norm adapted
    rows = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert len(rows[-1]["clients"]) == BASE.clients  # clipping wraps training only: clients still evaluate
    plain_coef, _ = problem(digits).unscale(plain[0])  # as the saved model keeps them: on raw features
    assert not np.allclose(model.coef, plain_coef)


def test_more_noise_spends_less_epsilon():
    eps = [privacy_spent(dataclasses.replace(BASE, dp=True, noise_multiplier=z))["epsilon"] for z in (0.5, 1, 2)]
    assert eps[0] > eps[1] > eps[2] > 0
    assert privacy_spent(dataclasses.replace(BASE, dp=True, rounds=10))["epsilon"] > eps[1]


def fit_all(config: TrainConfig, digits, parts: list[np.ndarray], mu: float) -> list[list[np.ndarray]]:
    """Each client's round-1 update, computed here from its partition as its ClientApp should."""
    task = config.problem(digits)
    return [
        objective.fit(
            task,
            task.initial_params(),
            task.scale(digits.X_train[p]),
            digits.y_train[p],
            config.client_hyper(),
            config.local_iters,
            mu,
        )
        for p in parts
    ]


@pytest.mark.federation
@pytest.mark.parametrize("strategy", ["fedmedian", "krum", "trimmed-mean", "fedprox"])
def test_strategies_by_name(tmp_path, digits, strategy):
    config = dataclasses.replace(BASE, clients=5, strategy=strategy)
    box: list = []
    params, _, parts = run(digits, config, tmp_path, grid_box=box)
    updates = np.stack([update for update, _ in box[0].updates])
    weights = np.array([weight for _, weight in box[0].updates], dtype=np.float64)
    assert len(updates) == config.clients
    final = np.concatenate([a.ravel() for a in params])
    fedavg = weights @ updates / weights.sum()
    expected = {
        "fedmedian": np.median(updates, axis=0),
        "trimmed-mean": np.sort(updates, axis=0)[1:-1].mean(axis=0),  # beta 0.2 of 5: one cut at each end
        "fedprox": fedavg,
    }
    if strategy == "krum":  # one client's update, chosen whole
        assert any(np.array_equal(final, u) for u in updates)
    else:
        assert np.allclose(final, expected[strategy], rtol=0, atol=1e-12)
    if strategy == "fedprox":  # the proximal term reached every client: updates are fit with mu, not without
        flat = [np.concatenate([a.ravel() for a in u]) for u in fit_all(config, digits, parts, config.proximal_mu)]
        plain = [np.concatenate([a.ravel() for a in u]) for u in fit_all(config, digits, parts, 0.0)]
        assert all(any(np.allclose(u, f, rtol=0, atol=1e-9) for f in flat) for u in updates)
        assert not any(np.allclose(u, f, rtol=0, atol=1e-6) for u in updates for f in plain)
    else:
        assert not np.allclose(final, fedavg, rtol=0, atol=1e-6)
    assert objective.evaluate(problem(digits), params, problem(digits).scale(digits.X_test), digits.y_test)[0] > 0.8


@pytest.mark.federation
def test_resumed_run_ends_with_the_same_model(tmp_path, digits):
    # All clients (simulation node ids change per run); momentum: round 3 needs rounds 1-2's velocity back.
    config = dataclasses.replace(BASE, rounds=3, server_momentum=0.5)
    whole = train(digits, config, tmp_path / "whole")

    class Interrupted(Exception):
        """The run stops here, like a killed process, after round 2's checkpoint."""

    def crash(r: int, _: dict) -> None:
        if r == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(digits, config, tmp_path / "cut", on_round=crash)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["round-0001.npz", "round-0002.npz"]
    resumed = train(digits, config, tmp_path / "cut", resume=True)
    assert np.array_equal(resumed.coef, whole.coef) and np.array_equal(resumed.intercept, whole.intercept)


def test_bad_privacy_settings(digits):
    with pytest.raises(FedfheError, match="--secagg needs"):
        dataclasses.replace(BASE, secagg=True, strategy="krum")
    with pytest.raises(FedfheError, match="unknown strategy 'fedsgd'"):
        dataclasses.replace(BASE, strategy="fedsgd")
    with pytest.raises(FedfheError, match="--min-clients must be between 1 and the 4"):
        dataclasses.replace(BASE, min_clients=9)
    with pytest.raises(FedfheError, match="--dp protects each client of a federation"):
        dataclasses.replace(BASE, clients=1, dp=True)
