"""Flower's local SuperLink, running fedfhe from this environment: `flwr run .` without installing anything.

Flower 1.42's `flwr run .` (connection `local`, address ":local:") starts a SuperLink in simulation mode
on 127.0.0.1:39091 unless one already answers there, and leaves it running. That SuperLink installs
each app's dependencies into a fresh environment with uv: for fedfhe unresolvable (concrete-ml's
protobuf pin), and 6.5 GB per app version if it were not. `start` puts the same SuperLink on that port
first, with runtime installation off, so Flower's CLI finds it and runs fedfhe where it is installed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass

import httpx
import psutil
from flwr.cli.constant import LOCAL_CONTROL_API_ADDRESS, LOCAL_SUPERLINK_HTTP_API_PORT
from flwr.supercore.utils import get_flwr_home

from fedfhe.errors import FedfheError
from fedfhe.federated.deployment import BIN, flwr, wait_until

PORT = int(LOCAL_SUPERLINK_HTTP_API_PORT)  # FLWR_LOCAL_SUPERLINK_HTTP_API_PORT moves it, for Flower and us alike
NO_INSTALLS = "--disable-runtime-dependency-installation"


@dataclass(frozen=True)
class LocalSuperLink:
    """The process serving Flower's local SuperLink port, and whether it installs apps' dependencies."""

    pid: int
    installs: bool
    cwd: str


def _healthy() -> bool:
    """Whether a SuperLink answers on the local port (Flower's own probe)."""
    try:
        return httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=0.4).is_success
    except httpx.HTTPError:
        return False


def find() -> LocalSuperLink | None:
    """The SuperLink listening on the local port, whoever started it."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == PORT and conn.pid:
            proc = psutil.Process(conn.pid)
            return LocalSuperLink(conn.pid, NO_INSTALLS not in proc.cmdline(), proc.cwd())
    return None


def _env() -> dict[str, str]:
    """This environment's commands first on PATH: the SuperLink starts flower-superexec and flwr-simulation by name."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


def start(supernodes: int = 10) -> LocalSuperLink:
    """Start the local SuperLink (runtime installs off) in this folder, for `supernodes` simulated nodes, 1 CPU each.

    Runs land where it was started (relative `out-dir`s are relative to it). Already running: only the
    node count is set. Flower's own (installing) SuperLink on the port is refused: stop it first.
    """
    if not 1 <= supernodes <= 10_000:
        raise FedfheError(f"--supernodes must be between 1 and 10000 (got {supernodes})")
    running = find()
    if running is not None and running.installs:
        raise FedfheError(
            f"Flower's own local SuperLink (pid {running.pid}) is on 127.0.0.1:{PORT} and installs each app's "
            "dependencies: stop it first (`fedfhe flower stop`)"
        )
    if running is None:
        folder = get_flwr_home() / "local-superlink"
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / "superlink.log"
        command = [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation=subprocess",
            f"--control-api-address={LOCAL_CONTROL_API_ADDRESS}",
            "--host=127.0.0.1",
            f"--port={PORT}",
            f"--database={folder / 'state.db'}",
            f"--log-file={log}",
            NO_INSTALLS,
        ]
        proc = subprocess.Popen(
            command,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # outlives this command, as Flower's own does
        )

        def ready() -> bool:
            if proc.poll() is not None:
                raise FedfheError(f"the local SuperLink exited with code {proc.returncode}: see {log}")
            return _healthy()

        wait_until(ready, 60, "the local SuperLink")
    # One CPU per ClientApp, as `fedfhe train` asks (Flower's default, 2, runs one at a time on 2 cores)
    flwr(
        _env(),
        "federation",
        "simulation-config",
        "--num-supernodes",
        str(supernodes),
        "--client-resources-num-cpus",
        "1",
    )
    found = find()
    if found is None:
        raise FedfheError(f"the local SuperLink stopped right after it started: see {get_flwr_home()}")
    return found


def stop() -> int | None:
    """Stop whatever SuperLink serves the local port (ours or Flower's own) with its runtimes; its pid, if any."""
    running = find()
    if running is None:
        return None
    family = [psutil.Process(running.pid), *psutil.Process(running.pid).children(recursive=True)]
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=15)
    for proc in alive:
        proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return running.pid
