"""Evaluation keys read as a Cap'n Proto structure: what each key is and how long, without the key material.

Concrete serializes evaluation keys as one Cap'n Proto message (its protocol's `ServerKeyset`: lists of
bootstrap, keyswitch and packing keyswitch keys, each an info struct and a payload of byte blobs). Two
keysets made for the same circuit differ only inside those blobs: which keys there are, their ids, the
secret keys they link, their parameters and their sizes are all equal. `layout` reads exactly that part of
any message, without its schema, so the server can refuse keys its circuit cannot use before a worker runs
them (a worker aborts in Concrete's C++ on a missing keyswitch key). Untrusted input: every pointer is
bounds-checked, and the walk is limited in depth and in the words it may visit.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 32  # a keyset nests 5 levels deep
MAX_SEGMENTS = 1024
LISTS = ("bootstrap", "keyswitch", "packing keyswitch")  # the root's three pointers, in protocol order

Layout = tuple[Any, ...]


class Malformed(ValueError):
    """Bytes that are not a well-formed Cap'n Proto message."""


def layout(message: bytes) -> Layout:
    """The message's structure: every struct's data section, every list's length, never a blob's bytes."""
    root = _Walk(message).follow(0, 0, 0)
    if root is None:
        raise Malformed("an empty message")
    return root


def counts(shape: Layout) -> list[int]:
    """How many keys of each kind (LISTS) a keyset's layout holds."""
    if not shape or shape[0] != "struct":
        return [0 for _ in LISTS]
    pointers = list(shape[2]) + [None] * len(LISTS)
    return [len(p[1]) if p is not None and p[0] == "structs" else 0 for p in pointers[: len(LISTS)]]


class _Walk:
    """One bounded walk over a message's segments."""

    def __init__(self, message: bytes) -> None:
        if len(message) < 8:
            raise Malformed(f"{len(message)} bytes: too short for a Cap'n Proto message")
        n = int.from_bytes(message[:4], "little") + 1
        if n > MAX_SEGMENTS:
            raise Malformed(f"{n} segments")
        header = (4 * (1 + n) + 7) // 8 * 8
        if len(message) < header:
            raise Malformed("truncated segment table")
        sizes = [int.from_bytes(message[4 + 4 * i : 8 + 4 * i], "little") * 8 for i in range(n)]
        if header + sum(sizes) != len(message):
            raise Malformed(f"segments of {header + sum(sizes)} bytes in a message of {len(message)}")
        view, self.segments, start = memoryview(message), [], header
        for size in sizes:
            self.segments.append(view[start : start + size])
            start += size
        self.budget = len(message) // 4 + 64  # words visited, each at most twice: no loops, no amplification

    def word(self, segment: int, index: int) -> int:
        """The 64-bit word at a position, or Malformed if it lies outside the message."""
        self.bounds(segment, index, 1)
        return int.from_bytes(self.segments[segment][index * 8 : index * 8 + 8], "little")

    def bounds(self, segment: int, start: int, words: int) -> None:
        """Refuse a range outside its segment."""
        if not 0 <= segment < len(self.segments) or start < 0 or (start + words) * 8 > len(self.segments[segment]):
            raise Malformed("a pointer leads outside the message")

    def inside(self, segment: int, start: int, words: int) -> None:
        """Refuse an object outside its segment; count its words against the walk's budget."""
        self.bounds(segment, start, words)
        self.budget -= words
        if self.budget < 0:
            raise Malformed("pointers revisit the same words")

    def follow(self, segment: int, index: int, depth: int) -> Layout | None:
        """What the pointer at a position leads to (None for a null pointer)."""
        w = self.word(segment, index)
        if w == 0:
            return None
        self.budget -= 1  # every pointer followed, far hops included, is a step of the walk
        if depth > MAX_DEPTH:
            raise Malformed(f"nested over {MAX_DEPTH} levels")
        kind = w & 3
        if kind == 2:  # far: the pointer, or its target and tag, sit on a landing pad in another segment
            pad_segment, pad = w >> 32, (w >> 3) & 0x1FFFFFFF
            if not (w >> 2) & 1:
                return self.follow(pad_segment, pad, depth + 1)
            far, tag = self.word(pad_segment, pad), self.word(pad_segment, pad + 1)
            if far & 7 != 2:
                raise Malformed("a double-far landing pad without a far pointer")
            return self.target(far >> 32, (far >> 3) & 0x1FFFFFFF, tag, depth)
        if kind == 3:
            raise Malformed("a capability pointer")
        offset = (w >> 2) & 0x3FFFFFFF
        offset -= (offset & 0x20000000) << 1  # signed 30 bits
        return self.target(segment, index + 1 + offset, w, depth)

    def target(self, segment: int, start: int, w: int, depth: int) -> Layout:
        """The struct or list a pointer word `w` describes, starting at a position."""
        if w & 3 == 0:
            return self.struct(segment, start, (w >> 32) & 0xFFFF, w >> 48, depth)
        if w & 3 != 1:
            raise Malformed("a far pointer where a struct or list was expected")
        size, count = (w >> 32) & 7, w >> 35
        if size == 7:  # structs, after a tag word that gives their number and size
            tag = self.word(segment, start)
            n, data, pointers = (tag >> 2) & 0x3FFFFFFF, (tag >> 32) & 0xFFFF, tag >> 48
            step = data + pointers
            if tag & 3 or n * step > count:
                raise Malformed("a struct list larger than its words")
            self.inside(segment, start, 1 + count)
            self.budget -= n  # empty structs cost words nowhere, but each is a step of the walk
            return (
                "structs",
                tuple(self.struct(segment, start + 1 + i * step, data, pointers, depth) for i in range(n)),
            )
        if size == 6:
            self.inside(segment, start, count)
            return ("pointers", tuple(self.follow(segment, start + i, depth + 1) for i in range(count)))
        bits = (0, 1, 8, 16, 32, 64)[size]
        self.inside(segment, start, (count * bits + 63) // 64)
        return ("values", bits, count)  # key material: its length counts, its bytes do not

    def struct(self, segment: int, start: int, data: int, pointers: int, depth: int) -> Layout:
        """A struct's data section (ids, parameters) and what its pointers lead to."""
        self.inside(segment, start, data + pointers)
        body = bytes(self.segments[segment][start * 8 : (start + data) * 8])
        return ("struct", body, tuple(self.follow(segment, start + data + i, depth + 1) for i in range(pointers)))
