"""The federation on Flower's Deployment Engine: one SuperLink, N SuperNodes, gRPC over TLS.

`up()` does on one machine what a coordinator and N data owners do on theirs (docs/multi-host.md):
certificates and node keys, the SuperLink with node authentication and its SuperExec, the SuperNodes each
pointing at its owner's data file, `flwr run`, then it stops every process it started, whatever happens.
Only SuperExecs holding the federation's secret may claim tasks on the Runtime APIs (SuperLink and SuperNodes).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import psutil

from fedfhe.config import RunConfig, TrainConfig
from fedfhe.data import Dataset
from fedfhe.errors import FedfheError
from fedfhe.federated.certificates import make_certificates, make_node_key, make_secret
from fedfhe.federated.supernode import superexec_command
from fedfhe.partition import partition, save_partitions
from fedfhe.rundir import RunDir
from fedfhe.table import owner_files

BIN = Path(sys.executable).parent  # flower-superlink, flower-superexec and flwr live beside python
SERVER_APP = "fedfhe.federated.server_app:app"
CLIENT_APP = "fedfhe.federated.client_app:app"
# Besides training: where data and outputs are; a user's table adds its schema (JSON), the server's test file
# and the folder of owner files (on the coordinator's machine, so evaluate and tune can read them again).
RUN_SETTINGS: RunConfig = {
    "dataset": "mnist-5k",
    "out-dir": "runs/flower",
    "audit-dir": "",
    "schema": "",
    "test-file": "",
    "owners-dir": "",
    "leakage": "",
}
POLL = "0.25"  # seconds between the SuperExec's looks for work (Flower's default: 1)
STATUS_EVERY = 0.5  # seconds between looks at a run's checkpoints and status (a request of a few ms)


def write_owner_files(
    dataset: Dataset,
    owners: int,
    folder: str | os.PathLike[str],
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
) -> list[Path]:
    """One training file per data owner from a bundled data set, for trying a federation on one machine."""
    parts = partition(dataset.y_train, owners, scheme, alpha, seed)
    return save_partitions(dataset.X_train, dataset.y_train, parts, Path(folder))


CONNECTION = "fedfhe"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_ports(text: str) -> range:
    """`--ports LOW-HIGH` as the range of ports it names, or a one-line error."""
    low, dash, high = text.partition("-")
    if dash and low.strip().isdigit() and high.strip().isdigit() and 1 <= int(low) <= int(high) <= 65535:
        return range(int(low), int(high) + 1)
    raise FedfheError(f"--ports must be LOW-HIGH, two ports from 1 to 65535 with LOW <= HIGH (got {text!r})")


def free_ports(count: int, ports: range | None = None) -> list[int]:
    """`count` loopback TCP ports nothing listens on right now: any, or the first free ones of `ports`."""
    if ports is None:
        return [free_port() for _ in range(count)]
    found: list[int] = []
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken, or privileged
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise FedfheError(
        f"--ports {ports.start}-{ports.stop - 1}: {len(found)} free port(s) there; the federation needs {count} "
        f"(the SuperLink and {count - 1} SuperNode(s))"
    )


class Processes:
    """Every process the federation starts; all of them (and their children) stop on exit."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.procs: dict[str, subprocess.Popen] = {}

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
        """Signal one process group and wait for every process of it to end (SIGKILL after 10 s)."""
        pid = self.procs[name].pid
        family = _family(pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        self._reap(name, family)

    def _reap(self, name: str, family: list[psutil.Process]) -> None:
        """Wait for a signalled process and the family it had (SIGKILL after 10 s); forget it.

        Not only the leader: a SuperNode's SuperExec and warm process may still be exiting when it has.
        """
        proc = self.procs.pop(name)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if not _ended(family, 10):
            for left in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    left.kill()
            _ended(family, 5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        """Signal every group first (the nodes, then the SuperLink), then wait for each and what it had started.

        Each family is listed before any signal: a child whose parent has exited is no longer found.
        """
        families = {name: _family(proc.pid) for name, proc in self.procs.items()}
        for proc in list(self.procs.values())[::-1]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for name in list(self.procs)[::-1]:
            self._reap(name, families[name])


def _family(pid: int) -> list[psutil.Process]:
    """The processes a group leader has started (at any depth) and those left in its group, still running.

    A leader that has exited leaves its children to init, but not its group: a SuperNode that failed to
    connect exits before its warm process, which notices within a second.
    """
    try:
        found = {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        found = {}
    for process in psutil.process_iter():
        with contextlib.suppress(OSError):  # gone meanwhile
            if process.pid != pid and os.getpgid(process.pid) == pid:
                found.setdefault(process.pid, process)
    return list(found.values())


def _ended(processes: list[psutil.Process], timeout: float) -> bool:
    """Wait until every process has exited (a zombie nobody reaps counts: it runs nothing); whether they all did."""

    def running(process: psutil.Process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    while any(running(p) for p in processes):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def flwr(env: dict[str, str], *args: str, cwd: Path | None = None, via: Sequence[str] = ()) -> dict:
    """Call the `flwr` CLI with JSON output (through `via`, e.g. `ip netns exec NS`); errors become one line."""
    done = subprocess.run(
        [*via, str(BIN / "flwr"), *args, "--format", "json"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        answer = {"success": False, "error-message": (done.stdout + done.stderr).strip()[-300:]}
    if not answer.get("success", False):
        raise FedfheError(f"flwr {args[0]} {args[1] if len(args) > 1 else ''}: {answer.get('error-message', answer)}")
    return answer


class Control:
    """Flower's Control API from this process: a node key registered, a run's status, each a request.

    `flwr supernode register` and `flwr ls` do the same as processes that import Flower first: 1.35 CPU-s each.
    """

    def __init__(self, port: int, certs: Path | None) -> None:
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

        self._client = ControlHttpClient.from_server_address(
            f"127.0.0.1:{port}",
            insecure=certs is None,
            root_certificates=None if certs is None else str(certs / "ca.crt"),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        )

    def register(self, public_key: Path) -> None:
        """Let the SuperNode holding this key's private half in (its OpenSSH public key file)."""
        from cryptography.hazmat.primitives import serialization
        from flwr.proto.control_pb2 import RegisterNodeRequest

        key = serialization.load_ssh_public_key(public_key.read_bytes())
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        if not self._ask(lambda: self._client.RegisterNode(RegisterNodeRequest(public_key=pem))).node_id:
            raise FedfheError(f"the SuperLink did not register the node key {public_key}")

    def run(self, run_id: int) -> dict[str, str]:
        """A run's status as `flwr ls` shows it ("finished:completed") and the details of a failure."""
        from flwr.proto.control_pb2 import ListRunsRequest

        status = self._ask(lambda: self._client.ListRuns(ListRunsRequest(run_id=run_id))).run_dict[run_id].status
        shown = f"{status.status}:{status.sub_status}" if status.sub_status else status.status
        return {"status": shown, "status-details": status.details}

    def _ask(self, request: Callable[[], Any]) -> Any:
        """One request; a refusal or an unreachable SuperLink is one line."""
        import httpx

        try:
            return request()
        except httpx.HTTPStatusError as exc:
            raise FedfheError(f"the SuperLink refused: {exc.response.text.strip()[-300:]}") from None
        except httpx.HTTPError as exc:
            raise FedfheError(f"the SuperLink did not answer: {exc}") from None

    def close(self) -> None:
        """Close the connection."""
        self._client.close()


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
    out: str | os.PathLike[str],
    *,
    insecure: bool = False,
    audit: bool = False,
    force: bool = False,
    on_started: Callable[[Processes], None] | None = None,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
    ports: range | None = None,
) -> Path:
    """Run one training on a loopback federation; returns out/model.npz. Every process is stopped.

    The config is the one `train` takes, SecAgg+ and DP included. insecure=True drops TLS and node
    authentication: only for debugging. audit=True keeps every reply the server receives in
    out/federation/audit/. A folder holding a run is refused unless force=True (its files go first).
    The SuperLink and the SuperNodes listen on free ports of `ports` (a firewall's opening), else on any.
    """
    config.problem(dataset)
    run = RunDir(Path(out).resolve())
    if run.holds_run() and not force:
        raise FedfheError(f"{run.path} already holds a run: pass --force to start over (its files are removed first)")
    port, *node_ports = free_ports(1 + config.clients, ports)  # one SuperNode per client
    if force:
        run.clear()
    run.create()
    work = run.federation
    for folder in ("flwr-home", "logs", "data", "keys"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperExecs start flwr-serverapp/-clientapp by name
        "FLWR_HOME": str(work / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": POLL,
    }
    if dataset.source is not None and "owners" in dataset.source:  # each SuperNode reads its owner's own file
        files = owner_files(dataset.source["owners"])
        if quoted := [f for f in files if "'" in str(f)]:  # Flower's node config quotes values with '
            raise FedfheError(f"{quoted[0]}: a SuperNode cannot be given a path with a ' in it; rename it")
        table = {
            "schema": json.dumps(dataset.schema, separators=(",", ":")),
            "test-file": dataset.source["test"],
            "owners-dir": dataset.source["owners"],
            "leakage": json.dumps(dataset.leakage) if dataset.leakage is not None else "",
        }
    elif dataset.source is None:
        files = write_owner_files(
            dataset, config.clients, work / "data", config.partitioning, config.seed, config.alpha
        )
        table = {}
    else:
        raise FedfheError("the Deployment Engine trains on one file per owner: use --owners DIR --test FILE")
    connection = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
    certs = None if insecure else make_certificates(work / "certs")
    secret = make_secret(work / "superexec.secret")
    if certs is None:
        connection += "insecure = true\n"
    else:
        connection += f'root-certificates = "{certs / "ca.crt"}"\n'
    (work / "flwr-home" / "config.toml").write_text(connection)
    app = write_app(work / "app")
    settings = work / "run_config.toml"
    where = {
        "dataset": dataset.name,
        "out-dir": str(run.path),
        "audit-dir": str(work / "audit") if audit else "",
        **table,
    }
    settings.write_text(to_toml({**config.to_run_config(), **where}))
    with Processes(env, work / "logs") as procs, contextlib.closing(Control(port, certs)) as control:
        link = procs.start("superlink", superlink_command(port, certs, work / "superlink.db", secret=secret), cwd=work)
        wait_until(lambda: _listening(port), 60, "the SuperLink")
        tls = ["--insecure"] if certs is None else [f"--root-certificates={certs / 'ca.crt'}"]
        procs.start("superexec", superexec_command(f"127.0.0.1:{port}", tls, secret, link.pid), cwd=work)
        keys = [None if certs is None else make_node_key(work / "keys", f"node-{i}") for i in range(len(files))]

        def join(i: int) -> None:
            """Register node i's key, then start its SuperNode."""
            pair, private = keys[i], None
            if pair is not None:
                private, public = pair
                control.register(public)
            node_config = f"data-file='{files[i]}' partition-id={i} num-partitions={config.clients}"
            command = supernode_command(port, certs, private, node_config, secret=secret, runtime_port=node_ports[i])
            procs.start(f"supernode-{i}", command, cwd=work / f"node-{i}")

        with ThreadPoolExecutor(4) as pool:  # the run is submitted while nodes join: the ServerApp waits for them
            submitted = pool.submit(flwr, env, "run", str(app), CONNECTION, "--run-config", str(settings), cwd=app)
            list(pool.map(join, range(len(files))))
            run_id = int(submitted.result()["run-id"])
        if on_started is not None:
            on_started(procs)
        status = _wait_for_run(control, run_id, run, on_round)
        if status["status"] != "finished:completed":
            reason = (status.get("status-details") or status["status"]).splitlines()[-1]
            raise FedfheError(f"federated run {run_id} ended {status['status']}: {reason}")
    return run.model_file


def write_app(folder: Path) -> Path:
    """A Flower App for the installed fedfhe: its components by module path, every run-config key and default.

    `flwr run` sends this folder to the SuperLink; the SuperExec then imports the ServerApp and
    ClientApp from the installed package, wherever it is.
    """
    folder.mkdir(parents=True, exist_ok=True)
    version = importlib.metadata.version("fedfhe")
    project = {"name": "fedfhe", "version": version, "description": "fedfhe", "license": "Apache-2.0"}
    (folder / "pyproject.toml").write_text(
        "[project]\n"
        + to_toml(project)
        + 'dependencies = []\n\n[tool.flwr.app]\npublisher = "fedfhe"\n\n[tool.flwr.app.components]\n'
        + to_toml({"serverapp": SERVER_APP, "clientapp": CLIENT_APP})
        + "\n[tool.flwr.app.config]\n"
        + to_toml({**RUN_SETTINGS, **TrainConfig().to_run_config()})
    )
    return folder


def to_toml(entries: dict[str, Any]) -> str:
    """Flat TOML key = value lines for strings, numbers and booleans."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")

    return "".join(f"{key} = {value(v)}\n" for key, v in entries.items())


def superlink_command(
    port: int, certs: Path | None, database: Path, host: str = "127.0.0.1", secret: Path | None = None
) -> list[str]:
    """The coordinator's SuperLink on host:port (Fleet, Control and Runtime APIs): TLS, registered SuperNodes only.

    With a secret, only a SuperExec holding it claims ServerApp tasks; Flower then starts none (we do).
    """
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
    signed = [] if secret is None else ["--isolation=process", f"--superexec-auth-secret-file={secret}"]
    return [
        str(BIN / "flower-superlink"),
        *tls,
        *signed,
        f"--host={host}",
        f"--port={port}",
        "--disable-runtime-dependency-installation",
        f"--database={database}",
    ]


def supernode_command(
    port: int,
    certs: Path | None,
    private_key: Path | None,
    node_config: str,
    superlink: str = "127.0.0.1",
    secret: Path | None = None,
    runtime_port: int | None = None,
) -> list[str]:
    """A data owner's SuperNode reaching the SuperLink at superlink:port: trusts our CA, proves itself with its key.

    fedfhe-supernode is flower-supernode with warm ClientApp processes and a short idle poll (supernode.py);
    with a secret, it starts its SuperExec with it, and only that SuperExec claims the node's ClientApp tasks.
    Its Runtime API listens on loopback at `runtime_port` (default: any free port).
    """
    tls = ["--insecure"] if certs is None else [f"--root-certificates={certs / 'ca.crt'}"]
    auth = [] if private_key is None else [f"--auth-supernode-private-key={private_key}"]
    signed = [] if secret is None else [f"--superexec-auth-secret-file={secret}"]
    return [
        str(BIN / "fedfhe-supernode"),
        f"--superlink={superlink}:{port}",
        *tls,
        *auth,
        *signed,
        f"--port={runtime_port or free_port()}",
        "--max-retries=5",
        f"--node-config={node_config}",
    ]


def _listening(port: int) -> bool:
    """Whether something accepts TCP connections on the loopback port."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_for_run(
    control: Control, run_id: int, run: RunDir, on_round: Callable[[int, dict[str, float]], None] | None
) -> dict[str, str]:
    """Watch the run until it ends, reporting each round, with the global model's test score, as its checkpoint lands."""
    seen = 0
    while True:
        done = run.last_round()
        if on_round is not None and done > seen:  # every round since the last look
            rows = {row["round"]: row for row in run.load_checkpoint().rows}
            for r in range(seen + 1, done + 1):
                on_round(r, dict(rows.get(r, {}).get("global", {})))
            seen = done
        status = control.run(run_id)
        if status["status"].startswith("finished"):
            return status
        time.sleep(STATUS_EVERY)
