"""FHE evaluation in worker processes, so a slow or failing circuit never blocks the event loop.

Workers hold the circuit and a small cache of deserialized evaluation keys, read from the key store
by path: a request ships ciphertexts and a key id, never the keys. Workers die with the server
(Linux parent-death signal, and a watchdog elsewhere); a dead worker's pool is replaced by a warmed
one in the background, and requests wait for it instead of meeting a cold worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from fedfhe.errors import FedfheError
from fedfhe.fhe import SCRATCH_PREFIX, CircuitServer
from fedfhe.native import native_quiet
from fedfhe.service import keyset
from fedfhe.service.keystore import UnknownKey
from fedfhe.service.workers import keep_freed_memory, spawn_pool, usable_cores

KEYS_PER_WORKER = 8  # deserialized evaluation keys each worker keeps (least recently used go first)
_keys: OrderedDict[str, Any] = OrderedDict()


class Rejected(FedfheError):
    """Concrete refused a ciphertext or key: the client sent something that is not for this circuit."""


class EvaluationTimeout(FedfheError):
    """A request's FHE work took longer than its deadline."""


class WorkerDied(FedfheError):
    """Every worker is gone and none came back in time; the request may be retried."""


class Crashed(WorkerDied):
    """A worker died on this request, and again on the retry in a fresh pool."""


@functools.cache
def _server(fhe_dir: str) -> CircuitServer:
    """One circuit per worker process, loaded once."""
    return CircuitServer(fhe_dir)


def _first_line(exc: BaseException) -> str:
    """Concrete's messages can span lines; logs and HTTP answers want one."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _start_worker(fhe_dir: str, loaded: Any, threads: int, scratch: str) -> None:
    """Load the circuit before any work, then say so (a worker still loading takes no task, so _ready alone
    cannot tell that every worker has loaded). Concrete's temporary folders go into the evaluator's `scratch`.

    Concrete's runtime runs a circuit on as many OpenMP threads as there are cores: with a worker per
    core they spin against each other (mnist-5k on 2 cores: 2 workers did 17 runs/s, at 1 thread each 25),
    while one worker's label circuit runs 1.8x faster on 2 threads than on 1.
    """
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read when Concrete's runtime loads, just below
    tempfile.tempdir = scratch
    keep_freed_memory()
    with contextlib.suppress(Exception):  # a circuit that cannot load is reported by _ready, in one line
        _server(fhe_dir)
    loaded.put(os.getpid())


def _ready(fhe_dir: str) -> None:
    """Check that this worker holds the circuit; a server.zip Concrete cannot load is one line."""
    try:
        _server(fhe_dir)
    except Exception as exc:  # noqa: BLE001 - Concrete and zipfile raise many kinds; all mean a bad server.zip
        raise Rejected(f"{Path(fhe_dir) / 'server.zip'}: cannot be loaded ({_first_line(exc)})") from None


def _evaluation_keys(key_id: str, path: str) -> Any:
    """The deserialized evaluation keys of this id, from this worker's cache or the key store."""
    from concrete import fhe  # concrete-python: no torch, no notice to silence

    if key_id in _keys:
        _keys.move_to_end(key_id)
        return _keys[key_id]
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UnknownKey(f"unknown key id {key_id}; upload the evaluation keys again") from None
    try:
        keys = fhe.EvaluationKeys.deserialize(data)
    except (RuntimeError, ValueError) as exc:
        raise Rejected(f"stored evaluation keys are unreadable ({_first_line(exc)})") from None
    _keys[key_id] = keys
    if len(_keys) > KEYS_PER_WORKER:
        _keys.popitem(last=False)
    return keys


def _run(fhe_dir: str, ciphertext: bytes, key_id: str, key_path: str) -> bytes:
    """Evaluate one ciphertext; Concrete's errors become Rejected so they cross the process boundary cleanly."""
    keys = _evaluation_keys(key_id, key_path)
    try:
        return _server(fhe_dir).run(ciphertext, keys)
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise Rejected(_first_line(exc)) from None


@functools.cache
def _expected_keys(fhe_dir: str) -> keyset.Layout:
    """What evaluation keys for this circuit look like: those of a keyset made here from its client spec."""
    from concrete import fhe

    client = fhe.Client(_server(fhe_dir).server.client_specs)
    with native_quiet():
        client.keygen(force=True, secret_seed=1, encryption_seed=1)
    return keyset.layout(client.evaluation_keys.serialize())


