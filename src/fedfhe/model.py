"""The trained model as a safe file: arrays and JSON metadata in an .npz, guarded by a content hash."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedfhe.errors import FedfheError

FORMAT = "fedfhe-linear-model/1"
MODEL_FILE = "model.npz"  # the name a run directory keeps its model under


@dataclass
class LinearModel:
    """Weights that take raw features in `input_range`, plus what produced them."""

    coef: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray
    input_range: tuple[float, float]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        """Number of input features."""
        return int(self.coef.shape[1])

    @property
    def sha256(self) -> str:
        """Hash of weights, classes, range and metadata: what the FHE artifacts are tied to."""
        digest = hashlib.sha256()
        for array in (self.coef, self.intercept, self.classes):
            digest.update(str((array.dtype.str, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(json.dumps([list(self.input_range), self.metadata], sort_keys=True).encode())
        return digest.hexdigest()

    def to_sklearn(self) -> Any:
        """A fitted scikit-learn LogisticRegression with these weights."""
        from fedfhe.federated.task import classifier

        return classifier([self.coef, self.intercept], self.classes)

    def save(self, path: Path) -> None:
        """Write atomically: a crash mid-write never leaves a half file under the real name."""
        header = {
            "format": FORMAT,
            "input_range": list(self.input_range),
            "metadata": self.metadata,
            "sha256": self.sha256,
        }
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f,
                coef=self.coef,
                intercept=self.intercept,
                classes=self.classes,
                header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> LinearModel:
        """Read a model file, refusing anything that is not an untouched fedfhe model."""
        if not path.is_file():
            raise FedfheError(f"{path}: model file not found")
        try:
            with np.load(path, allow_pickle=False) as f:
                header = json.loads(f["header"].tobytes())
                model = cls(
                    coef=f["coef"],
                    intercept=f["intercept"],
                    classes=f["classes"],
                    input_range=(float(header["input_range"][0]), float(header["input_range"][1])),
                    metadata=header["metadata"],
                )
        except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile, EOFError):
            raise FedfheError(f"{path}: not a fedfhe model file") from None
        if header.get("format") != FORMAT:
            raise FedfheError(f"{path}: not a fedfhe model file (format {header.get('format')!r})")
        if header.get("sha256") != model.sha256:
            raise FedfheError(f"{path}: content hash mismatch, the file was modified after it was written")
        if model.coef.ndim != 2 or model.intercept.shape != (model.coef.shape[0],):
            raise FedfheError(f"{path}: inconsistent weight shapes {model.coef.shape} and {model.intercept.shape}")
        return model
