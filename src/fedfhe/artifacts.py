"""A compiled run's FHE artifacts, read and checked in one place for FHE evaluation and the service."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedfhe.errors import FedfheError
from fedfhe.model import READ_ERRORS, LinearModel, first_line, read_npy
from fedfhe.rundir import CLIENT_SPEC, COMPILE_INPUTS, FHE_INFO, SERVER_SPEC, RunDir

N_BITS_RANGE = (2, 12)
# The most each artifact may hold, far above what export writes, so a damaged file is refused before it is read.
MAX_INFO_BYTES = 64 << 10  # fhe.json: its fields and up to model.MAX_OUTPUTS classes, plus ...
INFO_BYTES_PER_FEATURE = 80  # ... its input range (two numbers of at most 30 characters) and inputs_used
MAX_CLIENT_SPEC_BYTES = 16 << 20  # client.zip, packed or unpacked: about 3 KiB for every model fedfhe trains
MAX_COMPILE_INPUTS_BYTES = 256 << 20  # 2 x outputs + 2 rows, or a calibration sample (40,000 rows of MNIST)
INFO_TYPES = {"model_sha256": str, "max_bit_width": int, "calibration": str}
# Concrete ML's n_bits: one width for inputs and weights, or each its own as {"op_inputs": I, "op_weights": W}.
NBits = int | dict[str, int]
N_BITS_KEYS = ["op_inputs", "op_weights"]

T = TypeVar("T")


def bit_pair(n_bits: NBits) -> tuple[int, int]:
    """The input and weight widths of an n_bits."""
    return (n_bits, n_bits) if isinstance(n_bits, int) else (n_bits["op_inputs"], n_bits["op_weights"])


def n_bits_of(inputs: int, weights: int) -> NBits:
    """The n_bits Concrete ML takes for these widths: one integer when they agree, so each point has one form."""
    return inputs if inputs == weights else dict(zip(N_BITS_KEYS, (inputs, weights), strict=True))


def n_bits_label(n_bits: NBits) -> str:
    """How people write an n_bits: 6, or INPUTS/WEIGHTS such as 6/4."""
    inputs, weights = bit_pair(n_bits)
    return str(inputs) if inputs == weights else f"{inputs}/{weights}"


def parse_n_bits(text: str) -> NBits:
    """--n-bits N or INPUTS/WEIGHTS, checked."""
    widths = text.strip().split("/")
    if len(widths) > 2 or not all(w.strip().isdecimal() for w in widths):
        raise FedfheError(f"--n-bits takes N or INPUTS/WEIGHTS such as 6/4 (got {text[:40]!r})")
    inputs, weights = int(widths[0]), int(widths[-1])
    n_bits = n_bits_of(inputs, weights)
    check_n_bits(n_bits)
    return n_bits


def check_n_bits(*values: object) -> None:
    """Refuse quantization widths outside what fedfhe compiles, before any work starts."""
    low, high = N_BITS_RANGE
    for value in values:
        widths = list(value.values()) if isinstance(value, dict) and sorted(value) == N_BITS_KEYS else [value]
        ints = [w for w in widths if isinstance(w, int) and not isinstance(w, bool)]  # neither true nor 8.5
        if len(ints) != len(widths):
            raise FedfheError(f"n_bits must be an integer or {{op_inputs, op_weights}} integers (got {value!r:.40})")
        if not all(low <= w <= high for w in ints):
            raise FedfheError(f"--n-bits must be between {low} and {high} (got {'/'.join(map(str, widths))})")


@dataclass(frozen=True)
class Artifacts:
    """What `fhe.export` wrote for one model: Concrete's client and server specs and how they were compiled."""

    folder: Path
    n_bits: NBits  # quantization bits of inputs and weights
    max_bit_width: int  # widest integer in the circuit
    calibration: str  # what the circuit was compiled on
    compile_inputs: np.ndarray  # the (scaled) rows the circuit was compiled on
    client_spec: bytes  # client.zip, the only artifact a client sees
    outputs: str  # what a client decrypts: "scores", or "label" (the class index only)
    inputs_used: np.ndarray  # the features the circuit takes; every one for artifacts from before fhe.json said


