"""Shared fixtures: small real data sets and one trained model reused across tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled 8x8 digits, split with seed 0."""
    from fedfhe.data import load_dataset

    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def federated_run(tmp_path_factory, digits) -> Path:
    """A real Flower simulation: digits, 3 clients, 2 rounds; its run directory."""
    from fedfhe.federated.task import TrainConfig
    from fedfhe.training import train

    out = tmp_path_factory.mktemp("federated")
    rounds: list[int] = []
    train(digits, TrainConfig(clients=3, rounds=2, local_iters=10, seed=0), out, on_round=lambda r, m: rounds.append(r))
    assert rounds == [0, 1, 2]
    return out
