"""Shared helpers (the CLI in a process of its own or in this one, environment, free port, waits, a server) and
the expensive fixtures: each trained run and compiled circuit is built once a session, by whichever xdist worker
asks first, and read by every test that needs it (docs/development.md: tiers, markers, what runs where)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NamedTuple

import httpx
import numpy as np
import pytest

from fedfhe.federated.deployment import _listening, free_port

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
FEDFHE = [sys.executable, "-m", "fedfhe"]
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

__all__ = [
    "ENV",
    "FEDFHE",
    "HEAVY",
    "Ran",
    "Served",
    "answers_equal_concretes",
    "cli",
    "fedfhe",
    "fhe_client",
    "free_port",
    "key_id",
    "serving",
    "wait_for",
]


def fedfhe(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real CLI (`python -m fedfhe ARGS`) in a subprocess; its output is captured as text.

    For what only a process of its own shows: its exit status after the interpreter ends (atexit hooks),
    signals, what imports print, its children. Everything else calls `cli`, which starts no interpreter.
    """
    return subprocess.run(
        [*FEDFHE, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout, check=False
    )


class Ran(NamedTuple):
    """What `cli` gives, named as subprocess.run names it: the exit status and the output."""

    returncode: int
    stdout: str
    stderr: str


@contextmanager
def _descriptors_to(out: IO[bytes], err: IO[bytes]) -> Iterator[None]:
    """Descriptors 1 and 2, and sys.stdout and sys.stderr over them, into two files; all restored after."""
    streams = sys.stdout, sys.stderr
    for stream in streams:
        stream.flush()
    saved = os.dup(1), os.dup(2)
    try:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115 - closed below
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115 - closed below
        yield
    finally:
        for opened in (sys.stdout, sys.stderr):
            opened.flush()
            opened.close()
        sys.stdout, sys.stderr = streams
        for number, copy in zip((1, 2), saved):
            os.dup2(copy, number)
            os.close(copy)


def cli(*args: str) -> Ran:
    """`fedfhe ARGS` in this process: exit status, stdout and stderr as `fedfhe` gives them from a subprocess.

    What native code writes to the descriptors is captured too; the signal handlers and the logging a command
    sets up are undone. It saves an interpreter and its imports (1.6 s and 2 CPU-s for a one-line refusal).
    """
    from fedfhe.cli import main

    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    root_handlers, root_level = logging.root.handlers[:], logging.root.level
    argv, code = sys.argv, 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        with _descriptors_to(out, err):
            sys.argv = ["fedfhe", *args]
            try:
                main()
            except SystemExit as exit:
                if isinstance(exit.code, str):  # as the interpreter does with sys.exit("message")
                    print(exit.code, file=sys.stderr)
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            finally:
                sys.argv = argv
                for number, handler in handlers.items():
                    signal.signal(number, handler)
                logging.root.handlers[:] = root_handlers  # `serve` logs to the stderr captured here
                logging.root.setLevel(root_level)
        out.seek(0)
        err.seek(0)
        return Ran(code, out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll until the condition holds; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.05)


class Served(NamedTuple):
    """A running server: its URL, log file, key store and process id."""

    url: str
    log: Path
    store: Path
    pid: int


@contextmanager
def serving(
    run_dir: Path,
    store: Path,
    log: Path,
    *options: str,
    verify: Any = True,
    nofile: int | None = None,
    port: int | None = None,
) -> Iterator[Served]:
    """A real `fedfhe serve` on a loopback port (a free one unless given; https with --tls-cert), stopped and
    reaped whatever happens.

    It is used once it says `ready on URL`, which it must say only when it answers. `nofile` caps the server's
    open descriptors (ulimit -n) before it starts.
    """
    port = port or free_port()
    url = f"{'https' if '--tls-cert' in options else 'http'}://127.0.0.1:{port}"
    args = ["serve", "--run", str(run_dir), "--port", str(port), "--key-store", str(store), *options]

    command = [*FEDFHE, *args]
    if nofile is not None:  # as a shell would start it after `ulimit -n`
        command = ["bash", "-c", f'ulimit -n {nofile} && exec "$@"', "bash", *command]
    start = log.stat().st_size if log.exists() else 0  # a log may hold an earlier server's lines
    with open(log, "ab") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=ENV)
    try:
        deadline = time.monotonic() + 90
        while f"ready on {url}\n".encode() not in log.read_bytes()[start:]:
            assert proc.poll() is None, f"server exited with {proc.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "server did not say it was ready in 90 s"
            time.sleep(0.05)
        assert httpx.get(f"{url}/v1/health", timeout=5, verify=verify).status_code == 200  # at once: no retry
        yield Served(url, log, store, proc.pid)
    finally:
        proc.terminate()  # SIGTERM: uvicorn shuts down and the pool stops its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fhe_client(key_dir: Path) -> Any:
    """The Concrete client behind an EncryptedClient's key directory (same spec, same private key)."""
    from concrete.ml.deployment import FHEModelClient

    client = FHEModelClient(str(key_dir), key_dir=str(key_dir / "keys"))
    client.generate_private_and_evaluation_keys()  # loads the keys already in key_dir
    return client


