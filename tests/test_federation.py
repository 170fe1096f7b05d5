"""Flower's Deployment Engine on loopback: TLS, node authentication, failures, no orphans."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import ENV, FEDERATED, cli, copy_of
from test_supernode import claim

from fedfhe import TrainConfig, train
from fedfhe.errors import FedfheError
from fedfhe.federated import certificates, deployment
from fedfhe.model import LinearModel

pytestmark = [pytest.mark.federation, pytest.mark.server]


def orphans(folder: Path) -> list[str]:
    """Processes still running whose command line mentions the folder."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if str(folder) in cmd and proc.pid != os.getpid():
            found.append(cmd[:120])
    return found


PLAIN = TrainConfig(**FEDERATED)  # federated_run's settings: that run is the simulation to compare with


@pytest.fixture(scope="session")
def deployed(once, digits) -> tuple[Path, list[tuple[int, dict]]]:
    """One training on the Deployment Engine (3 SuperNodes, TLS, node auth): its run folder (read-only) and its
    progress as reported to the worker that ran it (kept in progress.json beside the run for the others); what
    each Runtime API answered a task claim without the secret during the run is in claims.json beside it."""

    def build(folder: Path) -> None:
        progress: list[tuple[int, dict]] = []
        claims: dict[str, int] = {}

        def claim_as_a_stranger(procs: deployment.Processes) -> None:
            """Each Runtime API asked for a task, without the secret, while the run goes on."""
            ca = folder / "run" / "federation" / "certs" / "ca.crt"
            for name, proc in procs.procs.items():
                port = next((a.split("=")[1] for a in proc.args if a.startswith("--port=")), None)
                if port is not None:  # the SuperLink (TLS) and each SuperNode (loopback)
                    claims[name] = claim(f"127.0.0.1:{port}", ca=ca if name == "superlink" else None)

        deployment.up(
            digits, PLAIN, folder / "run", on_started=claim_as_a_stranger, on_round=lambda r, m: progress.append((r, m))
        )
        (folder / "progress.json").write_text(json.dumps(progress))
        (folder / "claims.json").write_text(json.dumps(claims))

    folder = once("deployed", build)
    progress = [(r, m) for r, m in json.loads((folder / "progress.json").read_text())]
    return folder / "run", progress


def test_deployment_with_tls_and_auth_gives_the_simulation_model(deployed, federated_run):
    out, progress = deployed
    simulated = LinearModel.load(federated_run / "model.npz")
    model = LinearModel.load(out / "model.npz")
    # Same files, same config, replies summed in content order, local fits on one BLAS thread (objective.fit): the
    # same weights bit for bit, so the same sha256, though the training facts (seconds) differ
    assert np.array_equal(model.coef, simulated.coef) and np.array_equal(model.intercept, simulated.intercept)
    assert model.sha256 == simulated.sha256
    assert model.metadata["metrics"]["train_seconds"] != simulated.metadata["metrics"]["train_seconds"]
    assert (out / "federation" / "certs" / "ca.crt").is_file()
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r for r, _ in progress] == [1, 2]  # reported as each round's checkpoint landed, with its test score
    assert [m["score"] for _, m in progress] == [rows[1]["global"]["score"], rows[2]["global"]["score"]]
    assert orphans(out.parent) == []


def test_only_the_federations_superexecs_may_claim_tasks(deployed):
    out, _ = deployed  # the run completed (the test above): its SuperExecs held the secret
    claims = json.loads((out.parent / "claims.json").read_text())
    assert claims == {"superlink": 401, "supernode-0": 401, "supernode-1": 401, "supernode-2": 401}
    assert (out / "federation" / "superexec.secret").stat().st_mode & 0o777 == 0o600


