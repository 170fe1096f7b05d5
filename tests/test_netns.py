"""Flower's Deployment Engine across network namespaces: the SuperLink and each SuperNode on an address of its own."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from conftest import FEDERATED
from test_federation import orphans

from fedfhe import TrainConfig
from fedfhe.federated import certificates, deployment, supernode
from fedfhe.model import LinearModel

pytestmark = [pytest.mark.federation, pytest.mark.server]

PORT = 9092  # the SuperLink's one port: Fleet, Control and Runtime APIs
ADDRESSES = {"superlink": "10.99.0.1", "node-0": "10.99.0.11", "node-1": "10.99.0.12", "node-2": "10.99.0.13"}
ACCESS = re.compile(r'uvicorn\.access\] ([\d.]+):\d+ - "\w+ /v1/(\w+)/')  # the SuperLink's log: who asked which API


class Party(NamedTuple):
    """One party's network namespace and its address on the shared /24."""

    namespace: str
    address: str

    def command(self, args: list[str]) -> list[str]:
        """The command run inside this party's namespace, as an operator would type it."""
        return ["ip", "netns", "exec", self.namespace, *args]


def ip(*args: str, skip_if_refused: bool = False) -> None:
    """One `ip` command; a failure names the command and its message (or skips, where we may lack the right)."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    message = f"ip {' '.join(args)}: {done.stderr.strip()}"
    if done.returncode != 0 and skip_if_refused:
        pytest.skip(f"network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN); {message}")
    assert done.returncode == 0, message


@pytest.fixture
def network() -> Iterator[dict[str, Party]]:
    """A namespace per party, each on a bridge in a switch namespace of its own; all removed whatever happens.

    Names carry a random token so parallel or leftover runs never meet; the root namespace is left untouched.
    """
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2)")
    prefix = f"fedfhe-{secrets.token_hex(4)}"
    switch = f"{prefix}-switch"
    made: list[str] = []
    try:
        ip("netns", "add", switch, skip_if_refused=True)
        made.append(switch)
        ip("-n", switch, "link", "add", "br0", "type", "bridge", skip_if_refused=True)  # no CAP_NET_ADMIN: refused
        ip("-n", switch, "link", "set", "br0", "up")
        parties = {}
        for name, address in ADDRESSES.items():
            namespace = f"{prefix}-{name}"
            ip("netns", "add", namespace)
            made.append(namespace)
            ip("-n", namespace, "link", "set", "lo", "up")
            ip("-n", switch, "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            ip("-n", switch, "link", "set", name, "master", "br0", "up")
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", namespace, "link", "set", "eth0", "up")
            parties[name] = Party(namespace, address)
        yield parties
    finally:
        for namespace in made[::-1]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


def listening(party: Party) -> list[str]:
    """The local address:port of every listening TCP and UDP socket in the party's namespace."""
    done = subprocess.run(party.command(["ss", "-ltunH"]), capture_output=True, text=True, check=True)
    return sorted(line.split()[4] for line in done.stdout.splitlines())


def wait_for_run(link: Party, env: dict[str, str], run_id: int, model: Path) -> dict:
    """The run's row once it ends: `flwr ls` (a second of CPU) asked every 5 s, and at once when the model lands."""
    deadline, asked = time.monotonic() + 300, 0.0
    while time.monotonic() < deadline:
        if model.exists() or time.monotonic() - asked > 5:
            asked = time.monotonic()
            ls = ("ls", deployment.CONNECTION, "--run-id", str(run_id))
            (row,) = deployment.flwr(env, *ls, via=link.command([]))["runs"]
            if str(row["status"]).startswith("finished"):
                return dict(row)
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} did not finish in 300 s")


