"""Shared helpers (CLI runner, environment, free port) and fixtures reused across tests (data, one trained run)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedfhe.federated.deployment import free_port

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
FEDFHE = [sys.executable, "-m", "fedfhe"]
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

__all__ = ["ENV", "FEDFHE", "fedfhe", "free_port", "wait_for"]


def fedfhe(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real CLI (`python -m fedfhe ARGS`) in a subprocess; its output is captured as text."""
    return subprocess.run(
        [*FEDFHE, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout, check=False
    )


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll until the condition holds; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled 8x8 digits, split with seed 0."""
    from fedfhe.data import load_dataset

    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def federated_run(tmp_path_factory, digits) -> Path:
    """A real Flower simulation: digits, 3 clients, 2 rounds; its run directory."""
    from fedfhe import TrainConfig, train

    out = tmp_path_factory.mktemp("federated")
    rounds: list[int] = []
    train(digits, TrainConfig(clients=3, rounds=2, local_iters=10, seed=0), out, on_round=lambda r, m: rounds.append(r))
    assert rounds == [0, 1, 2]
    return out
