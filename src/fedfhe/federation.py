"""The federation on Flower's Deployment Engine: one SuperLink, N SuperNodes, gRPC over TLS.

`up()` does on one machine what a coordinator and N data owners do on theirs (docs/multi-host.md):
certificates and node keys, the SuperLink with node authentication, the SuperNodes each pointing
at its owner's data file, `flwr run`, then it stops every process it started, whatever happens.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedfhe.data import Dataset
from fedfhe.errors import FedfheError
from fedfhe.partition import partition, save_partitions

if TYPE_CHECKING:  # importing the training config would pull SciPy and scikit-learn into every `federation` use
    from fedfhe.federated.task import TrainConfig

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr live beside python
APP_DIR = Path(__file__).resolve().parents[2]  # the source tree whose pyproject declares the Flower App


def _private_pem(key: object) -> bytes:
    """PEM of an unencrypted private key; the files are written 0600."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_secret(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only."""
    path.write_bytes(data)
    path.chmod(0o600)


def make_certificates(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 365) -> Path:
    """A local CA (ca.crt) and a SuperLink certificate for `hosts` signed by it (server.pem/.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfhe local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(folder / "ca.key", _private_pem(ca_key))
    (folder / "server.pem").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(folder / "server.key", _private_pem(server_key))
    return folder


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC key pair identifying one SuperNode: private key (OpenSSH PEM, 0600) and public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    _write_secret(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return private, public


def write_owner_files(
    dataset: Dataset, owners: int, folder: Path, scheme: str = "iid", seed: int = 0, alpha: float = 0.5
) -> list[Path]:
    """One training file per data owner from a bundled data set, for trying a federation on one machine."""
    parts = partition(dataset.y_train, owners, scheme, alpha, seed)
    return save_partitions(dataset.X_train, dataset.y_train, parts, folder)


CONNECTION = "fedfhe"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """Every process the federation starts; all of them (and their children) stop on exit."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir, self.procs = env, log_dir, {}

    def start(self, name: str, args: list[str], cwd: Path) -> subprocess.Popen:
        """Start one long-running process in its own process group, logging to <name>.log."""
        cwd.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            args, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Signal one process group and wait for it to end (SIGKILL after 10 s)."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name)


