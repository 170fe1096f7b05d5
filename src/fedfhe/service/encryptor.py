"""Encryption in worker processes: Concrete's encrypt holds the GIL (74 ms for a MNIST row), so rows only
encrypt in parallel in processes.

Each worker loads the client spec and this client's keys from the key directory itself (a private key
never crosses a pipe), checks that they are the keys the server knows, and turns quantized rows into
serialized ciphertexts. Quantizing stays with the caller, so workers import Concrete's compiler bindings alone.
"""

from __future__ import annotations

import hashlib
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from fedfhe.errors import FedfheError
from fedfhe.service.crypto import CircuitKeys
from fedfhe.service.workers import spawn_pool

_keys: CircuitKeys | None = None  # each worker's keys, the private key among them
_failure: FedfheError | None = None  # why it has none: told with the first batch, not as a worker traceback


class KeysDiffer(FedfheError):
    """A worker loaded other keys than the ones uploaded: its ciphertexts would not decrypt."""


def _load(spec: str, folder: str, key_id: str) -> None:
    """Load the spec and the caller's keys (a cache hit: the caller made them); refuse keys other than `key_id`."""
    global _keys, _failure
    try:
        keys = CircuitKeys(Path(spec).read_bytes(), folder)
        held = hashlib.sha256(keys.evaluation_keys()).hexdigest()
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        _failure = FedfheError(f"{folder}: an encryption worker cannot load the keys ({exc})")
        return
    if held != key_id:
        _failure = KeysDiffer(f"{folder}: an encryption worker found other keys than the ones uploaded")
    _keys = keys


def _encrypt(rows: np.ndarray) -> list[bytes]:
    """Serialized ciphertexts of quantized rows, one per row."""
    if _failure is not None:
        raise _failure
    assert _keys is not None  # set by _load whenever _failure is not
    return [_keys.encrypt(row) for row in rows]


class Encryptor:
    """`jobs` worker processes encrypting for one key directory; started once, reused by every predict."""

    def __init__(self, spec: Path, keys: Path, key_id: str, jobs: int) -> None:
        self.jobs = jobs
        self._pool = spawn_pool(jobs, _load, str(spec), str(keys), key_id, death_signal=False)  # any thread may call

    def encrypt(self, rows: np.ndarray) -> list[bytes]:
        """Quantized rows' ciphertexts, encrypted in a worker (the caller waits); a worker gone is one line."""
        try:
            return self._pool.submit(_encrypt, rows).result()
        except BrokenProcessPool:
            raise FedfheError(
                "the encryption workers stopped: killed, out of memory, or started by a script without "
                '`if __name__ == "__main__":` (jobs=1 encrypts in this process)'
            ) from None

    def close(self) -> None:
        """Stop the workers, dropping queued rows."""
        self._pool.shutdown(wait=True, cancel_futures=True)
