"""FHE evaluation in worker processes, so a slow or failing circuit never blocks the event loop."""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from fedfhe.errors import FedfheError


class Rejected(FedfheError):
    """Concrete refused a ciphertext or key: the client sent something that is not for this circuit."""


class EvaluationTimeout(FedfheError):
    """A request's FHE work took longer than its deadline."""


class WorkerDied(FedfheError):
    """A worker process crashed; the pool is replaced and the request may be retried."""


@functools.cache
def _server(fhe_dir: str) -> Any:
    """One FHEModelServer per worker process, loaded once."""
    from concrete.ml.deployment import FHEModelServer

    return FHEModelServer(fhe_dir)


def _ready(fhe_dir: str) -> None:
    """Load the circuit in this worker (a no-op once loaded)."""
    _server(fhe_dir)


def _first_line(exc: BaseException) -> str:
    """Concrete's messages can span lines; logs and HTTP answers want one."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _run(fhe_dir: str, ciphertext: bytes, key: bytes) -> bytes:
    """Evaluate one ciphertext; Concrete's errors become Rejected so they cross the process boundary cleanly."""
    try:
        return _server(fhe_dir).run(ciphertext, key)
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise Rejected(_first_line(exc)) from None


def _check_key(key: bytes) -> None:
    """Deserialize evaluation keys as the circuit will, so garbage is refused at upload time."""
    from concrete import fhe

    try:
        fhe.EvaluationKeys.deserialize(key)
    except (RuntimeError, ValueError) as exc:
        raise Rejected(f"not Concrete evaluation keys ({_first_line(exc)})") from None


class Evaluator:
    """A pool of N worker processes, each holding the circuit; replaced whole if a worker dies."""

    def __init__(self, fhe_dir: Path, workers: int) -> None:
        if workers < 1:
            raise FedfheError(f"--workers must be at least 1 (got {workers})")
        self.fhe_dir, self.workers = str(fhe_dir), workers
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        """Spawned (not forked) workers: the server process has threads, which fork does not copy safely."""
        return ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_ready, initargs=(self.fhe_dir,)
        )

    async def warm_up(self) -> None:
        """Start every worker and load the circuit before the first request arrives."""
        await self._submit([(_ready, self.fhe_dir)] * self.workers, timeout=600)

    async def check_key(self, key: bytes, timeout: float) -> None:
        """Refuse keys Concrete cannot read; parsing happens in a worker, never in the server process."""
        (result,) = await self._submit([(_check_key, key)], timeout)
        if isinstance(result, Rejected):
            raise result

    async def run(self, ciphertexts: list[bytes], key: bytes, timeout: float) -> list[bytes]:
        """Evaluate a batch across the workers; the whole batch shares one deadline."""
        results = await self._submit([(_run, self.fhe_dir, c, key) for c in ciphertexts], timeout)
        for i, result in enumerate(results):
            if isinstance(result, Rejected):
                raise Rejected(f"ciphertext {i}: {result}")
        return results

    async def _submit(self, calls: list[tuple[Any, ...]], timeout: float) -> list[Any]:
        """Run calls in the pool under one deadline; Rejected comes back as a value, anything else is raised."""
        loop = asyncio.get_running_loop()
        pool = self._pool
        try:
            jobs = [loop.run_in_executor(pool, *call) for call in calls]
        except BrokenProcessPool:  # a worker died while idle; nothing of this request ran yet
            pool = self._replace(pool)
            jobs = [loop.run_in_executor(pool, *call) for call in calls]
        try:
            results = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), timeout)
        except TimeoutError:
            raise EvaluationTimeout(f"FHE evaluation took longer than {timeout:g} s") from None
        for result in results:
            if isinstance(result, BrokenProcessPool):
                self._replace(pool)
                raise WorkerDied("an FHE worker died; the pool was restarted, retry the request")
            if isinstance(result, BaseException) and not isinstance(result, Rejected):
                raise result
        return results

    def _replace(self, broken: ProcessPoolExecutor) -> ProcessPoolExecutor:
        """A fresh pool instead of a broken one (once, however many requests saw it break)."""
        if broken is self._pool:
            broken.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
        return self._pool

    def close(self) -> None:
        """Stop the workers, dropping queued work; waits, since uvicorn exits by re-raising the signal."""
        self._pool.shutdown(wait=True, cancel_futures=True)