def flwr(env: dict[str, str], *args: str, cwd: Path | None = None) -> dict:
    """Call the `flwr` CLI with JSON output; its errors become one-line FedfheErrors."""
    done = subprocess.run(
        [str(BIN / "flwr"), *args, "--format", "json"], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        answer = {"success": False, "error-message": (done.stdout + done.stderr).strip()[-300:]}
    if not answer.get("success", False):
        raise FedfheError(f"flwr {args[0]} {args[1] if len(args) > 1 else ''}: {answer.get('error-message', answer)}")
    return answer


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll until check() holds; a clear error when it never does."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise FedfheError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def up(
    dataset: Dataset,
    config: TrainConfig,
    out: Path,
    *,
    insecure: bool = False,
    on_started: Callable[[Processes], None] | None = None,
    on_round: Callable[[int], None] | None = None,
) -> Path:
    """Run one training on a loopback federation; returns out/model.npz. Every process is stopped.

    The config is the one `train` takes; SecAgg+ and DP run on the simulation engine only.
    insecure=True drops TLS and node authentication: only for debugging.
    """
    if config.secagg or config.dp:
        raise FedfheError("--secagg and --dp run on the simulation engine only (fedfhe train), not on federation up")
    out = out.resolve()
    work = out / "federation"
    for folder in ("flwr-home", "logs", "data", "keys"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperLink/SuperNode start flower-superexec
        "FLWR_HOME": str(work / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    files = write_owner_files(dataset, config.clients, work / "data", config.partitioning, config.seed, config.alpha)
    connection = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
    certs = None if insecure else make_certificates(work / "certs")
    if certs is None:
        connection += "insecure = true\n"
    else:
        connection += f'root-certificates = "{certs / "ca.crt"}"\n'
    (work / "flwr-home" / "config.toml").write_text(connection)
    with Processes(env, work / "logs") as procs:
        procs.start("superlink", superlink_command(port, certs, work / "superlink.db"), cwd=work)
        wait_until(lambda: _listening(port), 60, "the SuperLink")
        for i, data_file in enumerate(files):
            private = None
            if certs is not None:
                private, public = make_node_key(work / "keys", f"node-{i}")
                flwr(env, "supernode", "register", str(public), CONNECTION)
            node_config = f"data-file='{data_file}' partition-id={i} num-partitions={config.clients}"
            procs.start(f"supernode-{i}", supernode_command(port, certs, private, node_config), cwd=work / f"node-{i}")
        if on_started is not None:
            on_started(procs)
        settings = run_config(dataset.name, config, out)
        run_id = flwr(env, "run", str(APP_DIR), CONNECTION, "--run-config", settings, cwd=APP_DIR)["run-id"]
        status = _wait_for_run(env, run_id, config.rounds, out, on_round)
        if status["status"] != "finished:completed":
            reason = (status.get("status-details") or status["status"]).splitlines()[-1]
            raise FedfheError(f"federated run {run_id} ended {status['status']}: {reason}")
    return out / "model.npz"


def run_config(dataset: str, config: TrainConfig, out: Path) -> str:
    """The `flwr run --run-config` value the ServerApp reads back into the same TrainConfig."""
    params = " ".join(f"{k}={json.dumps(v)}" for k, v in config.params.items())
    return (
        f"dataset='{dataset}' clients={config.clients} num-server-rounds={config.rounds} "
        f"local-iters={config.local_iters} fraction={config.fraction} seed={config.seed} model='{config.model}' "
        f"params='{params}' strategy='{config.strategy}' min-clients={config.min_clients} "
        f"round-timeout={config.round_timeout} input-ranges='{config.input_ranges}' out-dir='{out}'"
    )


def superlink_command(port: int, certs: Path | None, database: Path) -> list[str]:
    """The coordinator's SuperLink: TLS with our certificates and registered SuperNodes only."""
    tls = (
        ["--insecure"]
        if certs is None
        else [
            f"--ssl-ca-certfile={certs / 'ca.crt'}",
            f"--ssl-certfile={certs / 'server.pem'}",
            f"--ssl-keyfile={certs / 'server.key'}",
            "--enable-supernode-auth",
        ]
    )
    return [
        str(BIN / "flower-superlink"),
        *tls,
        "--host=127.0.0.1",
        f"--port={port}",
        "--disable-runtime-dependency-installation",
        f"--database={database}",
    ]


def supernode_command(port: int, certs: Path | None, private_key: Path | None, node_config: str) -> list[str]:
    """A data owner's SuperNode: trusts our CA, proves its identity with its private key."""
    tls = ["--insecure"] if certs is None else [f"--root-certificates={certs / 'ca.crt'}"]
    auth = [] if private_key is None else [f"--auth-supernode-private-key={private_key}"]
    return [
        str(BIN / "flower-supernode"),
        f"--superlink=127.0.0.1:{port}",
        *tls,
        *auth,
        f"--port={free_port()}",
        "--max-retries=5",
        f"--node-config={node_config}",
    ]


def _listening(port: int) -> bool:
    """Whether something accepts TCP connections on the loopback port."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_for_run(
    env: dict[str, str], run_id: int, rounds: int, out: Path, on_round: Callable[[int], None] | None
) -> dict:
    """Poll the run until it ends, reporting rounds as their checkpoints appear."""
    seen = 0
    while True:
        runs = flwr(env, "ls", CONNECTION, "--run-id", str(run_id))["runs"]
        done = len(list((out / "checkpoints").glob("round-*.npz")))
        if on_round is not None and done > seen:
            seen = done
            on_round(done)
        if runs and str(runs[0]["status"]).startswith("finished"):
            return runs[0]
        time.sleep(1.0)
