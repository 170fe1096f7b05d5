"""What every party agrees on before training: the model kind, classes and their weights, feature and target ranges."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfhe.data import Range
from fedfhe.errors import FedfheError
from fedfhe.kinds import Kind, Params, kind_of


@dataclass(frozen=True)
class Problem:
    """The shared facts of a federation; features are scaled by the public ranges, never by data."""

    kind: Kind
    classes: np.ndarray
    input_range: Range
    target_range: tuple[float, float] | None = None
    class_weight: np.ndarray | None = None  # each class's weight in every client's loss, in classes' order

    @property
    def n_outputs(self) -> int:
        """Rows of the weight matrix."""
        return self.kind.n_outputs(len(self.classes))

    def initial_params(self) -> Params:
        """Zero weights: the common starting point of every client."""
        return [np.zeros((self.n_outputs, len(self.input_range[0]))), np.zeros(self.n_outputs)]

    def row_weights(self, y: np.ndarray) -> np.ndarray | None:
        """Each row's weight in the loss: its class's (as scikit-learn's class_weight), or None when all weigh 1."""
        if self.class_weight is None:
            return None
        return self.class_weight[np.searchsorted(self.classes, y)]  # type: ignore[no-any-return]

    def scale(self, X: np.ndarray) -> np.ndarray:
        """Map each feature's declared range to [0, 1]; a fixed map needs no statistics from anyone's data."""
        low, high = self.input_range
        return (X - low) / (high - low)

    def scale_target(self, y: np.ndarray) -> np.ndarray:
        """Regression targets mapped from their declared range to [0, 1]; class labels unchanged."""
        if self.target_range is None:
            return y
        low, high = self.target_range
        return (y - low) / (high - low)

    def unscale_target(self, predicted: np.ndarray) -> np.ndarray:
        """Predictions made on [0, 1]-scaled targets, back in target units (classes unchanged)."""
        if self.target_range is None:
            return predicted
        low, high = self.target_range
        return low + (high - low) * np.ravel(predicted)

    def unscale(self, params: Params) -> Params:
        """Fold both scalings into the weights so the exported model takes raw features, returns raw targets."""
        low, high = self.input_range
        coef, intercept = params[0] / (high - low), np.array(params[1], dtype=np.float64)
        intercept = intercept - coef @ low
        if self.target_range is not None:
            t_low, t_high = self.target_range
            coef, intercept = coef * (t_high - t_low), intercept * (t_high - t_low) + t_low
        return [coef, intercept]

    def to_config(self) -> dict[str, Any]:
        """The problem as config values every Flower layout carries (scalars and strings only)."""
        return {
            "model": self.kind.name,
            "classes": ",".join(str(int(c)) for c in self.classes),
            "input-low": ",".join(repr(float(v)) for v in self.input_range[0]),
            "input-high": ",".join(repr(float(v)) for v in self.input_range[1]),
            "target-range": "" if self.target_range is None else ",".join(map(repr, self.target_range)),
            "class-weight": "" if self.class_weight is None else ",".join(repr(float(w)) for w in self.class_weight),
        }

    @classmethod
    def from_config(cls, config: Any) -> Problem:
        """The problem as a client reads it from the server's config."""

        def floats(key: str) -> list[float]:
            return [float(v) for v in str(config[key]).split(",") if v]

        target, weights = floats("target-range"), floats("class-weight")
        return cls(
            kind=kind_of(str(config["model"])),
            classes=np.array([int(c) for c in str(config["classes"]).split(",") if c], dtype=np.int64),
            input_range=(np.array(floats("input-low")), np.array(floats("input-high"))),
            target_range=(target[0], target[1]) if target else None,
            class_weight=np.array(weights) if weights else None,
        )


def shared_range(X: np.ndarray) -> Range:
    """A data owner's per-feature min and max, rounded outward to two significant digits.

    This is all an owner reveals to fix the circuit's input ranges: never a row, and the rounding
    hides the exact extreme values.
    """

    def outward(values: np.ndarray, direction: Any) -> np.ndarray:
        scale = 10.0 ** (1 - np.floor(np.log10(np.where(values == 0, 1.0, np.abs(values)))))
        # divided by an exact power of ten (10.0 ** -1 is not one), rounded first: 5 stays 5, not 5.1
        return direction(np.round(values * scale, 6)) / scale  # type: ignore[no-any-return]

    low, high = outward(X.min(axis=0), np.floor), outward(X.max(axis=0), np.ceil)
    constant = high <= low
    # the rounding before floor/ceil may move a value inward by a hair: never round inward
    low, high = np.minimum(low, X.min(axis=0)), np.maximum(high, X.max(axis=0))
    return low, np.where(constant, low + np.maximum(np.abs(low), 1.0) * 0.01, high)


def merge_ranges(ranges: list[Range]) -> Range:
    """The smallest per-feature box holding every party's range."""
    return np.min([r[0] for r in ranges], axis=0), np.max([r[1] for r in ranges], axis=0)


def observed_record(observed: Range) -> dict[str, list[float]]:
    """The owners' observed ranges as the model file and the client spec keep them: lows and highs in input order."""
    return {"low": observed[0].tolist(), "high": observed[1].tolist()}


def read_observed(stored: Any, n_inputs: int, where: str) -> Range:
    """An observed_record (or its JSON text), refused in one line unless `n_inputs` finite lows each below its high."""
    try:
        stored = json.loads(stored) if isinstance(stored, (str, bytes)) else stored
        low, high = (np.asarray(stored[key], dtype=np.float64) for key in ("low", "high"))
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
        raise FedfheError(f"{where}: unreadable observed range ({type(exc).__name__}: {exc})") from None
    if (
        low.shape != (n_inputs,)
        or high.shape != (n_inputs,)
        or not (np.isfinite([low, high]).all() and (low < high).all())
    ):
        raise FedfheError(f"{where}: refused, its observed range is not {n_inputs} finite pairs of low < high")
    return low, high


def balanced_weights(counts: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """scikit-learn's "balanced" class weights from the federation's class counts: n / (classes * count)."""
    if not counts.all():
        raise FedfheError(f"--class-weight balanced: class {classes[np.argmin(counts)]} has no training row anywhere")
    return counts.sum() / (len(counts) * counts.astype(np.float64))  # type: ignore[no-any-return]
