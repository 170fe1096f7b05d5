"""What a client takes from client.zip besides the spec: the model's quantizers, read as plain numbers.

Concrete ML's client loads serialized_processing.json with skops (the model's class is stored as a skops
archive) and then runs that class's code, so a server could hand the client code to run. fedfhe's models
are linear: one input quantizer for every feature, one output quantizer, then a sigmoid or softmax for a
classifier. The client reads just those numbers from the JSON, checks them, and never decodes a type.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfhe.errors import FedfheError
from fedfhe.service.spec import member

PROCESSING = "serialized_processing.json"
MAX_INPUT_BITS = 16  # Concrete's widest encrypted integer input


@dataclass(frozen=True)
class Quantizers:
    """How rows in [0, 1] become the circuit's integers, and its integers become scores again."""

    scale: float
    zero_point: float
    low: int  # the integers an input may take
    high: int
    output_scale: float
    output_zero_point: np.ndarray  # one per output, or one for all

    def quantize(self, X: np.ndarray) -> np.ndarray:
        """Rows as the circuit's inputs, rounded and clipped as Concrete ML's uniform quantizer does."""
        return np.clip(np.rint(X / self.scale + self.zero_point), self.low, self.high).astype(np.int64)

    def scores(self, outputs: np.ndarray, classifier: bool) -> np.ndarray:
        """One row's decrypted outputs as Concrete ML reports them: a classifier's probabilities, else values."""
        values = np.reshape(self.output_scale * (outputs - self.output_zero_point.astype(np.float64)), (1, -1))
        if not classifier:
            return values
        if values.shape[1] == 1:  # one logit: the second class's sigmoid
            p = np.exp(-np.logaddexp(0, -values[:, 0]))
            return np.stack([1 - p, p], axis=1)
        exp = np.exp(values - values.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)


def read_quantizers(client_zip: bytes, where: str) -> Quantizers:
    """The quantizers in a client.zip, or a one-line FedfheError naming `where` if they are not a linear model's."""
    try:
        processing = json.loads(member(client_zip, PROCESSING))
        inputs, outputs = processing["input_quantizers"], processing["output_quantizers"]
        if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != 1 or len(outputs) != 1:
            raise ValueError("not one input and one output quantizer, as a linear model has")
        given, taken = _uniform(inputs[0]), _uniform(outputs[0])
        bits, offset = given["n_bits"], given["offset"]
        if type(bits) is not int or not 1 <= bits <= MAX_INPUT_BITS or offset not in (0, 1 << (bits - 1)):
            raise ValueError(f"input quantizer of {bits!r} bits with offset {offset!r}")
        if given["no_clipping"] is not False or type(given["is_narrow"]) is not bool:
            raise ValueError("an input quantizer that does not clip")
        zero_point = _numbers(given["zero_point"])
        output_zero_point = _numbers(taken["zero_point"])
        if zero_point.size != 1 or output_zero_point.ndim > 2 or output_zero_point.size < 1:
            raise ValueError("zero points of an unexpected shape")
        return Quantizers(
            scale=_scale(given["scale"]),
            zero_point=float(zero_point.item()),
            low=-offset + int(given["is_narrow"]),
            high=(1 << bits) - 1 - offset,
            output_scale=_scale(taken["scale"]),
            output_zero_point=output_zero_point.reshape(1, -1),
        )
    except FedfheError as exc:
        raise FedfheError(f"{where}: refused, {exc}; no key was made and nothing was encrypted") from None
    except (OSError, KeyError, TypeError, ValueError, AttributeError, RecursionError, OverflowError) as exc:
        raise FedfheError(f"{where}: unreadable quantizers in {PROCESSING} ({type(exc).__name__}: {exc})") from None


def _uniform(quantizer: Any) -> dict[str, Any]:
    """A serialized UniformQuantizer's fields."""
    if not isinstance(quantizer, dict) or quantizer.get("type_name") != "UniformQuantizer":
        raise TypeError("a quantizer that is not a UniformQuantizer")
    fields = quantizer["serialized_value"]
    if not isinstance(fields, dict):
        raise TypeError("a quantizer without fields")
    return fields


def _numbers(value: Any) -> np.ndarray:
    """A serialized NumPy number or array (Concrete ML tags them with their type), as finite float64s."""
    if isinstance(value, dict):
        if value.get("type_name") not in ("numpy_float", "numpy_integer", "numpy_array"):
            raise ValueError(f"a number tagged {value.get('type_name')!r}")
        value = value["serialized_value"]
    numbers = np.asarray(value, dtype=np.float64)
    if not np.isfinite(numbers).all():
        raise ValueError("a quantizer holds a non-finite number")
    return numbers


def _scale(value: Any) -> float:
    """A quantizer's scale: one finite, positive number."""
    numbers = _numbers(value)
    if numbers.size != 1 or not 0 < numbers.item() < math.inf:
        raise ValueError(f"a quantizer scale of {numbers.ravel()[:3].tolist()}")
    return float(numbers.item())
