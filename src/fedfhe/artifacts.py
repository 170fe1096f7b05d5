"""A compiled run's FHE artifacts, read and checked in one place for FHE evaluation and the service."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedfhe.errors import FedfheError
from fedfhe.model import LinearModel
from fedfhe.rundir import CLIENT_SPEC, COMPILE_INPUTS, FHE_INFO, SERVER_SPEC, RunDir

N_BITS_RANGE = (2, 12)


def check_n_bits(*values: int) -> None:
    """Refuse quantization widths outside what fedfhe compiles, before any work starts."""
    low, high = N_BITS_RANGE
    if not all(low <= v <= high for v in values):
        raise FedfheError(f"--n-bits must be between {low} and {high} (got {', '.join(map(str, values))})")


@dataclass(frozen=True)
class Artifacts:
    """What `fhe.export` wrote for one model: Concrete's client and server specs and how they were compiled."""

    folder: Path
    n_bits: int  # quantization bits of inputs and weights
    max_bit_width: int  # widest integer in the circuit
    calibration: str  # what the circuit was compiled on
    compile_inputs: np.ndarray  # the (scaled) rows the circuit was compiled on
    client_spec: bytes  # client.zip, the only artifact a client sees


def read_artifacts(run: RunDir, model: LinearModel) -> Artifacts:
    """The run's FHE artifacts, refused unless complete, readable and compiled for exactly this model."""
    folder = run.fhe
    if not (folder / FHE_INFO).is_file():
        raise FedfheError(f"{run.path}: no compiled model (run `fedfhe compile` first)")
    for name in (CLIENT_SPEC, SERVER_SPEC, COMPILE_INPUTS):
        if not (folder / name).is_file():
            raise FedfheError(f"{folder / name}: not found (run `fedfhe compile` first)")
    try:
        info = json.loads((folder / FHE_INFO).read_text())
        inputs = np.load(folder / COMPILE_INPUTS, allow_pickle=False)
        spec = (folder / CLIENT_SPEC).read_bytes()
        if not isinstance(info, dict):
            raise TypeError(f"{FHE_INFO} holds {type(info).__name__}, not an object")
        artifacts = Artifacts(
            folder, int(info["n_bits"]), int(info["max_bit_width"]), str(info["calibration"]), inputs, spec
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FedfheError(f"{folder}: unreadable FHE artifacts ({exc})") from None
    if info.get("model_sha256") != model.sha256:
        raise FedfheError(f"{folder}: FHE artifacts were compiled for another model; compile again")
    check_n_bits(artifacts.n_bits)
    if inputs.ndim != 2 or inputs.shape[1] != model.n_features or not np.isfinite(inputs).all():
        raise FedfheError(f"{folder / COMPILE_INPUTS}: compile inputs do not fit the model")
    return artifacts
