"""What a client checks in a server's client spec before it makes a key: parameters no weaker than 128-bit security.

A client spec (client.zip's client.specs.json) tells the client which secret keys to make and with how much
noise to encrypt. A server that serves a spec with a tiny LWE dimension or no noise gets ciphertexts it
can decrypt without any key. Every encryption the client makes, of its inputs or inside the evaluation keys
it sends (bootstrap keys encrypt a secret key under another, keyswitch keys the other way), must have at
least the noise Concrete's 128-bit security curve asks for its key's dimension (concrete-security-curves:
log2 of the standard deviation, as a fraction of the 2^64 modulus, at least SLOPE * n + BIAS, and n at
least MIN_DIMENSION, for binary keys). The specs Concrete 2.10 compiles here sit 2.9 to 9.8 times above it.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import zipfile
from typing import Any

from fedfhe.errors import FedfheError

SLOPE, BIAS, MIN_DIMENSION = -0.026405028765226296, 2.482642269104389, 450  # Concrete's curve for 128 bits
SPECS = "client.specs.json"
NATIVE: dict[str, Any] = {"modulus": {"native": {}}}  # the 2^64 modulus the security curve is for
MAX_SPECS_BYTES = 1 << 20  # a linear model's spec is a few KB


class WeakSpec(FedfheError):
    """A client spec whose parameters are below 128-bit security, or that is not what fedfhe compiles."""


def min_variance(dimension: int) -> float:
    """The least encryption noise (variance, as a fraction of the modulus squared) 128 bits allow at a key size."""
    return max(2.0 ** (2 * (SLOPE * dimension + BIAS)), 2.0 ** (-2 * (64 - 2)))


def check_spec(client_zip: bytes, where: str) -> None:
    """Refuse a client.zip whose spec a client could not safely make keys for; `where` names it in errors."""
    try:
        specs = json.loads(member(client_zip, SPECS))
        keyset, circuits = specs["keyset"], specs["circuits"]
        secret = {int(k["id"]): _secret_key(k) for k in keyset["lweSecretKeys"]}
        if len(secret) != len(keyset["lweSecretKeys"]):
            raise WeakSpec("two secret keys share an id")
        for kind, keys in (
            ("bootstrap", keyset["lweBootstrapKeys"]),
            ("packing keyswitch", keyset["packingKeyswitchKeys"]),
        ):
            for key in keys:  # a GLWE encryption of one secret key under another, of dimension k * N
                p = key["params"]
                glwe = int(p["glweDimension"]) * int(p["polynomialSize"])
                _secure(f"{kind} key {key['id']}", glwe, p, secret.get(int(key["outputId"])))
        for key in keyset["lweKeyswitchKeys"]:  # an LWE encryption of one secret key under the output key
            p = key["params"]
            _secure(f"keyswitch key {key['id']}", int(p["outputLweDimension"]), p, secret.get(int(key["outputId"])))
        for circuit in circuits:
            for i, value in enumerate(circuit["inputs"]):
                info = value["typeInfo"]["lweCiphertext"]
                encryption = info["encryption"]
                _secure(f"input {i}", int(encryption["lweDimension"]), encryption, secret.get(int(encryption["keyId"])))
                if info.get("compression") != "seed":
                    raise WeakSpec(f"input {i} is not seed-compressed, as fedfhe compiles every input")
    except WeakSpec as exc:
        raise WeakSpec(f"{where}: refused, {exc}; no key was made and nothing was encrypted") from None
    except (OSError, zipfile.BadZipFile, KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise WeakSpec(f"{where}: unreadable client spec ({type(exc).__name__}: {exc})") from None


def member(client_zip: bytes, name: str) -> bytes:
    """One file of a client.zip, refused if missing, held twice (under any spelling) or over MAX_SPECS_BYTES."""
    with zipfile.ZipFile(io.BytesIO(client_zip)) as archive:
        if [posixpath.normpath(n) for n in archive.namelist()].count(name) > 1:
            raise WeakSpec(f"it holds {name} more than once")
        if archive.getinfo(name).file_size > MAX_SPECS_BYTES:
            raise WeakSpec(f"{name} unpacks to {archive.getinfo(name).file_size} bytes")
        return archive.read(name)


def _secret_key(key: dict[str, Any]) -> int:
    """A secret key's dimension, if it is a binary key over the native 64-bit modulus, as Concrete makes them."""
    p = key["params"]
    if p.get("keyType") != "binary" or int(p.get("integerPrecision", 0)) != 64:
        raise WeakSpec(f"secret key {key['id']} is not a binary key over 64 bits")
    dimension = int(p["lweDimension"])
    if dimension < MIN_DIMENSION:
        raise WeakSpec(f"secret key {key['id']} has dimension {dimension}, under {MIN_DIMENSION}")
    return dimension


def _secure(what: str, dimension: int, params: dict[str, Any], key: int | None) -> None:
    """One encryption's noise against the curve at its dimension, which must be that of a key the spec makes."""
    if key != dimension:
        raise WeakSpec(f"{what} is encrypted at dimension {dimension} under a key the spec does not describe so")
    if params.get("modulus", NATIVE) != NATIVE:
        raise WeakSpec(f"{what} is not over the native 64-bit modulus")
    variance = float(params["variance"])
    if not math.isfinite(variance) or variance < min_variance(dimension):
        raise WeakSpec(
            f"{what} has noise variance {variance:.3g} at dimension {dimension}: "
            f"128-bit security needs at least {min_variance(dimension):.3g}"
        )
