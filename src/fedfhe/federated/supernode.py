"""A data owner's SuperNode, warm: Flower's own SuperNode with its ClientApps forked from a process that has imported them.

Flower 1.42 starts a fresh `flwr-clientapp` process for every message (a second of imports, two on a busy
2-core machine) and lets an idle SuperNode sleep 3 s between pulls. `fedfhe-supernode` takes every option
of `flower-supernode` and changes only those two costs: a process that has already imported Flower, the
ClientApp and SciPy forks a child per message that runs Flower's own `flwr-clientapp` code, and the idle
pull waits `--poll-interval` seconds. Without the warm process (it died, or `flower-supernode` runs the
node) the `flwr-clientapp` on PATH starts Flower's own command, as before.

Given `--superexec-auth-secret-file`, only a SuperExec holding that secret may claim the node's tasks on its
Runtime API. Flower 1.42 honours the secret only with `--isolation process`, where the SuperNode starts no
SuperExec; `fedfhe-supernode` then starts the one Flower would have, with the secret, and again if it stops
(it stops itself on any 401: once seen under load in the tests, which would leave the node claiming nothing).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

SOCKET = "FEDFHE_CLIENTAPP_SOCKET"  # where the shim finds the warm process
PRELOAD = ("flwr.supernode.cli.flwr_clientapp", "fedfhe.federated.client_app", "scipy.optimize")
FDS = 3  # stdin, stdout and stderr travel with each request
PREFIX = "fedfhe-supernode-"  # each warm process's folder in the temporary directory: shim and socket
STALE_S = 60.0

# The `flwr-clientapp` Flower's SuperExec finds first on PATH: standard library only, so it starts in ~20 ms.
SHIM = """#!{python} -IS
import json, os, signal, socket, sys
real = {real!r}
try:
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(os.environ[{env!r}])
except (KeyError, OSError):
    os.execv(real, [real, *sys.argv[1:]])
request = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
socket.send_fds(conn, [len(request).to_bytes(4, "big")], [0, 1, 2])
conn.sendall(request)
replies = conn.makefile()
child = int(replies.readline() or 0)
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda s, _: child and os.kill(child, s))
sys.exit(int(replies.readline() or 1))
"""


class _Clock:
    """The `time` module as Flower's SuperNode sees it, its sleeps (3 s when idle) capped at the poll interval."""

    def __init__(self, poll: float) -> None:
        self.poll = poll

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.poll))


def _receive(conn: socket.socket) -> dict[str, Any]:
    """One request from the shim: its standard streams become ours, then its argv, cwd and environment."""
    head, fds, _, _ = socket.recv_fds(conn, 4, FDS)
    if not head:
        raise ConnectionAbortedError("a probe: connected and left")
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    size, body = int.from_bytes(head, "big"), b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("the shim hung up")
        body += chunk
    request: dict[str, Any] = json.loads(body)
    return request


def _child(conn: socket.socket) -> NoReturn:
    """Run Flower's `flwr-clientapp` for one message, as the shim's process would have; report the exit code."""
    code = 1
    try:
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        request = _receive(conn)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import numpy as np

        np.random.seed()  # a fresh process would not share its random stream with its siblings
        conn.sendall(f"{os.getpid()}\n".encode())
        sys.argv = ["flwr-clientapp", *request["argv"]]
        from flwr.supernode.cli import flwr_clientapp

        flwr_clientapp()
        code = 0
    except ConnectionAbortedError:  # another node's sweep checked that we are alive
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    except BaseException:  # noqa: BLE001 - reported on the ClientApp's stderr, as Flower's own process would
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        try:
            conn.sendall(f"{code}\n".encode())
        finally:
            os._exit(code)


def _serve(listener: socket.socket, parent: int, folder: Path) -> NoReturn:
    """Fork one child per request until the SuperNode (our parent) is gone or we are stopped; then tidy up."""
    me = os.getpid()

    def stop(*_: object) -> None:
        if os.getpid() != me:  # a child stopped before it took Flower's handlers
            os._exit(128 + signal.SIGTERM)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # one sent meanwhile arrives now, to `stop`
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the SuperNode; we follow it
    try:
        while os.getppid() == parent:
            if select.select([listener], [], [], 1.0)[0]:
                conn, _ = listener.accept()
                if os.fork() == 0:
                    listener.close()
                    _child(conn)
                conn.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)


def _sweep(tmp: Path) -> None:
    """Remove the folders of warm processes that were killed outright (SIGKILL leaves no time to tidy up).

    A folder is stale when it is ours, over a minute old, and nothing answers on its socket.
    """
    for folder in tmp.glob(f"{PREFIX}*"):
        try:
            if folder.stat().st_uid != os.getuid() or time.time() - folder.stat().st_mtime < STALE_S:
                continue
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(folder / "clientapp.sock"))
        except ConnectionRefusedError:  # bound by a process that is gone
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # no socket (yet), or not ours to judge
            continue