def test_a_deployed_run_is_a_run_directory(deployed, digits, tmp_path):
    out = copy_of(deployed[0], tmp_path)  # compiled, evaluated and tuned below
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [row["round"] for row in rows] == [0, 1, 2]
    for row in rows:  # every round's model scored by each owner: in the next train reply, or at the end
        assert [c["client"] for c in row["clients"]] == [0, 1, 2]
    assert all(set(row["timing"]) >= {"round_s", "client_process_s", "client_train_s"} for row in rows[1:])
    assert rows[2]["timing"]["client_process_s"] > 0  # each message started a fresh ClientApp process
    for name in ("training.png", "train_config.json", "checkpoints/round-0002.npz"):
        assert (out / name).is_file(), name
    assert cli("compile", "--run", str(out), "--n-bits", "6").returncode == 0
    done = cli("evaluate", "--run", str(out), "--fhe-samples", "2")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "report.json").read_text())["agreement"]["fhe_vs_clear"] == 1.0
    assert cli("card", "--run", str(out)).returncode == 0
    assert json.loads((out / "card.json").read_text())["evaluation"]["rows"] == len(digits.y_test)
    done = cli("tune", "--run", str(out), "--n-bits", "4,6", "--latency-samples", "1", "--no-bit-pairs")
    assert done.returncode == 0, done.stderr
    chosen = json.loads((out / "tune.json").read_text())["recommended"]["n_bits"]
    assert chosen in (4, 6)
    card = json.loads((out / "card.json").read_text())  # the recompiled circuit's, and no report of the old one's
    spec = hashlib.sha256((out / "fhe" / "client.zip").read_bytes()).hexdigest()
    assert (card["fhe"]["n_bits"], card["pin"], card["evaluation"]) == (
        chosen,
        f"{card['model']['sha256']}:{spec}",
        None,
    )
    assert not (out / "report.json").exists() and not (out / "report.md").exists()
    from conftest import serving

    from fedfhe.fhe import load_compiled
    from fedfhe.service.client import EncryptedClient

    rows_in = digits.X_test[:3]
    expected = load_compiled(out, LinearModel.load(out / "model.npz")).predict(rows_in, fhe="simulate")
    with (
        serving(out, tmp_path / "keys", tmp_path / "log", "--workers", "1") as served,
        EncryptedClient(served.url, tmp_path / "client") as client,
    ):
        np.testing.assert_array_equal(client.predict(rows_in).predicted, expected)


def masked_updates(audit: Path) -> list[np.ndarray]:
    """The masked vectors the server received, as it kept them (one per client that reached that stage)."""
    from flwr.common import bytes_to_ndarray

    vectors = []
    for reply in sorted(audit.glob("reply-*.npz")):
        with np.load(reply) as kept:
            blobs = sorted((k for k in kept.files if "/masked_params/" in k), key=lambda k: int(k.rsplit("/", 1)[1]))
            if blobs:
                vectors.append(np.concatenate([bytes_to_ndarray(kept[k].tobytes()).ravel() for k in blobs]))
    return vectors


def test_secagg_on_the_deployment_engine_shows_the_server_only_masked_vectors(tmp_path, digits, federated_run):
    from fedfhe import objective

    config = TrainConfig(clients=3, rounds=1, local_iters=10, secagg=True)
    deployment.up(digits, config, tmp_path / "secagg", audit=True)
    secure = LinearModel.load(tmp_path / "secagg" / "model.npz")
    with np.load(federated_run / "checkpoints" / "round-0001.npz") as f:  # plain FedAvg's first round, same clients
        plain_coef, plain_intercept = config.problem(digits).unscale([f["coef"], f["intercept"]])
    simulated = train(digits, config, tmp_path / "simulated")
    # Each client's ratio * w (ratio = n_k / max_weight) is rounded to a grid of step 2 * clip / Q, the sum
    # divided by sum(ratio): within step / mean(ratio) of plain FedAvg, in the scaled space clients train in.
    sizes = [len(np.load(f)["y"]) for f in sorted((tmp_path / "secagg" / "federation" / "data").glob("*.npz"))]
    step = 2 * config.secagg_clipping_range / config.secagg_quantization_range
    bound = step / (np.mean(sizes) / config.secagg_max_weight) + 1e-7
    width = digits.input_range[1] - digits.input_range[0]  # saved weights take raw features: coef / width
    for model in (secure, simulated):  # each within the bound of plain FedAvg, so within twice it of each other
        assert np.abs((model.coef - plain_coef) * width).max() <= bound
        assert np.abs(model.intercept - plain_intercept).max() <= bound
    assert not np.array_equal(secure.coef, plain_coef)
    audit = tmp_path / "secagg" / "federation" / "audit"
    assert not [k for f in audit.glob("*.npz") for k in np.load(f).files if k.startswith("array/")]  # no update
    vectors = masked_updates(audit)
    assert len(vectors) == config.clients
    task = config.problem(digits)
    for i, vector in enumerate(vectors):
        with np.load(tmp_path / "secagg" / "federation" / "data" / f"client-{i}.npz") as f:
            X, y = f["X"], f["y"]
        true = objective.fit(task, task.initial_params(), task.scale(X), y, config.client_hyper(), 10)[0].ravel()
        coef = vector[: true.size].astype(np.float64)
        assert abs(np.corrcoef(coef, true)[0, 1]) < 0.15  # nothing of any client's update shows
        assert coef.min() < 2**28 and coef.max() > 2**31  # spread over the whole modulus