def evaluation_keys(run_dir: Path) -> bytes:
    """Evaluation keys made from a run's client spec with Concrete directly, as any client could make them."""
    from concrete import fhe

    with zipfile.ZipFile(run_dir / "fhe" / "client.zip") as spec:
        client = fhe.Client(fhe.ClientSpecs.deserialize(spec.read("client.specs.json")))
    client.keygen(force=True, secret_seed=2, encryption_seed=2)
    return bytes(client.evaluation_keys.serialize())


def key_id(key_dir: Path) -> str:
    """The evaluation key id an EncryptedClient uploaded from this key directory."""
    return str(json.loads((key_dir / "session.json").read_text())["key_id"])


HEAVY = ("concrete.fhe", "concrete.ml", "torch", "sklearn", "flwr", "ray")  # what the encrypting client never loads


def answers_equal_concretes(url: str, key_dir: Path, X: Any) -> None:
    """A classifier's answers for X (numbers, or a table's raw rows), made on concrete.compiler alone, are those of
    Concrete's own fhe.Client over the same key directory, hence the same keys: each one's ciphertexts of the
    quantized rows decrypt to the same integers under both, and the client's scores are those integers' scores
    bit for bit, its classes theirs."""
    from concrete import fhe

    from fedfhe.decision import decide
    from fedfhe.service.client import EncryptedClient
    from fedfhe.service.crypto import CircuitKeys
    from fedfhe.service.processing import read_quantizers
    from fedfhe.service.protocol import OCTET_STREAM, decode_frames, encode_frames
    from fedfhe.service.spec import SPECS, member

    with EncryptedClient(url, key_dir) as client:
        answered = client.predict(X, jobs=1)
        inputs, (low, high), used = client.inputs(X), client.input_range, client.model["inputs_used"]
        classes, point, label = client.classes, client.point, client.outputs == "label"
    spec = (key_dir / "client.zip").read_bytes()
    quantizers = read_quantizers(spec, "the pinned spec")
    rows = quantizers.quantize(((inputs.X - low) / (high - low))[:, used])  # as the client quantizes them
    full = fhe.Client(fhe.ClientSpecs.deserialize(member(spec, SPECS)), key_dir / "keys")
    full.keygen(False)  # a hit in Concrete's keyset cache: the keys the client made there
    assert hashlib.sha256(full.evaluation_keys.serialize()).hexdigest() == key_id(key_dir)
    thin = CircuitKeys(spec, key_dir / "keys")
    decrypted = []
    for ciphertexts in ([full.encrypt(row[None, :]).serialize() for row in rows], [thin.encrypt(row) for row in rows]):
        frames = encode_frames(ciphertexts)
        answer = httpx.post(f"{url}/v1/predict", params={"key_id": key_id(key_dir)}, content=frames,
                            headers={"content-type": OCTET_STREAM}, timeout=120)  # fmt: skip
        assert answer.status_code == 200, answer.text
        outputs = decode_frames(answer.content, len(rows))
        decrypted.append(np.stack([full.decrypt(fhe.Value.deserialize(out)) for out in outputs]))
        decrypted.append(np.stack([thin.decrypt(out) for out in outputs]))
    assert all(np.array_equal(d, decrypted[0]) and d.dtype == np.int64 for d in decrypted)
    if label:  # the circuit's output is the class index
        assert answered.scores is None and np.array_equal(answered.predicted, classes[decrypted[0].reshape(-1)])
        return
    scores = np.vstack([quantizers.scores(out, True) for out in decrypted[0]])
    assert answered.scores is not None and np.array_equal(answered.scores, scores)  # bit for bit
    assert np.array_equal(answered.predicted, classes[decide(scores, point)])


