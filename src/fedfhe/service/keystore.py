"""Evaluation keys on disk, named by their hash, bounded in count and bytes.

Eviction policy: when a new key would exceed `max_keys` or `max_bytes`, the least recently used
keys go first, "used" meaning uploaded or looked up (each use sets the file's mtime to now).
A client whose key was evicted gets 404 and uploads it again.

Several server processes (replicas behind a load balancer) may share one directory: a key is
written to a temporary file and renamed into place, and storing plus evicting holds an exclusive
lock on the directory's `.lock` file, so the limits and the least-recently-used order hold across
processes. Look-ups take no lock: a key evicted meanwhile is a 404, as above.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fedfhe.errors import FedfheError

KEY_ID = re.compile(r"[0-9a-f]{64}")
SUFFIX = ".key"
LOCK = ".lock"


class UnknownKey(FedfheError):
    """No key with this id (never uploaded, or evicted)."""


class KeyTooLarge(FedfheError):
    """A single key larger than the whole store may hold."""


class KeyStore:
    """A directory of evaluation keys; ids are sha256 hex digests, so uploads are idempotent."""

    def __init__(self, root: Path, max_keys: int = 1000, max_bytes: int = 1 << 30) -> None:
        if max_keys < 1 or max_bytes < 1:
            raise FedfheError(f"key store limits must be positive (got {max_keys} keys, {max_bytes} bytes)")
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise FedfheError(f"cannot create key store {root}: {exc.strerror or exc}") from None
        self.root, self.max_keys, self.max_bytes = root, max_keys, max_bytes

    def put(self, key: bytes) -> str:
        """Store a key atomically (tmp file + rename) and return its id; evict LRU keys past the limits."""
        if len(key) > self.max_bytes:
            raise KeyTooLarge(f"key of {len(key)} bytes is larger than the key store limit of {self.max_bytes}")
        key_id = hashlib.sha256(key).hexdigest()
        path = self._path(key_id)
        with self._exclusive():
            if _mark_used(path):
                return key_id
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(key)
                    f.flush()
                    os.fsync(f.fileno())
                _mark_used(Path(tmp))
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
            self._evict(keep=path)
        return key_id

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the store's lock against every thread and process sharing the directory."""
        try:
            lock = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise FedfheError(f"cannot lock key store {self.root}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # per open file: threads of one process exclude each other too
            yield
        finally:
            os.close(lock)

    def get(self, key_id: str) -> bytes:
        """The key with this id, marked as used; UnknownKey if absent."""
        try:
            return self.locate(key_id).read_bytes()
        except FileNotFoundError:
            raise UnknownKey(f"unknown key id {key_id}; upload the evaluation keys again") from None

    def locate(self, key_id: str) -> Path:
        """The file of a stored key, marked as used (workers read it themselves); UnknownKey if absent."""
        path = self._path(key_id)
        if not _mark_used(path):
            raise UnknownKey(f"unknown key id {key_id}; upload the evaluation keys again")
        return path

    def __len__(self) -> int:
        """Number of stored keys."""
        return len(self._entries())

    def _path(self, key_id: str) -> Path:
        """The file of a key id; only 64 lowercase hex digits are ids, so no path can escape the store."""
        if not KEY_ID.fullmatch(key_id):
            raise UnknownKey("malformed key id (expected 64 lowercase hex digits)")
        return self.root / f"{key_id}{SUFFIX}"

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every stored key, skipping files removed meanwhile by another process."""
        entries = []
        for path in self.root.glob(f"*{SUFFIX}"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        return entries

    def _evict(self, keep: Path) -> None:
        """Remove least recently used keys until both limits hold again."""
        entries = sorted(self._entries())
        count, total = len(entries), sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if count <= self.max_keys and total <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            count, total = count - 1, total - size


def _mark_used(path: Path) -> bool:
    """Set mtime to now, to the nanosecond (the kernel's own stamps are a clock tick apart, too coarse to order
    uses across processes); False if the file is gone (never stored, or evicted meanwhile). Never creates it."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except FileNotFoundError:
        return False
    return True
