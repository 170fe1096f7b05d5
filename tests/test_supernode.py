"""fedfhe-supernode: Flower's SuperNode whose ClientApp processes fork from a warm process instead of importing."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fedfhe.federated import certificates, deployment, supernode

pytestmark = [pytest.mark.server]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A TMPDIR for a node: short, for its socket's path must fit in 107 bytes (an xdist worker's tmp_path may not)."""
    folder = Path(tempfile.mkdtemp(prefix="node-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def node(short_tmp) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A fedfhe-supernode dialling a SuperLink that is not there; its shim folder (under our TMPDIR)."""
    env = {**os.environ, "TMPDIR": str(short_tmp)}
    args = [
        str(deployment.BIN / "fedfhe-supernode"),
        "--insecure",
        "--superlink=127.0.0.1:9",
        f"--port={deployment.free_port()}",
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def warm() -> bool:  # its socket is bound before the fork: wait for the process too
        return any(short_tmp.glob("fedfhe-supernode-*/clientapp.sock")) and bool(psutil.Process(proc.pid).children())

    deployment.wait_until(warm, 60, "the warm process")
    (folder,) = short_tmp.glob("fedfhe-supernode-*")
    yield proc, folder
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def claim(address: str, secret: Path | None = None, ca: Path | None = None) -> int:
    """The HTTP status a Runtime API answers a task claim with (AcquireTask, by Flower's client, signed if a secret).

    An API not listening yet is asked again for up to a minute.
    """
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.interceptors.http import SuperExecAuthHttpInterceptor
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime.runtime_http_client import RuntimeHttpClient

    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret is not None:
        method = "/flwr.proto.Runtime/AcquireTask"
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret.read_bytes(), protected_methods={method}))
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=ca is None,
        root_certificates=None if ca is None else ca.read_bytes(),
        interceptors=interceptors,
    )
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                client.AcquireTask(AcquireTaskRequest())
                return 200
            except httpx.HTTPStatusError as exc:
                return exc.response.status_code
            except httpx.ConnectError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        client.close()


def clientapp(folder: Path, *args: str, warm: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    """The shim as Flower's SuperExec starts it (found on PATH), and the CPU seconds its own process spent."""
    env = {k: v for k, v in os.environ.items() if k != supernode.SOCKET}
    if warm:
        env[supernode.SOCKET] = str(folder / "clientapp.sock")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [str(folder / "flwr-clientapp"), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_the_clientapp_runs_flowers_code_in_a_child_of_the_warm_process(node):
    _, folder = node
    warm, warm_cpu = clientapp(folder, "--help")
    cold, cold_cpu = clientapp(folder, "--help", warm=False)  # no socket: the shim becomes Flower's own command
    assert warm.returncode == cold.returncode == 0
    assert "Run a Flower ClientApp" in warm.stdout and warm.stdout == cold.stdout  # the child's stdout is the shim's
    assert warm_cpu < cold_cpu / 3, (warm_cpu, cold_cpu)  # the shim imports no Flower: the warm child did the work
    refused, _ = clientapp(folder, "--runtime-api-address", "127.0.0.1:9")
    assert refused.returncode == 2 and "one of the arguments --token --token-file is required" in refused.stderr


@pytest.mark.parametrize("kill", [os.kill, os.killpg], ids=["the node alone", "its process group"])
def test_the_warm_process_and_its_folder_end_with_the_supernode(node, kill):
    proc, folder = node
    family = psutil.Process(proc.pid).children(recursive=True)  # the warm process, Flower's SuperExec
    assert family
    kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(family, timeout=10)
    assert alive == []
    assert not folder.exists()


def test_with_a_secret_file_only_a_superexec_holding_it_may_claim_the_nodes_tasks(short_tmp):
    secret, port = certificates.make_secret(short_tmp / "secret"), deployment.free_port()
    args = [str(deployment.BIN / "fedfhe-supernode"), "--insecure", "--superlink=127.0.0.1:9", f"--port={port}"]
    proc = subprocess.Popen(
        [*args, f"--superexec-auth-secret-file={secret}"], env={**os.environ, "TMPDIR": str(short_tmp)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:

        def superexec() -> list[str]:
            """The running SuperExec's command line (one that stopped is started again: the node needs one)."""
            for child in psutil.Process(proc.pid).children():
                with contextlib.suppress(psutil.Error):
                    if child.status() != psutil.STATUS_ZOMBIE and "flower-superexec" in str(child.cmdline()):
                        return list(child.cmdline())
            return []

        deployment.wait_until(lambda: bool(superexec()), 60, "the node's SuperExec")
        assert f"--superexec-auth-secret-file={secret}" in superexec()  # the one the node started, with the secret
        assert f"--runtime-api-address=127.0.0.1:{port}" in superexec()
        assert claim(f"127.0.0.1:{port}") == 401  # any other local process: refused (Flower's default answers 200)
        assert claim(f"127.0.0.1:{port}", certificates.make_secret(short_tmp / "guess")) == 401
        assert claim(f"127.0.0.1:{port}", secret) == 200  # the secret's holder: served (no task is pending)
        assert (secret.stat().st_mode & 0o777) == 0o600
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_poll_interval_out_of_range_is_one_line():
    done = subprocess.run(
        [str(deployment.BIN / "fedfhe-supernode"), "--poll-interval", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "fedfhe-supernode: --poll-interval must be within [0.01, 60] s, got 0.0"


def test_cold_keeps_flowers_process_per_message(short_tmp):
    env = {**os.environ, "TMPDIR": str(short_tmp)}
    args = [str(deployment.BIN / "fedfhe-supernode"), "--cold", "--insecure", "--superlink=127.0.0.1:9"]
    proc = subprocess.Popen(
        [*args, f"--port={deployment.free_port()}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:

        def superexec_started() -> bool:
            return any("flower-superexec" in " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children())

        deployment.wait_until(superexec_started, 60, "Flower's SuperExec")
        assert not list(short_tmp.glob("fedfhe-supernode-*"))  # no warm process, no shim: Flower's flwr-clientapp
    finally:
        for child in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            child.kill()
        proc.wait()


def test_a_node_removes_the_folders_of_warm_processes_killed_outright(short_tmp):
    def dead_folder(name: str, age_s: float) -> Path:
        """A warm process's folder whose process is gone (SIGKILL): its socket file, nobody listening."""
        folder = short_tmp / name
        folder.mkdir()
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(folder / "clientapp.sock"))
        os.utime(folder, (time.time() - age_s, time.time() - age_s))
        return folder

    stale, recent = dead_folder("fedfhe-supernode-old", 120), dead_folder("fedfhe-supernode-new", 0)
    env = {**os.environ, "TMPDIR": str(short_tmp)}
    args = [str(deployment.BIN / "fedfhe-supernode"), "--insecure", "--superlink=127.0.0.1:9"]
    proc = subprocess.Popen(
        [*args, f"--port={deployment.free_port()}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deployment.wait_until(lambda: len(list(short_tmp.glob("fedfhe-supernode-*/flwr-clientapp"))) == 1, 60, "a node")
        assert not stale.exists()  # over a minute old and nobody answers: gone
        assert recent.exists()  # may be a node still starting: kept
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