def read_artifacts(run: RunDir, model: LinearModel) -> Artifacts:
    """The run's FHE artifacts, refused unless complete, readable and compiled for exactly this model."""
    folder = run.fhe
    if not (folder / FHE_INFO).is_file():
        raise FedfheError(f"{run.path}: no compiled model (run `fedfhe compile` first)")
    for name in (CLIENT_SPEC, SERVER_SPEC, COMPILE_INPUTS):
        if not (folder / name).is_file():
            raise FedfheError(f"{folder / name}: not found (run `fedfhe compile` first)")
    info = _info(run, model)
    inputs = _read(folder / COMPILE_INPUTS, MAX_COMPILE_INPUTS_BYTES, lambda f: _read_inputs(f, model.n_features))
    spec = _read(folder / CLIENT_SPEC, MAX_CLIENT_SPEC_BYTES, _read_spec)
    if info["model_sha256"] != model.sha256:
        raise FedfheError(f"{folder}: FHE artifacts were compiled for another model; compile again")
    used = info.get("inputs_used", list(range(model.n_features)))
    if not valid_inputs_used(used, model.n_features):
        raise FedfheError(
            f"{folder / FHE_INFO}: inputs_used must be increasing feature indices below {model.n_features}"
        )
    return Artifacts(
        folder,
        info["n_bits"],
        info["max_bit_width"],
        info["calibration"],
        inputs,
        spec,
        info["outputs"],
        np.array(used),
    )


def valid_inputs_used(used: Any, n_features: int) -> bool:
    """Whether `inputs_used` (fhe.json, or a server's model facts) is increasing feature indices below n_features."""
    valid = isinstance(used, list) and len(used) > 0 and all(type(i) is int for i in used)
    return valid and used == sorted(set(used)) and 0 <= used[0] <= used[-1] < n_features


def compiled_outputs(run: RunDir, model: LinearModel) -> str:
    """What the run's circuit returns, "scores" or "label", from fhe.json alone; scores when not compiled for it."""
    try:
        info = _info(run, model)
    except FedfheError:
        return "scores"
    return str(info["outputs"]) if info["model_sha256"] == model.sha256 else "scores"


def _info(run: RunDir, model: LinearModel) -> dict[str, Any]:
    """fhe.json, checked: a few hundred bytes and the model's input range."""
    return _read(run.fhe / FHE_INFO, MAX_INFO_BYTES + INFO_BYTES_PER_FEATURE * model.n_features, _read_info)


def _read(path: Path, limit: int, read: Callable[[io.BufferedReader], T]) -> T:
    """One artifact, refused in one line naming it when larger than `limit` or unreadable."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise ValueError(f"{size} bytes, more than the {limit} it may hold")
            return read(f)
    except READ_ERRORS as exc:
        raise FedfheError(f"{path}: unreadable FHE artifact ({first_line(exc)}); compile again") from None


def _read_info(f: io.BufferedReader) -> dict[str, Any]:
    """fhe.json, with the fields read_artifacts uses of the types export writes."""
    info = json.loads(f.read())
    if isinstance(info, dict):
        for key, kind in INFO_TYPES.items():
            if type(info.get(key)) is not kind:  # so neither true nor 8.5 passes for an int
                raise ValueError(f"{key} is {type(info.get(key)).__name__}, not {kind.__name__}")
        check_n_bits(info.get("n_bits"))
        info.setdefault("outputs", "scores")  # compiled before label outputs existed: scores
        if info["outputs"] not in ("scores", "label"):
            raise ValueError(f"outputs is {str(info['outputs'])[:20]!r}, not scores or label")
        return info
    raise ValueError(f"a JSON {type(info).__name__}, not an object")


def _read_inputs(f: io.BufferedReader, n_features: int) -> np.ndarray:
    """compile_inputs.npy: finite float64 rows of the model's width, its header checked before its data is read."""
    size = os.fstat(f.fileno()).st_size
    inputs = read_npy(
        f,
        size,
        np.float64,
        lambda s: len(s) == 2 and s[0] > 0 and s[1] == n_features,
        f"2-D float64, {n_features} columns",
    )
    if not np.isfinite(inputs).all():
        raise ValueError("inf or NaN in the compile inputs")
    return inputs


def _read_spec(f: io.BufferedReader) -> bytes:
    """client.zip's bytes, once they prove a sound zip a client can unpack in bounded memory."""
    spec = f.read()
    with zipfile.ZipFile(io.BytesIO(spec)) as archive:
        unpacked = sum(info.file_size for info in archive.infolist())
        if unpacked > MAX_CLIENT_SPEC_BYTES:
            raise ValueError(f"unpacks to {unpacked} bytes, more than {MAX_CLIENT_SPEC_BYTES}")
        broken = archive.testzip()
    if broken is not None:
        raise ValueError(f"{broken} is corrupt")
    return spec