def test_supernodes_in_namespaces_of_their_own_train_the_simulation_model(tmp_path, digits, network, federated_run):
    config = TrainConfig(**FEDERATED)  # federated_run's: that run is the simulation to compare with
    link, nodes = network["superlink"], [network[f"node-{i}"] for i in range(config.clients)]
    work, out = tmp_path / "federation", tmp_path / "run"
    home, logs = work / "flwr-home", work / "logs"
    home.mkdir(parents=True)
    logs.mkdir()
    env = {
        **os.environ,
        "PATH": f"{deployment.BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": deployment.POLL,
    }
    certs = certificates.make_certificates(work / "certs", (link.address,))  # the name the SuperNodes dial
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{deployment.CONNECTION}"\n\n[superlink.{deployment.CONNECTION}]\n'
        f'address = "{link.address}:{PORT}"\nroot-certificates = "{certs / "ca.crt"}"\n'
    )
    files = deployment.write_owner_files(
        digits, config.clients, work / "data", config.partitioning, config.seed, config.alpha
    )
    app = deployment.write_app(work / "app")
    settings = work / "run_config.toml"
    settings.write_text(
        deployment.to_toml({**config.to_run_config(), "dataset": "digits", "out-dir": str(out), "audit-dir": ""})
    )
    secret = certificates.make_secret(work / "superexec.secret")  # the coordinator's: its SuperLink and SuperExec
    with deployment.Processes(env, logs) as procs:
        superlink = deployment.superlink_command(PORT, certs, work / "superlink.db", host=link.address, secret=secret)
        started = procs.start("superlink", link.command(superlink), cwd=work)  # `ip netns exec` execs: same pid
        deployment.wait_until(lambda: f"{link.address}:{PORT}" in listening(link), 60, "the SuperLink")
        tls = [f"--root-certificates={certs / 'ca.crt'}"]
        superexec = supernode.superexec_command(f"{link.address}:{PORT}", tls, secret, started.pid)
        procs.start("superexec", link.command(superexec), cwd=work)
        for i, (node, data_file) in enumerate(zip(nodes, files)):
            private, public = certificates.make_node_key(work / "keys", f"node-{i}")
            deployment.flwr(env, "supernode", "register", str(public), deployment.CONNECTION, via=link.command([]))
            node_config = f"data-file='{data_file}' partition-id={i} num-partitions={config.clients}"
            own = certificates.make_secret(work / "keys" / f"node-{i}.secret")  # each owner's, never sent
            command = deployment.supernode_command(
                PORT, certs, private, node_config, superlink=link.address, secret=own
            )
            procs.start(f"supernode-{i}", node.command(command), cwd=work / f"node-{i}")
        submit = ("run", str(app), deployment.CONNECTION, "--run-config", str(settings))
        run = deployment.flwr(env, *submit, cwd=app, via=link.command([]))
        ended = wait_for_run(link, env, run["run-id"], out / "model.npz")
        assert ended["status"] == "finished:completed", ended
        # Reachable from the bridge: the SuperLink's one port on its address; each SuperNode opens nothing.
        assert listening(link) == [f"{link.address}:{PORT}"]
        for node in nodes:
            assert all(local.startswith("127.0.0.1:") for local in listening(node)), listening(node)
    asked = {(peer, api) for peer, api in ACCESS.findall((logs / "superlink.log").read_text())}
    assert {peer for peer, api in asked if api == "fleet"} == {node.address for node in nodes}
    assert {peer for peer, api in asked if api != "fleet"} == {link.address}  # the `flwr` CLI and SuperExec
    deployed = LinearModel.load(out / "model.npz")
    assert deployed.metadata["metrics"]["final"]["score"] > 0.85
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and len(rounds[-1]["clients"]) == config.clients
    simulated = LinearModel.load(federated_run / "model.npz")  # same files, seed and config: the same model
    assert np.allclose(deployed.coef, simulated.coef, rtol=0, atol=1e-8)
    assert np.allclose(deployed.intercept, simulated.intercept, rtol=0, atol=1e-8)
    assert orphans(tmp_path) == []
