"""The trained model as a safe file: arrays and JSON metadata in an .npz, guarded by a content hash."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedfhe.data import Range, as_range
from fedfhe.errors import FedfheError
from fedfhe.kinds import KINDS, Kind, kind_of

FORMAT = "fedfhe-linear-model/2"


@dataclass
class LinearModel:
    """Weights of a `kind` of linear model that take raw features in `input_range`, plus their origin.

    coef has one row per output (class scores, or one row for a regressor); classes is empty for
    regressors.
    """

    coef: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray
    input_range: Range  # one (low, high) for every feature is accepted too
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: Kind = KINDS["logistic"]

    def __post_init__(self) -> None:
        """Accept one range for all features (kept per feature) and a kind's name (resolved)."""
        self.input_range = as_range(self.input_range, int(np.shape(self.coef)[1]))
        if isinstance(self.kind, str):
            self.kind = kind_of(self.kind)

    @property
    def n_features(self) -> int:
        """Number of input features."""
        return int(self.coef.shape[1])

    @property
    def is_regression(self) -> bool:
        """Whether the model predicts values rather than classes."""
        return len(self.classes) == 0

    @property
    def sha256(self) -> str:
        """Hash of weights, classes, ranges, kind and metadata: what the FHE artifacts are tied to."""
        digest = hashlib.sha256()
        for array in (self.coef, self.intercept, self.classes, *self.input_range):
            digest.update(str((array.dtype.str, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(json.dumps([self.kind.name, self.metadata], sort_keys=True).encode())
        return digest.hexdigest()

    def scale(self, X: np.ndarray) -> np.ndarray:
        """Features mapped to [0, 1] by the public input ranges: what the FHE circuit takes.

        Concrete ML quantizes all inputs with one scale, so features of very different magnitudes
        must share a range before encryption or the small ones round to nothing.
        """
        low, high = self.input_range
        return (np.asarray(X, dtype=np.float64) - low) / (high - low)

    def to_scaled_sklearn(self) -> Any:
        """The same model as a scikit-learn estimator taking scaled features (see `scale`)."""
        low, high = self.input_range
        return self.kind.fitted([self.coef * (high - low), self.intercept + self.coef @ low], self.classes)

    def to_sklearn(self) -> Any:
        """The fitted scikit-learn estimator of this kind holding these weights."""
        return self.kind.fitted([self.coef, self.intercept], self.classes)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a crash mid-write never leaves a half file under the real name."""
        header = {
            "format": FORMAT,
            "kind": self.kind.name,
            "metadata": self.metadata,
            "sha256": self.sha256,
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f,
                coef=self.coef,
                intercept=self.intercept,
                classes=self.classes,
                input_low=self.input_range[0],
                input_high=self.input_range[1],
                header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            )
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LinearModel:
        """Read a model file, refusing anything that is not an untouched fedfhe model."""
        path = Path(path)
        if not path.is_file():
            raise FedfheError(f"{path}: model file not found")
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = dict(f)
            header = json.loads(arrays.pop("header").tobytes())
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            raise FedfheError(f"{path}: not a fedfhe model file") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            found = header.get("format") if isinstance(header, dict) else None
            raise FedfheError(f"{path}: not a fedfhe model file of this version (format {found!r}, expected {FORMAT})")
        try:
            model = cls(
                coef=arrays["coef"],
                intercept=arrays["intercept"],
                classes=arrays["classes"],
                input_range=as_range((arrays["input_low"], arrays["input_high"]), arrays["coef"].shape[1]),
                metadata=header["metadata"],
                kind=KINDS[str(header["kind"])],
            )
        except (ValueError, KeyError, TypeError, IndexError):
            raise FedfheError(f"{path}: not a fedfhe model file") from None
        if header.get("sha256") != model.sha256:
            raise FedfheError(f"{path}: content hash mismatch, the file was modified after it was written")
        if model.coef.ndim != 2 or model.intercept.shape != (model.coef.shape[0],):
            raise FedfheError(f"{path}: inconsistent weight shapes {model.coef.shape} and {model.intercept.shape}")
        return model
