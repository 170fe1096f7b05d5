"""Flower's Deployment Engine on loopback: TLS, node authentication, failures, no orphans."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import ENV, fedfhe

from fedfhe import TrainConfig, train
from fedfhe.errors import FedfheError
from fedfhe.federated import certificates, deployment
from fedfhe.model import LinearModel


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
    path = deployment.up(digits, config, tmp_path / "deployed")
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

    def hook(procs: deployment.Processes) -> None:
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
    deployment.up(digits, config, out, on_started=kill_after_round_one(out))
    metrics = LinearModel.load(out / "model.npz").metadata["metrics"]
    assert metrics["final"]["score"] > 0.85
    failures = json.loads((out / "metrics.json").read_text())["failures"]
    assert failures >= 1
    assert orphans(tmp_path) == []


def test_killed_supernode_below_the_minimum_ends_with_a_clear_message(tmp_path, digits):
    out = tmp_path / "run"
    with pytest.raises(FedfheError, match=r"ended finished:failed: .*only 2 of 3 clients"):
        config = TrainConfig(clients=3, rounds=2, local_iters=10, min_clients=3, round_timeout=20)
        deployment.up(digits, config, out, on_started=kill_after_round_one(out))
    assert orphans(tmp_path) == []


def test_unregistered_or_untrusting_supernodes_are_refused(tmp_path):
    certs = certificates.make_certificates(tmp_path / "certs")
    other = certificates.make_certificates(tmp_path / "other-ca")
    port = deployment.free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "FLWR_TELEMETRY_ENABLED": "0"}
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "{deployment.CONNECTION}"\n\n[superlink.{deployment.CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n'
    )
    env["PATH"] = f"{deployment.BIN}{os.pathsep}{env['PATH']}"
    registered, public = certificates.make_node_key(tmp_path / "keys", "registered")
    stranger, _ = certificates.make_node_key(tmp_path / "keys", "stranger")
    with deployment.Processes(env, tmp_path) as procs:
        procs.start("superlink", deployment.superlink_command(port, certs, tmp_path / "db"), cwd=tmp_path)
        deployment.wait_until(lambda: deployment._listening(port), 60, "the SuperLink")
        deployment.flwr(env, "supernode", "register", str(public), deployment.CONNECTION)
        cases = {
            "stranger": (deployment.supernode_command(port, certs, stranger, "x=1"), "Failed to activate SuperNode"),
            "no-ca": (deployment.supernode_command(port, other, registered, "x=1"), "CERTIFICATE_VERIFY_FAILED"),
        }
        for name, (command, message) in cases.items():
            node = procs.start(name, command, cwd=tmp_path / name)
            assert node.wait(timeout=60) != 0
            log = (tmp_path / f"{name}.log").read_text()
            assert message in log, (name, log[-500:])
    assert orphans(tmp_path) == []


def test_bad_federation_requests(tmp_path, digits):
    with pytest.raises(FedfheError, match="--clients 5000 is more than"):
        deployment.up(digits, TrainConfig(clients=5000), tmp_path / "many")
    with pytest.raises(FedfheError, match="--secagg and --dp run on the simulation engine only"):
        deployment.up(digits, TrainConfig(clients=3, secagg=True), tmp_path / "secagg")
    done = fedfhe("federation", "up", "--dataset", "nope", "--out", str(tmp_path))
    assert done.returncode == 2 and "unknown data set 'nope'" in done.stderr
    done = fedfhe("federation", "up", "--dataset", "digits", "--strategy", "fedsgd", "--out", str(tmp_path))
    assert done.returncode == 2 and "unknown strategy 'fedsgd'" in done.stderr
    assert not (tmp_path / "many").exists() and orphans(tmp_path) == []


def test_deployment_trains_a_regressor_on_ranges_the_owners_share(tmp_path):
    from fedfhe.data import load_dataset

    diabetes = load_dataset("diabetes", seed=0)
    config = TrainConfig(
        clients=3, rounds=1, local_iters=5, model="ridge", params={"alpha": 0.1}, input_ranges="clients"
    )
    path = deployment.up(diabetes, config, tmp_path / "run")
    model = LinearModel.load(path)
    assert model.kind.name == "ridge" and model.metadata["training"]["params"] == {"alpha": 0.1}
    assert model.metadata["metrics"]["final"]["score"] > 0.2  # R2 after one round
    low, high = model.input_range  # agreed over gRPC by query messages, tighter than the schema
    assert (high < diabetes.input_range[1]).any() and (low <= diabetes.X_train.min(axis=0)).all()
    assert orphans(tmp_path) == []


def test_an_installed_wheel_trains_on_the_deployment_engine_from_outside_the_checkout(tmp_path):
    root, source = Path(__file__).resolve().parents[1], tmp_path / "source"  # built from a copy: no build/ here
    shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp_path / "wheel"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("fedfhe-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**ENV, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import fedfhe; print(fedfhe.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(site)  # the wheel's copy, not the checkout's
    args = [
        "-m",
        "fedfhe",
        "federation",
        "up",
        "--dataset",
        "digits",
        "--clients",
        "2",
        "--rounds",
        "1",
        "--out",
        "run",
    ]
    done = subprocess.run(
        [sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    model = LinearModel.load(elsewhere / "run" / "model.npz")
    assert model.metadata["training"]["clients"] == 2 and model.metadata["metrics"]["final"]["score"] > 0.8
    app = elsewhere / "run" / "federation" / "app"
    assert [p.name for p in app.iterdir()] == ["pyproject.toml"]  # no source: the SuperExec imports the wheel
    assert orphans(tmp_path) == []