# Seconds a round (and each SecAgg+ stage) waits for a killed node: a round takes about 2.3 s here, a
# SecAgg+ stage about 1 s, and the nodes connect within about 4 s of the run's start.
DEAD_NODE_WAIT = 10


def kill_inside_a_secagg_round(out: Path, nodes: tuple[int, ...] = (2,)):
    """on_started hook: SIGKILL SuperNodes once every node has shared its keys (the masked vectors come next)."""

    def hook(procs: deployment.Processes) -> None:
        def killer() -> None:
            audit = out / "federation" / "audit"
            deadline = time.monotonic() + 120
            while len(list(audit.glob("reply-*.npz"))) < 6 and time.monotonic() < deadline:  # 3 keys + 3 shares
                time.sleep(0.05)
            for node in nodes:
                procs.stop(f"supernode-{node}", signal.SIGKILL)

        threading.Thread(target=killer, daemon=True).start()

    return hook


def test_a_supernode_killed_inside_a_secagg_round_is_recovered_from_the_others_shares(tmp_path, digits):
    from fedfhe.federated.privacy import privacy_spent

    config = TrainConfig(
        clients=3, rounds=1, local_iters=10, secagg=True, secagg_shares=3, secagg_threshold=2, min_clients=2,
        dp=True, clipping="fixed", noise_multiplier=0.1, clipping_norm=5.0, round_timeout=DEAD_NODE_WAIT,
    )  # fmt: skip
    out = tmp_path / "run"
    deployment.up(digits, config, out, audit=True, on_started=kill_inside_a_secagg_round(out))
    metrics = json.loads((out / "metrics.json").read_text())
    # one noised round of two clients' masked sum: far above chance (0.1 for ten digits), 0.49-0.6 seen here
    assert metrics["failures"] == 1 and metrics["final"]["score"] > 0.3
    assert metrics["privacy"] == privacy_spent(config)  # as the simulation reports it (test_private)
    assert orphans(tmp_path) == []


def test_a_secagg_round_without_enough_shares_left_ends_in_one_line(tmp_path, digits):
    config = TrainConfig(
        clients=3, rounds=1, local_iters=10, secagg=True, secagg_shares=3, secagg_threshold=2, round_timeout=DEAD_NODE_WAIT,
    )  # fmt: skip
    out = tmp_path / "run"
    with pytest.raises(FedfheError, match=r"SecAgg\+ could not unmask the sum") as refused:  # 1 share left, 2 needed
        deployment.up(digits, config, out, audit=True, on_started=kill_inside_a_secagg_round(out, (1, 2)))
    assert "\n" not in str(refused.value)
    assert not (out / "model.npz").exists() and orphans(tmp_path) == []


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
    config = TrainConfig(clients=3, rounds=2, local_iters=10, min_clients=2, round_timeout=DEAD_NODE_WAIT)
    deployment.up(digits, config, out, on_started=kill_after_round_one(out))
    metrics = LinearModel.load(out / "model.npz").metadata["metrics"]
    assert metrics["final"]["score"] > 0.85
    failures = json.loads((out / "metrics.json").read_text())["failures"]
    assert failures >= 1
    assert orphans(tmp_path) == []


def test_killed_supernode_below_the_minimum_ends_with_a_clear_message(tmp_path, digits):
    out = tmp_path / "run"
    with pytest.raises(FedfheError, match=r"ended finished:failed: .*only 2 of 3 clients"):
        config = TrainConfig(clients=3, rounds=2, local_iters=10, min_clients=3, round_timeout=DEAD_NODE_WAIT)
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