def _warm() -> None:
    """Import what a ClientApp needs, fork the warm process, and point Flower's SuperExec at the shim."""
    for module in PRELOAD:
        importlib.import_module(module)
    _sweep(Path(tempfile.gettempdir()))
    folder = Path(tempfile.mkdtemp(prefix=PREFIX))  # the warm process removes it when it ends
    shim = folder / "flwr-clientapp"
    real = Path(sys.executable).parent / "flwr-clientapp"
    shim.write_text(SHIM.format(python=sys.executable, real=str(real), env=SOCKET))
    shim.chmod(0o700)
    path = folder / "clientapp.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(64)
    parent = os.getpid()
    # SIGTERM waits until the warm process has its handler: one that came first killed it untidy (the folder
    # stayed; seen once in make test, from a process-group SIGTERM right after the socket appeared).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    if os.fork() == 0:
        _serve(listener, parent, folder)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    listener.close()
    os.environ[SOCKET] = str(path)
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ['PATH']}"


def superexec_command(runtime: str, tls: list[str], secret: str | os.PathLike[str], parent: int) -> list[str]:
    """Flower's SuperExec for the Runtime API at `runtime`, signing its task claims with the secret; it ends with `parent`."""
    return [
        str(Path(sys.executable).parent / "flower-superexec"),
        f"--runtime-api-address={runtime}",
        *tls,
        f"--superexec-auth-secret-file={secret}",
        f"--parent-pid={parent}",
    ]


def _signed(theirs: list[str]) -> list[str]:
    """Flower's options; given a secret file, the SuperExec Flower would start is started here, with the secret.

    Flower 1.42 ignores the secret in its default `--isolation subprocess`, the one that starts a SuperExec
    (start_client_internal.py): the node switches to `process`, and its SuperExec (same Runtime API address and
    TLS, ending with this process) gets the secret.
    """
    from flwr.common.constant import ISOLATION_MODE_PROCESS
    from flwr.supercore.address import resolve_bind_address
    from flwr.supercore.tls import get_client_tls_args
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    args = _parse_args_run_supernode().parse_args(theirs)
    if args.superexec_auth_secret_file is None or args.isolation == ISOLATION_MODE_PROCESS:
        return theirs
    host = f"[{args.host}]" if ":" in args.host else args.host
    insecure = not (args.ssl_certfile or args.ssl_keyfile or args.ssl_ca_certfile)
    command = superexec_command(
        resolve_bind_address(f"{host}:{args.port}"),
        get_client_tls_args(insecure, args.ssl_ca_certfile),
        args.superexec_auth_secret_file,
        os.getpid(),
    )
    if args.runtime_dependency_install:
        command.append("--allow-runtime-dependency-installation")
    threading.Thread(target=_keep_running, args=(command,), name="superexec", daemon=True).start()
    return [*theirs, f"--isolation={ISOLATION_MODE_PROCESS}"]


def _keep_running(command: list[str]) -> None:
    """Run the SuperExec (in our process group, ending with us: --parent-pid), and again whenever it stops while
    the node runs: Flower's SuperExec stops itself on any 401, and without it the node claims no task."""
    pause = 1.0
    while True:
        started = time.monotonic()
        subprocess.run(command, check=False)
        pause = 1.0 if time.monotonic() - started > 60 else min(2 * pause, 60.0)  # a wrong secret: backs off
        time.sleep(pause)


def main(argv: list[str] | None = None) -> None:
    """`fedfhe-supernode [--poll-interval S] [--cold] <flower-supernode options>`."""
    parser = argparse.ArgumentParser(prog="fedfhe-supernode", description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds an idle node waits to pull")
    parser.add_argument("--cold", action="store_true", help="Flower's fresh process per message")
    ours, theirs = parser.parse_known_args(argv)
    helping = bool({"-h", "--help"} & set(theirs))
    if helping:
        parser.print_help()  # then Flower's own options, from flower-supernode below
    if not 0.01 <= ours.poll_interval <= 60:
        parser.exit(2, f"fedfhe-supernode: --poll-interval must be within [0.01, 60] s, got {ours.poll_interval}\n")
    import flwr.supernode.start_client_internal as node
    from flwr.supernode.cli import flower_supernode

    if getattr(node, "time", None) is not time:  # the module-level `time` whose sleep(3) we shorten
        parser.exit(2, "fedfhe-supernode: this Flower's SuperNode loop is not the one of 1.42; use flower-supernode\n")
    setattr(node, "time", _Clock(ours.poll_interval))  # noqa: B010 - Flower 1.42 hard-codes its idle sleep
    # Flower starts flower-superexec by name: found beside our Python even in a venv nobody activated.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if not (ours.cold or helping):
        _warm()  # first: the SuperExec started below finds the shim through our environment
    sys.argv = ["flower-supernode", *(theirs if helping else _signed(theirs))]
    flower_supernode()


if __name__ == "__main__":
    main()
