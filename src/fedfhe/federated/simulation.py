"""Run the ClientApp and ServerApp together on Flower's simulation engine (Ray), in a child process.

Why a child process, measured with Flower 1.42 and Ray 2.55 (`fedfhe train --clients 3`, a signal after
round 1): `run_simulation` installs no signal handler; Ray starts gcs_server, raylet, its two agents and
the ClientApp workers in the caller's process group, with SIGINT blocked. On Ctrl-C the main thread
leaves the engine and Ray shuts down, but the ServerApp thread Flower started waits for replies until
the round timeout, so the process hangs at exit (a second Ctrl-C: a traceback). SIGTERM meets Ray's
native handler in the driver: a stack dump, then SIGABRT. So the engine runs in a fresh interpreter that
leads a session of its own (a terminal's Ctrl-C does not reach it) and that Linux kills if its parent
dies; whatever interrupts the parent's wait kills that whole session's process group, Ray's processes
in it, at once (about 1 s from Ctrl-C to exit). Checkpoints are written atomically: the run stays
resumable. Not a fork: a process that has run Ray before forks children that crash in Ray (SIGSEGV).
The outcome goes back as soon as the ServerApp's main returns, and the parent then kills the session as
on an interrupt: Flower's and Ray's orderly shutdown took 2 s more a run, for nothing the run keeps.

When the parent dies outright (kill -9), Linux kills the child, and a watcher the child started (a bare
interpreter, 9 MB) kills the rest of its group within 0.2 s. Ray ties only gcs_server and raylet to the
child's life: its DashboardAgent and RuntimeEnvAgent (190 MB; `include_dashboard=False` does not leave
them out) see the raylet gone within 2 s, then wait for a 60 s timeout reporting that to the dead GCS
before they exit (62 s measured). No Ray or Flower setting shortens that.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid
from flwr.simulation import run_simulation
from threadpoolctl import threadpool_limits

from fedfhe.config import TrainConfig
from fedfhe.errors import FedfheError
from fedfhe.federated.client_app import build_client_app, client_mods
from fedfhe.federated.server_app import ServerRun, build_server_app

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a Linux process gets when its parent dies
# The watcher's program: once the child (its parent) is gone, kill the child's process group, Ray's processes.
WATCHER = "import os, signal, time\nwhile os.getppid() == {}:\n    time.sleep(0.2)\nos.killpg(0, signal.SIGKILL)"


def simulate(config: TrainConfig, server: ServerRun, partition_dir: Path, verbose: bool = False) -> None:
    """Run the server's rounds against one virtual SuperNode per partition file, in a child process.

    `server.on_round` is called here after each round, and the next round waits for it, as if the
    rounds ran here; `server` ends as they left it. Anything that interrupts the wait (Ctrl-C, an
    exception from on_round or a signal handler) kills the child and all of Ray's processes before it
    propagates.
    """
    here, there = multiprocessing.Pipe()
    code = f"from fedfhe.federated import simulation; simulation.child({there.fileno()}, {os.getpid()})"
    child = subprocess.Popen([sys.executable, "-c", code], pass_fds=[there.fileno()], start_new_session=True)
    try:
        there.close()
        here.send((config, server, partition_dir, verbose))
        while True:
            try:
                kind, value = here.recv()
            except EOFError:
                raise FedfheError(f"the Flower simulation process died (exit code {child.wait()})") from None
            if kind == "error":
                raise _rebuilt(*value)
            if kind == "done":
                server.restore(value)
                return
            if server.on_round is not None:
                server.on_round(*value)
            here.send("go on")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # the child's session: Ray's processes are in its group
        child.wait()


def run_in_process(
    config: TrainConfig, server_main: Callable[[Grid, Context], None], partition_dir: Path, verbose: bool = False
) -> None:
    """Run a server main function against one virtual SuperNode per partition file, Ray started from here.

    Ray's workers read the files by absolute path: with RAY_ADDRESS they join a running cluster, whose working
    directory is not ours.
    """
    partition_dir = Path(partition_dir).resolve()
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "include_dashboard": False,
            "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.ERROR,
        },
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.INFO if verbose else logging.ERROR)
    try:
        # One BLAS thread in this process (the server's evaluation is small; clients are Ray processes):
        # OpenBLAS 0.3.23's thread pool was seen spinning forever in the server thread's first matmul
        # when several simulations ran in one process (benchmarks, `tune --sweep`).
        with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
            warnings.simplefilter("ignore")
            run_simulation(
                server_app=build_server_app(server_main),
                client_app=build_client_app(partition_dir, client_mods(config.secagg, config.dp, config.clipping)),
                num_supernodes=config.clients,
                backend_config=backend_config,
            )
    finally:
        flwr_logger.setLevel(level)


def child(fd: int, parent: int) -> None:
    """The child process: dies with its parent, Ray's processes too, runs the rounds, sends each back and the outcome."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl
        return
    subprocess.Popen([sys.executable, "-I", "-S", "-c", WATCHER.format(os.getpid())])
    parent_end = Connection(fd)
    config, server, partition_dir, verbose = parent_end.recv()

    def on_round(r: int, metrics: dict[str, float]) -> None:
        parent_end.send(("round", (r, metrics)))
        parent_end.recv()  # the parent's on_round has returned

    def main(grid: Grid, context: Context) -> None:  # the outcome goes back before Flower and Ray tear down
        server(grid, context)
        parent_end.send(("done", server.state()))

    server.on_round = on_round
    try:
        run_in_process(config, main, partition_dir, verbose)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
        parent_end.send(("error", _described(exc)))


def _described(exc: BaseException) -> tuple[bool, str, str]:
    """A failure as plain strings (no exception object crosses the pipe): ours or not, its line, its trace."""
    mine = isinstance(exc, FedfheError)
    return mine, str(exc) if mine else f"{type(exc).__name__}: {exc}", "".join(traceback.format_exception(exc))


def _rebuilt(mine: bool, message: str, trace: str) -> Exception:
    """The child's failure in the parent: our one-line error, or a RuntimeError that keeps the child's trace."""
    if mine:
        return FedfheError(message)
    exc = RuntimeError(message)
    exc.add_note(f"in the simulation process:\n{trace}")  # shown with FEDFHE_DEBUG=1
    return exc
