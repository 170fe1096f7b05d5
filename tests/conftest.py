"""Shared helpers (CLI runner, environment, free port) and fixtures reused across tests (data, one trained run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from fedfhe.federated.deployment import free_port

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
FEDFHE = [sys.executable, "-m", "fedfhe"]
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

__all__ = ["ENV", "FEDFHE", "Served", "fedfhe", "fhe_client", "free_port", "key_id", "serving", "wait_for"]


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


class Served(NamedTuple):
    """A running server: its URL, log file, key store and process id."""

    url: str
    log: Path
    store: Path
    pid: int


@contextmanager
def serving(
    run_dir: Path, store: Path, log: Path, *options: str, verify: Any = True, nofile: int | None = None
) -> Iterator[Served]:
    """A real `fedfhe serve` on a free loopback port (https with --tls-cert), stopped and reaped whatever happens.

    `nofile` caps the server's open descriptors (ulimit -n) before it starts.
    """
    port = free_port()
    url = f"{'https' if '--tls-cert' in options else 'http'}://127.0.0.1:{port}"
    args = ["serve", "--run", str(run_dir), "--port", str(port), "--key-store", str(store), *options]

    command = [*FEDFHE, *args]
    if nofile is not None:  # as a shell would start it after `ulimit -n`
        command = ["bash", "-c", f'ulimit -n {nofile} && exec "$@"', "bash", *command]
    with open(log, "ab") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=ENV)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "server did not become healthy in 90 s"
            try:
                if httpx.get(f"{url}/v1/health", timeout=1, verify=verify).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield Served(url, log, store, proc.pid)
    finally:
        proc.terminate()  # SIGTERM: uvicorn shuts down and the pool stops its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fhe_client(key_dir: Path) -> Any:
    """The Concrete client behind an EncryptedClient's key directory (same spec, same private key)."""
    from concrete.ml.deployment import FHEModelClient

    client = FHEModelClient(str(key_dir), key_dir=str(key_dir / "keys"))
    client.generate_private_and_evaluation_keys()  # loads the keys already in key_dir
    return client


def key_id(key_dir: Path) -> str:
    """The evaluation key id an EncryptedClient uploaded from this key directory."""
    return str(json.loads((key_dir / "session.json").read_text())["key_id"])


def pytest_sessionfinish(session, exitstatus) -> None:
    """Keep pytest's exit status: tests that import Concrete directly register its exit hook (fhe.keep_exit_status)."""
    from fedfhe.fhe import keep_exit_status

    keep_exit_status()


@pytest.fixture(scope="session")
def served_run(tmp_path_factory) -> Path:
    """One run to serve: digits, trained centrally, compiled at 6 bits."""
    out = tmp_path_factory.mktemp("service") / "run"
    done = fedfhe(
        "run", "--dataset", "digits", "--clients", "1", "--n-bits", "6", "--fhe-samples", "0", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    return out


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
