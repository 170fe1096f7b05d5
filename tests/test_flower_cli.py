"""Flower's own CLI on fedfhe's app: docs/deployment.md's commands, as a Flower user types them from a checkout."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_federation import orphans

from fedfhe import TrainConfig, train
from fedfhe.federated import deployment
from fedfhe.model import LinearModel

pytestmark = [pytest.mark.federation, pytest.mark.server]

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- flwr-cli: tests/test_flower_cli.py runs these lines as written -->", "<!-- flwr-cli: end -->"


def readme_commands() -> list[str]:
    """The command lines of the Flower-CLI block in docs/deployment.md, comments dropped."""
    block = (ROOT / "docs" / "deployment.md").read_text().split(BEGIN)[1].split(END)[0]
    lines = block.split("```bash\n")[1].split("```")[0].splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip()]


@pytest.fixture
def checkout(tmp_path) -> tuple[Path, dict[str, str]]:
    """A checkout as `make demo` leaves it (the app's pyproject.toml, .venv) and a shell's environment.

    FLWR_HOME is the test's own, and so are the local SuperLink's ports: a developer's Flower is left alone.
    RAY_ADDRESS stays: Flower's simulation joins the suite's Ray cluster (one CPU, which the ClientApps
    `fedfhe flower start` configures fit) instead of starting Ray, as a user's shell would.
    """
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    (project / ".venv").symlink_to(deployment.BIN.parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != deployment.BIN)
    env = {
        **os.environ,
        "PATH": path,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(deployment.free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(deployment.free_port()),
        "COLUMNS": "200",
    }
    return project, env


@pytest.fixture(scope="session")
def simulated(once, digits) -> LinearModel:
    """The simulation of what docs/deployment.md runs: digits, 3 clients, 2 rounds, Flower's defaults otherwise."""
    return LinearModel.load(
        once("flwr-simulated", lambda out: train(digits, TrainConfig(clients=3, rounds=2), out)) / "model.npz"
    )


def shell(command: str, project: Path, env: dict[str, str], activate: str) -> str:
    """One documented line in bash from the checkout, after the activation line; its output, or a failure."""
    done = subprocess.run(
        ["bash", "-c", f"{activate} && {command}"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{command}: {(done.stdout + done.stderr)[-1500:]}"
    return done.stdout + done.stderr


def test_the_documented_flower_commands_train_the_simulation_model(checkout, tmp_path, simulated):
    project, env = checkout
    activate, start, run, ls, log, stop = readme_commands()
    assert activate == "source .venv/bin/activate" and stop == "fedfhe flower stop"
    try:
        assert "local SuperLink on 127.0.0.1" in shell(start, project, env, activate)
        shell(run, project, env, activate)
        assert "finished" in shell(ls, project, env, activate)
        (row,) = deployment.flwr(env, "ls")["runs"]
        assert row["status"] == "finished:completed"
        assert "[ROUND 2/2]" in shell(log.replace("<run-id>", str(row["run-id"])), project, env, activate)
    finally:
        stopped = shell(stop, project, env, activate)
    assert "stopped the local SuperLink" in stopped
    assert orphans(tmp_path) == []
    flwr_run = LinearModel.load(project / "runs" / "flwr" / "model.npz")
    assert np.allclose(flwr_run.coef, simulated.coef, rtol=0, atol=1e-8)
    metrics = json.loads((project / "runs" / "flwr" / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2] and len(metrics["rounds"][-1]["clients"]) == 3
    assert shell(stop, project, env, activate).strip() == "no local SuperLink was running"


def test_flwr_run_dot_on_a_running_deployment_superlink(checkout, tmp_path, simulated):
    project, env = checkout
    activate, *_ = readme_commands()
    port = deployment.free_port()
    home = Path(env["FLWR_HOME"])
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.fedfhe]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    with deployment.Processes({**env, "PATH": f"{deployment.BIN}{os.pathsep}{env['PATH']}"}, logs) as procs:
        procs.start("superlink", deployment.superlink_command(port, None, tmp_path / "superlink.db"), cwd=project)
        deployment.wait_until(lambda: deployment._listening(port), 60, "the SuperLink")
        for i in range(3):
            node_config = f"dataset='digits' partition-id={i} num-partitions=3"
            procs.start(
                f"node-{i}", deployment.supernode_command(port, None, None, node_config), cwd=tmp_path / f"n{i}"
            )
        settings = "clients=3 num-server-rounds=2 dataset='digits' out-dir='runs/deployed'"
        shell(f'flwr run . fedfhe --run-config "{settings}"', project, env, activate)
        model = project / "runs" / "deployed" / "model.npz"

        def finished() -> bool:
            return (
                model.exists()
                and str(deployment.flwr(env, "ls", "fedfhe")["runs"][0]["status"]) == "finished:completed"
            )

        deployment.wait_until(finished, 300, "the deployed run")
    assert orphans(tmp_path) == []
    deployed = LinearModel.load(model)
    assert np.allclose(deployed.coef, simulated.coef, rtol=0, atol=1e-8)


def test_flowers_own_local_superlink_is_refused_then_stopped(checkout, tmp_path):
    project, env = checkout
    activate, *_ = readme_commands()
    try:
        shell("flwr ls", project, env, activate)  # no SuperLink yet: Flower starts its own, which installs apps
        refused = subprocess.run(
            ["bash", "-c", f"{activate} && fedfhe flower start"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert refused.returncode == 2
        assert "Flower's own local SuperLink" in refused.stderr and "stop it first" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    finally:
        stopped = shell("fedfhe flower stop", project, env, activate)
    assert "stopped the local SuperLink" in stopped
    assert orphans(tmp_path) == []