def _check_key(fhe_dir: str, key: bytes) -> None:
    """Deserialize evaluation keys as the circuit will; they must serialize back to exactly the bytes sent,
    and hold the keys this circuit uses with its parameters (sizes, ids, dimensions), nothing else."""
    from concrete import fhe

    try:
        again = fhe.EvaluationKeys.deserialize(key).serialize()
    except (RuntimeError, ValueError) as exc:
        raise Rejected(f"not Concrete evaluation keys ({_first_line(exc)})") from None
    if again != key:
        raise Rejected(f"not Concrete evaluation keys alone: {len(key)} bytes sent, the keys in them are {len(again)}")
    try:
        sent = keyset.layout(key)
    except keyset.Malformed as exc:
        raise Rejected(f"not Concrete evaluation keys ({exc})") from None
    expected = _expected_keys(fhe_dir)
    if sent != expected:
        need, have = keyset.counts(expected), keyset.counts(sent)
        needed = ", ".join(f"{n} {kind}" for n, kind in zip(need, keyset.LISTS))
        held = "the same numbers with other parameters" if have == need else ", ".join(map(str, have))
        raise Rejected(f"evaluation keys for another circuit: this one needs {needed} keys of its parameters ({held})")


class Evaluator:
    """N worker processes, each holding the circuit; replaced whole, warmed, when a worker dies."""

    def __init__(self, fhe_dir: Path, workers: int, threads: int | None = None) -> None:
        if workers < 1:
            raise FedfheError(f"--workers must be at least 1 (got {workers})")
        if threads is not None and threads < 1:
            raise FedfheError(f"--threads must be at least 1 (got {threads})")
        self.fhe_dir, self.workers = str(fhe_dir), workers
        self.threads = threads or max(1, usable_cores() // workers)
        self._pool: ProcessPoolExecutor | None = None
        self._scratch: str | None = None  # the workers' temporary folder (Concrete's), made by start
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self.crashed: set[str] = set()  # key ids the workers died on, twice
        self._gate = asyncio.Condition()  # requests share the pool; a retry after a death has it alone
        self._in_pool, self._alone_now = 0, False

    def start(self) -> None:
        """Start the workers and load the circuit in each, once; a circuit that cannot load is one line."""
        with self._lock:
            if self._pool is None:
                self._scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX)
                try:
                    self._pool = self._warm_pool()
                except BaseException:
                    shutil.rmtree(self._scratch, ignore_errors=True)
                    raise
                self._ready.set()

    def alive(self) -> int:
        """Workers of the current pool that are running."""
        return 0 if self._pool is None else sum(1 for pid in _pids(self._pool) if _running(pid))

    async def supervise(self, every: float = 0.5) -> None:
        """Replace the pool as soon as a worker is found dead (ProcessPoolExecutor then fails whole)."""
        while True:
            await asyncio.sleep(every)
            if self._ready.is_set() and self.alive() < self.workers:
                await asyncio.to_thread(self._replace)

    async def check_key(self, key: bytes, timeout: float) -> None:
        """Refuse keys Concrete cannot read, that carry anything more, or that are not this circuit's keys;
        parsing happens in a worker."""
        try:
            await self._submit([(_check_key, self.fhe_dir, key)], timeout)
        except Crashed:
            raise Rejected("these evaluation keys crashed an FHE worker twice") from None

    async def run(self, ciphertexts: list[bytes], key_id: str, key_path: Path, timeout: float) -> list[bytes]:
        """Evaluate a batch across the workers under one deadline; the first bad frame stops the batch.

        Keys under which workers died twice are refused from then on: one client cannot keep the pool restarting.
        """
        if key_id in self.crashed:
            raise Rejected(
                f"key id {key_id[:12]} crashed the FHE workers; upload evaluation keys made for this circuit"
            )
        try:
            return await self._submit([(_run, self.fhe_dir, c, key_id, str(key_path)) for c in ciphertexts], timeout)
        except Crashed:
            self.crashed.add(key_id)
            raise Rejected(
                f"key id {key_id[:12]} crashed the FHE workers twice and is refused from now on; "
                "upload evaluation keys made for this circuit"
            ) from None

    async def _submit(self, calls: list[tuple[Any, ...]], timeout: float) -> list[Any]:
        """Run calls in the pool under one deadline. A pool found broken is replaced (warm) and the calls tried
        once more with the pool to themselves: if it breaks again, they are what breaks it (Crashed)."""
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout), self._shared():
                return await self._attempt(calls, deadline, timeout)
        except (BrokenProcessPool, RuntimeError):  # RuntimeError: the pool was shut down for a replacement
            pass
        except TimeoutError:
            raise EvaluationTimeout(f"FHE evaluation took longer than {timeout:g} s") from None
        deadline = time.monotonic() + timeout  # the retry's own time: every first death gets a verdict
        try:
            async with asyncio.timeout(timeout), self._alone():
                await asyncio.to_thread(self._replace, True)  # no job of an earlier request runs beside the retry
                return await self._attempt(calls, deadline, timeout)
        except (BrokenProcessPool, RuntimeError):
            raise Crashed("an FHE worker died on this request, and again with the pool to itself") from None
        except TimeoutError:
            raise WorkerDied(f"an FHE worker died on this request and no retry fitted in {timeout:g} s") from None

    async def _attempt(self, calls: list[tuple[Any, ...]], deadline: float, timeout: float) -> list[Any]:
        """Once the pool is ready, gather the calls."""
        if not await asyncio.to_thread(self._ready.wait, max(deadline - time.monotonic(), 0)):
            raise WorkerDied(f"no FHE worker came back within {timeout:g} s; retry later")
        return await self._gather(calls, deadline, timeout)

    @contextlib.asynccontextmanager
    async def _shared(self) -> AsyncIterator[None]:
        """Use the pool alongside other requests (not while one has it to itself)."""
        async with self._gate:
            await self._gate.wait_for(lambda: not self._alone_now)
            self._in_pool += 1
        try:
            yield
        finally:
            async with self._gate:
                self._in_pool -= 1
                self._gate.notify_all()

    @contextlib.asynccontextmanager
    async def _alone(self) -> AsyncIterator[None]:
        """Have the pool to ourselves: wait for the requests in it to finish, let no other in meanwhile."""
        async with self._gate:
            await self._gate.wait_for(lambda: not self._alone_now)
            self._alone_now = True
            try:
                await self._gate.wait_for(lambda: self._in_pool == 0)
            except BaseException:
                self._alone_now = False
                self._gate.notify_all()
                raise
        try:
            yield
        finally:
            async with self._gate:
                self._alone_now = False
                self._gate.notify_all()

    async def _gather(self, calls: list[tuple[Any, ...]], deadline: float, timeout: float) -> list[Any]:
        """Submit every call, collect in order; the first error cancels what has not started."""
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self._pool, *call) for call in calls]
        index = {job: i for i, job in enumerate(jobs)}
        results: list[Any] = [None] * len(jobs)
        pending = set(jobs)
        try:
            while pending:
                remaining = deadline - time.monotonic()
                done, pending = await asyncio.wait(pending, timeout=max(remaining, 0), return_when="FIRST_EXCEPTION")
                if not done:
                    raise EvaluationTimeout(f"FHE evaluation took longer than {timeout:g} s")
                for job in done:
                    error = job.exception()
                    if isinstance(error, Rejected) and len(jobs) > 1:
                        raise Rejected(f"ciphertext {index[job]}: {error}")
                    if error is not None:
                        raise error
                    results[index[job]] = job.result()
        finally:
            for job in pending:
                job.cancel()
        return results

    def _warm_pool(self) -> ProcessPoolExecutor:
        """A new pool whose every worker has loaded the circuit (spawned: the server process has threads)."""
        loaded = multiprocessing.get_context("spawn").Queue()
        pool = spawn_pool(self.workers, _start_worker, self.fhe_dir, loaded, self.threads, self._scratch)
        try:
            for future in [pool.submit(_ready, self.fhe_dir) for _ in range(self.workers)]:
                future.result(timeout=600)
            for _ in range(self.workers):
                loaded.get(timeout=600)
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            raise FedfheError(f"{self.fhe_dir}: the FHE workers died while loading the circuit") from None
        except queue.Empty:
            pool.shutdown(wait=False, cancel_futures=True)
            raise FedfheError(f"{self.fhe_dir}: the FHE workers did not load the circuit within 600 s") from None
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        return pool

    def _replace(self, fresh: bool = False) -> None:
        """Swap in a warmed pool when a worker died (or, `fresh`, anyway); requests wait (up to their deadline)
        while it loads. The old workers are killed: a job left running by a request that stopped waiting (timed
        out, or refused at another frame) could otherwise die later, beside a retry that has the pool alone."""
        with self._lock:
            if not fresh and self.alive() >= self.workers:
                return
            self._ready.clear()
            if self._pool is not None:
                old = _pids(self._pool)
                self._pool.shutdown(wait=False, cancel_futures=True)
                for pid in old:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            try:
                self._pool = self._warm_pool()
            finally:
                self._ready.set()

    def close(self) -> None:
        """Stop the workers, dropping queued work, and remove their temporary folder; waits, since uvicorn exits
        by re-raising the signal.

        The pool goes too: the semaphores of the queue it holds (`loaded`) are unlinked when it is collected,
        and a process that a signal ends runs no exit hook to do it (the resource tracker warned of them).
        """
        self._ready.clear()  # no replacement pool from here on; a late request waits for its deadline
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


def _pids(pool: ProcessPoolExecutor) -> list[int]:
    """The pool's worker pids (CPython keeps them in `_processes`; nothing public lists them)."""
    return list(getattr(pool, "_processes", {}) or {})


def _running(pid: int) -> bool:
    """Whether a process is alive (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b") ", 1)[1][:1] != b"Z"
    except (FileNotFoundError, IndexError):
        return False
    except OSError:
        with contextlib.suppress(OSError):
            os.kill(pid, 0)
            return True
        return False
