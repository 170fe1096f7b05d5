"""Who may call the service, and how often: bearer tokens compared in constant time, a rate per token.

Tokens are never logged or counted by value: each is known by a label, the first 8 hex digits of
its sha256, in metrics and logs.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
from pathlib import Path

from fedfhe.errors import FedfheError

MIN_TOKEN_LENGTH = 16  # shorter tokens can be guessed


class Unauthorized(FedfheError):
    """No token, or not one of the server's."""


class RateLimited(FedfheError):
    """A token asked more often than the server allows; `retry_after` says when it may ask again."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def token_label(token: str) -> str:
    """How a token is named where it may be seen (metrics, logs): a prefix of its hash."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


class Access:
    """The server's tokens and, optionally, a request rate per token (a token bucket per label)."""

    def __init__(self, tokens: list[str], rate_per_minute: float | None = None) -> None:
        if not tokens:
            raise FedfheError("the token list is empty: no client could ever connect")
        short = [t for t in tokens if len(t) < MIN_TOKEN_LENGTH]
        if short:
            raise FedfheError(f"{len(short)} token(s) shorter than {MIN_TOKEN_LENGTH} characters; use long random ones")
        if rate_per_minute is not None and not rate_per_minute > 0:
            raise FedfheError(f"--rate must be a positive number of requests per minute (got {rate_per_minute})")
        self._tokens = [t.encode() for t in tokens]
        self.rate = rate_per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # label -> (tokens left, when last filled)
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], rate_per_minute: float | None = None) -> Access:
        """One token per line; blank lines and lines starting with # are skipped."""
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise FedfheError(f"{path}: cannot read the token file ({exc})") from None
        return cls([line.strip() for line in lines if line.strip() and not line.startswith("#")], rate_per_minute)

    def identify(self, authorization: str | None) -> str:
        """The label of the bearer token in an Authorization header; every token is compared, in constant time."""
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Unauthorized("this server needs a token: Authorization: Bearer TOKEN")
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(token, given.strip().encode())
        if not matched:
            raise Unauthorized("unknown token")
        return token_label(given.strip())

    def admit(self, label: str) -> None:
        """Take one request from the label's bucket (full at `rate`, refilled continuously), or refuse."""
        if self.rate is None:
            return
        now = time.monotonic()
        with self._lock:
            left, then = self._buckets.get(label, (self.rate, now))
            left = min(self.rate, left + (now - then) * self.rate / 60)
            if left < 1:
                self._buckets[label] = (left, now)
                wait = math.ceil((1 - left) * 60 / self.rate)
                raise RateLimited(f"more than {self.rate:g} requests per minute; retry in {wait} s", wait)
            self._buckets[label] = (left - 1, now)