def test_bad_federation_requests(tmp_path, digits, deployed):
    with pytest.raises(FedfheError, match="--clients 5000 is more than"):
        deployment.up(digits, TrainConfig(clients=5000), tmp_path / "many")
    out, _ = deployed
    model = (out / "model.npz").read_bytes()
    with pytest.raises(FedfheError, match="already holds a run: pass --force"):
        deployment.up(digits, PLAIN, out)
    assert (out / "model.npz").read_bytes() == model
    done = cli("federation", "up", "--dataset", "nope", "--out", str(tmp_path))
    assert done.returncode == 2 and "unknown data set 'nope'" in done.stderr
    done = cli("federation", "up", "--dataset", "digits", "--strategy", "fedsgd", "--out", str(tmp_path))
    assert done.returncode == 2 and "unknown strategy 'fedsgd'" in done.stderr
    with socket.socket() as taken:  # a range of one port, in use: too few for a SuperLink and 3 SuperNodes
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for ports, message in [
            ("9000-8999", "--ports must be LOW-HIGH, two ports from 1 to 65535 with LOW <= HIGH (got '9000-8999')"),
            ("0-10", "--ports must be LOW-HIGH"),
            ("9000", "--ports must be LOW-HIGH"),
            (f"{port}-{port}", f"--ports {port}-{port}: 0 free port(s) there; the federation needs 4 (the SuperLink"),
        ]:
            done = cli("federation", "up", "--dataset", "digits", "--clients", "3", "--ports", ports,
                       "--out", str(tmp_path / "many"))  # fmt: skip
            assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
            assert message in " ".join(done.stderr.split()), done.stderr
    assert not (tmp_path / "many").exists() and orphans(tmp_path) == []


# One federation for the next two tests: `python -m fedfhe federation up` from a wheel installed outside the
# checkout, training a regressor whose owners agree on their input ranges over gRPC.
WHEEL_RUN = ["--dataset", "diabetes", "--model", "ridge", "--param", "alpha=0.1", "--input-ranges", "clients"]
WHEEL_RUN += ["--clients", "3", "--rounds", "1", "--local-iters", "5"]


def _wheel_federation(folder: Path) -> None:
    root, source = Path(__file__).resolve().parents[1], folder / "source"  # built from a copy: no build/ here
    shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(folder / "wheel"), str(source)], check=True, timeout=300)
    (wheel,) = (folder / "wheel").glob("fedfhe-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(folder / "site"), str(wheel)], check=True, timeout=300
    )
    (folder / "elsewhere").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "fedfhe", "federation", "up", *WHEEL_RUN, "--out", "run"],
        cwd=folder / "elsewhere",
        env=_wheel_env(folder),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (folder / "up.stderr").write_text(done.stderr)


def _wheel_env(folder: Path) -> dict[str, str]:
    """The environment with the installed wheel first on the path."""
    return {**ENV, "PYTHONPATH": str(folder / "site")}


@pytest.fixture(scope="session")
def wheel_federation(once) -> Path:
    """The folder of the wheel's federation: site/ (the installed wheel), elsewhere/run/ (the run)."""
    return once("wheel-federation", _wheel_federation)


def test_deployment_trains_a_regressor_on_ranges_the_owners_share(wheel_federation):
    from fedfhe.data import load_dataset

    diabetes = load_dataset("diabetes", seed=0)
    model = LinearModel.load(wheel_federation / "elsewhere" / "run" / "model.npz")
    assert model.kind.name == "ridge" and model.metadata["training"]["params"] == {"alpha": 0.1}
    assert model.metadata["metrics"]["final"]["score"] > 0.2  # R2 after one round
    low, high = model.input_range  # agreed over gRPC by query messages, tighter than the schema
    assert (high < diabetes.input_range[1]).any() and (low <= diabetes.X_train.min(axis=0)).all()
    assert orphans(wheel_federation) == []


def test_an_installed_wheel_trains_on_the_deployment_engine_from_outside_the_checkout(wheel_federation):
    elsewhere = wheel_federation / "elsewhere"
    where = subprocess.run(
        [sys.executable, "-c", "import fedfhe; print(fedfhe.__file__)"],
        cwd=elsewhere,
        env=_wheel_env(wheel_federation),
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(wheel_federation / "site")  # the wheel's copy, not the checkout's
    model = LinearModel.load(elsewhere / "run" / "model.npz")
    assert model.metadata["training"]["clients"] == 3 and model.metadata["metrics"]["final"]["score"] > 0.2
    said = (wheel_federation / "up.stderr").read_text()  # without --compile: what to run next
    assert "next: fedfhe compile --run run, then fedfhe evaluate --run run" in said
    app = elsewhere / "run" / "federation" / "app"
    assert [p.name for p in app.iterdir()] == ["pyproject.toml"]  # no source: the SuperExec imports the wheel
    assert orphans(wheel_federation) == []
