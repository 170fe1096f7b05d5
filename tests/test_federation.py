"""Flower's Deployment Engine on loopback: TLS, node authentication, failures, no orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from fedfhe import federation
from fedfhe.errors import FedfheError
from fedfhe.federated.task import TrainConfig
from fedfhe.model import LinearModel
from fedfhe.training import train


def orphans(folder: Path) -> list[str]:
    """Processes still running whose command line mentions the folder."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if str(folder) in cmd and proc.pid != os.getpid():
            found.append(cmd[:120])
    return found


def test_deployment_with_tls_and_auth_gives_the_simulation_model(tmp_path, digits):
    config = TrainConfig(clients=3, rounds=2, local_iters=10)
    path = federation.up(digits, config, tmp_path / "deployed")
    simulated = train(digits, config, tmp_path / "simulated")
    deployed = LinearModel.load(path)
    # Same files, same config, replies summed in content order: the same model. Not asserted bit for
    # bit: a ClientApp process may use more BLAS threads than a Ray actor, which reorders float sums.
    assert np.allclose(deployed.coef, simulated.coef, rtol=0, atol=1e-8)
    assert np.allclose(deployed.intercept, simulated.intercept, rtol=0, atol=1e-8)
    assert (tmp_path / "deployed" / "federation" / "certs" / "ca.crt").is_file()
    assert orphans(tmp_path) == []


def kill_after_round_one(out: Path):
    """on_started hook: SIGKILL SuperNode 2 once round 1's checkpoint exists."""

    def hook(procs: federation.Processes) -> None:
        def killer() -> None:
            deadline = time.monotonic() + 120
            while not (out / "checkpoints" / "round-0001.npz").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            procs.stop("supernode-2", signal.SIGKILL)

        threading.Thread(target=killer, daemon=True).start()

    return hook


def test_killed_supernode_run_completes_with_the_others(tmp_path, digits):
    out = tmp_path / "run"
    config = TrainConfig(clients=3, rounds=2, local_iters=10, min_clients=2, round_timeout=20)
    federation.up(digits, config, out, on_started=kill_after_round_one(out))
    metrics = LinearModel.load(out / "model.npz").metadata["metrics"]
    assert metrics["final"]["score"] > 0.85
    failures = json.loads((out / "metrics.json").read_text())["failures"]
    assert failures >= 1
    assert orphans(tmp_path) == []


def test_killed_supernode_below_the_minimum_ends_with_a_clear_message(tmp_path, digits):
    out = tmp_path / "run"
    with pytest.raises(FedfheError, match=r"ended finished:failed: .*only 2 of 3 clients"):
        config = TrainConfig(clients=3, rounds=2, local_iters=10, min_clients=3, round_timeout=20)
        federation.up(digits, config, out, on_started=kill_after_round_one(out))
    assert orphans(tmp_path) == []


def test_unregistered_or_untrusting_supernodes_are_refused(tmp_path):
    certs = federation.make_certificates(tmp_path / "certs")
    other = federation.make_certificates(tmp_path / "other-ca")
    port = federation.free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "FLWR_TELEMETRY_ENABLED": "0"}
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "{federation.CONNECTION}"\n\n[superlink.{federation.CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n'
    )
    env["PATH"] = f"{federation.BIN}{os.pathsep}{env['PATH']}"
    registered, public = federation.make_node_key(tmp_path / "keys", "registered")
    stranger, _ = federation.make_node_key(tmp_path / "keys", "stranger")
    with federation.Processes(env, tmp_path) as procs:
        procs.start("superlink", federation.superlink_command(port, certs, tmp_path / "db"), cwd=tmp_path)
        federation.wait_until(lambda: federation._listening(port), 60, "the SuperLink")
        federation.flwr(env, "supernode", "register", str(public), federation.CONNECTION)
        cases = {
            "stranger": (federation.supernode_command(port, certs, stranger, "x=1"), "Failed to activate SuperNode"),
            "no-ca": (federation.supernode_command(port, other, registered, "x=1"), "CERTIFICATE_VERIFY_FAILED"),
        }
        for name, (command, message) in cases.items():
            node = procs.start(name, command, cwd=tmp_path / name)
            assert node.wait(timeout=60) != 0
            log = (tmp_path / f"{name}.log").read_text()
            assert message in log, (name, log[-500:])
    assert orphans(tmp_path) == []


def test_bad_federation_requests(tmp_path, digits):
    with pytest.raises(FedfheError, match="--clients 5000 is more than"):
        TrainConfig(clients=5000).check(len(digits.y_train))
    done = subprocess.run(
        [str(federation.BIN / "fedfhe"), "federation", "up", "--dataset", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "unknown data set 'nope'" in done.stderr


def test_deployment_trains_a_regressor_on_ranges_the_owners_share(tmp_path):
    from fedfhe.data import load_dataset

    diabetes = load_dataset("diabetes", seed=0)
    config = TrainConfig(
        clients=3, rounds=1, local_iters=5, model="ridge", params={"alpha": 0.1}, input_ranges="clients"
    )
    path = federation.up(diabetes, config, tmp_path / "run")
    model = LinearModel.load(path)
    assert model.kind == "ridge" and model.metadata["training"]["params"] == {"alpha": 0.1}
    assert model.metadata["metrics"]["final"]["score"] > 0.2  # R2 after one round
    low, high = model.input_range  # agreed over gRPC by query messages, tighter than the schema
    assert (high < diabetes.input_range[1]).any() and (low <= diabetes.X_train.min(axis=0)).all()
    assert orphans(tmp_path) == []
