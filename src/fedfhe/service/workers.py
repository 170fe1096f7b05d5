"""Worker processes shared by the server's evaluator and the client's encryptor: spawned, and gone with their parent."""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 quota (a container's share)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return cores if quota == "max" else max(1, min(cores, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 here, or a format we do not know: the affinity alone
        return cores


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_FREED_BYTES = 64 << 20  # kept per worker at most; larger blocks still come and go by mmap


def keep_freed_memory() -> None:
    """Keep freed heap memory for the next circuit run instead of handing it back to the kernel after each one.

    In a server worker, glibc returned what an MNIST scores run had freed, and the next run faulted it in
    again: 5,810 page faults a row and 8-12% of the server's time (measured; with this, 6 faults a row).
    """
    if sys.platform != "linux":  # glibc's (musl's mallopt does nothing); elsewhere leave malloc be
        return
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)


def spawn_pool(
    workers: int, initializer: Callable[..., None], *initargs: Any, death_signal: bool = True
) -> ProcessPoolExecutor:
    """A pool of spawned workers (the caller has threads, so no fork) that die with this process.

    Linux's parent-death signal fires when the *thread* that started a worker ends: only pools whose
    workers start from long-lived threads (the server's) may use it; the others rely on a watchdog.
    """
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start,
        initargs=(os.getpid(), death_signal, initializer, *initargs),
    )


def _start(parent: int, death_signal: bool, initializer: Callable[..., None], *initargs: Any) -> None:
    """Die with the parent (a SIGKILLed parent cannot stop its workers), leave Ctrl-C to it, then initialize."""
    if death_signal and sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us when our parent dies
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent answers Ctrl-C in one line and stops the pool
    initializer(*initargs)


def _watch_parent(parent: int) -> None:
    """Exit once the parent is gone (where no parent-death signal exists)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)