# Tests that read one of these expensive shared artifacts run on one xdist worker, so that the other never
# waits for its build: `--dist loadgroup` (Makefile) keeps a group together.
GROUPED = ("cli_run", "deployed", "label_run", "owners_run", "private_run", "wheel_federation")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group each test by the first expensive artifact it reads, unless its module groups it already."""
    for item in items:
        shared = [name for name in GROUPED if name in getattr(item, "fixturenames", ())]
        if shared and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(shared[0]))


def pytest_sessionfinish(session, exitstatus) -> None:
    """Keep pytest's exit status: tests that import Concrete directly register its exit hook (fhe.keep_exit_status)."""
    from fedfhe.fhe import keep_exit_status

    keep_exit_status()


@pytest.fixture(scope="session", autouse=True)
def ray_cluster(request) -> Iterator[None]:
    """One Ray cluster for this worker's Flower simulations, which join it (RAY_ADDRESS) instead of starting one.

    The simulations are Flower's own; what goes is starting and stopping Ray's processes for each (5 s and
    6 CPU-s a simulation, measured). The cluster declares 1 CPU, so Flower runs one ClientApp actor that takes
    the clients in turn (an actor costs 2.4 CPU-s to start; a test's clients train in milliseconds), and starts
    no idle workers in advance. Only a session with federation tests starts it. The tests of a fresh Ray's own
    processes leave RAY_ADDRESS out (test_interrupt).
    """
    if not any(item.get_closest_marker("federation") for item in request.session.items):
        yield
        return
    port = free_port()
    folder = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 bytes
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=1"]
    command += [
        "--include-dashboard=false",
        "--include-log-monitor=false",
        "--disable-usage-stats",
        f"--temp-dir={folder}",
        "--min-worker-port=0",  # ray start hands out 10002.. by default: two workers' clusters bound the same port
        "--max-worker-port=0",
    ]
    for flag in ("--ray-client-server-port", "--dashboard-port", "--dashboard-agent-listen-port"):
        command.append(f"{flag}={free_port()}")  # fixed by default: two workers' clusters would collide
    env = {**ENV, "RAY_enable_worker_prestart": "0"}
    ray = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        address = f"127.0.0.1:{port}"
        wait_for(lambda: ray.poll() is not None or _listening(port), 60, "Ray's head node")
        assert ray.poll() is None, f"ray start exited with {ray.returncode}"
        os.environ["RAY_ADDRESS"] = ENV["RAY_ADDRESS"] = address
        yield
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        ENV.pop("RAY_ADDRESS", None)
        os.killpg(ray.pid, signal.SIGTERM)  # ray start and every process of the cluster lead one session
        try:
            ray.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ray.pid, signal.SIGKILL)
            ray.wait()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def once(tmp_path_factory, worker_id) -> Callable[[str, Callable[[Path], object]], Path]:
    """`once(name, build)`: the folder `build` fills, built once a session whichever xdist worker asks first.

    The other workers wait on a lock and read the same folder: a test that changes an artifact changes a copy.
    """
    root = tmp_path_factory.getbasetemp()
    root = (root if worker_id == "master" else root.parent) / "once"  # the workers' basetemps share a parent
    root.mkdir(exist_ok=True)

    def get(name: str, build: Callable[[Path], object]) -> Path:
        folder, built = root / name, root / f"{name}.built"
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not built.exists():
                shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way starts over
                build(folder)
                built.touch()
        return folder

    return get


def copy_of(run: Path, folder: Path) -> Path:
    """A shared run copied into the test's folder, for a test that changes it."""
    return Path(shutil.copytree(run, folder / run.name))


@pytest.fixture(scope="session")
def served_run(once) -> Path:
    """One run to serve: digits, trained centrally, compiled at 6 bits."""

    def build(out: Path) -> None:
        done = cli(
            "run", "--dataset", "digits", "--clients", "1", "--n-bits", "6", "--fhe-samples", "0", "--out", str(out)
        )
        assert done.returncode == 0, done.stderr

    return once("served-run", build)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled 8x8 digits, split with seed 0."""
    from fedfhe.data import load_dataset

    return load_dataset("digits", seed=0)


FEDERATED = {"clients": 3, "rounds": 2, "local_iters": 10, "seed": 0}  # federated_run's settings


@pytest.fixture(scope="session")
def federated_run(once, digits) -> Path:
    """A real Flower simulation: digits, 3 clients, 2 rounds (FEDERATED); its run directory, read-only."""
    from fedfhe import TrainConfig, train

    def build(out: Path) -> None:
        rounds: list[int] = []
        train(digits, TrainConfig(**FEDERATED), out, on_round=lambda r, m: rounds.append(r))
        assert rounds == [0, 1, 2]

    return once("federated-run", build)
