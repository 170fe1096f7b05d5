"""What client and server agree on: paths, the spec hash header and the framing of batches.

Framing (request and response bodies of /v1/predict, content type application/octet-stream):
a 4-byte big-endian count N, then N frames, each a 4-byte big-endian length L and L bytes.
Nothing may follow the last frame. One frame carries one serialized ciphertext (one input row).
"""

from __future__ import annotations

import struct

from fedfhe.errors import FedfheError

API = "/v1"
OCTET_STREAM = "application/octet-stream"
SPEC_HASH_HEADER = "X-Client-Spec-SHA256"
_U32 = struct.Struct(">I")


class BatchTooLarge(FedfheError):
    """More ciphertexts in one request than the server accepts."""


def encode_frames(frames: list[bytes]) -> bytes:
    """Length-prefix each frame behind a frame count."""
    parts = [_U32.pack(len(frames))]
    for frame in frames:
        parts += [_U32.pack(len(frame)), frame]
    return b"".join(parts)


def decode_frames(body: bytes, max_frames: int) -> list[bytes]:
    """Split a framed body, refusing anything truncated, trailing or over the frame limit."""
    if len(body) < _U32.size:
        raise FedfheError(f"body of {len(body)} bytes is too short for a frame count")
    (count,) = _U32.unpack_from(body)
    if count == 0:
        raise FedfheError("batch is empty")
    if count * _U32.size > len(body) - _U32.size:
        raise FedfheError(f"body declares {count} frames but holds only {len(body)} bytes")
    if count > max_frames:
        raise BatchTooLarge(f"batch of {count} ciphertexts is over the limit of {max_frames}")
    frames, offset = [], _U32.size
    for i in range(count):
        if offset + _U32.size > len(body):
            raise FedfheError(f"body ends inside the length of frame {i}")
        (length,) = _U32.unpack_from(body, offset)
        offset += _U32.size
        if offset + length > len(body):
            raise FedfheError(f"frame {i} declares {length} bytes but only {len(body) - offset} remain")
        frames.append(body[offset : offset + length])
        offset += length
    if offset != len(body):
        raise FedfheError(f"{len(body) - offset} bytes after the last frame")
    return frames
