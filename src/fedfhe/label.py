"""Label-only outputs: the FHE circuit picks the class itself, so a client decrypts a label, never the scores.

A linear model's scores are its logits: a client that decrypts them solves for the weights from
d + 1 queries. Here the circuit compares every pair of classes (two classes: the score with a cut,
zero or the model's operating point) and returns the index of the class that wins all its
comparisons (the first on a tie, as argmax).

A comparison is the sign of a 20-23 bit integer. Exact rounding costs one bootstrap per bit
removed; instead two approximate roundings of one bootstrap each keep STAGES bits: the first
settles large gaps, the second looks again at what is left at a finer step. Only near-ties (gaps
within about a third of the second step) can flip; evaluation reports the agreement.

Bit widths are fixed without data: the compile set holds, for every score and every pairwise
difference, the two corners of the quantized input box that reach its extremes (each is linear in
the input), so no input in the box can exceed what the circuit was compiled for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfhe.decision import Point

STAGES = (5, 5)  # bits each approximate rounding keeps: 4 lets non-ties flip, 6 doubles the time
MARGIN = 2  # bits the refined remainder may use above the first step
CONFIGURATION = {  # 1e-5 per bootstrap keeps 2048-sized parameters; both compressions shrink keys and inputs
    "p_error": 1e-5,
    "global_p_error": None,
    "compress_evaluation_keys": True,
    "compress_input_ciphertexts": True,
}


@dataclass(frozen=True)
class Plan:
    """The integer label rule and the rounding steps that decide it, all from the quantized model alone."""

    W: np.ndarray  # (d, K): scores s = q @ W + b on the quantized input q; label argmax(s), or s >= cut for K == 1
    b: np.ndarray  # (K,)
    cut: int  # K == 1: the least s that gets class 1 (1: argmax; else the operating point, Point.cut)
    low: int  # the quantized input box, per feature
    high: int
    first: int  # lsbs the first rounding removes
    second: int  # lsbs the second removes, from a remainder of first + MARGIN bits
    overflow: bool  # whether the first rounding can carry into a new bit

    def clear(self, q: np.ndarray) -> np.ndarray:
        """The exact label: Concrete ML's quantized model's class index."""
        return np.argmax(self._scores(q), axis=-1)

    def shortfall(self, q: np.ndarray, picked: np.ndarray) -> np.ndarray:
        """How far each picked class's score is below the best one: 0 where it is the exact label."""
        s = self._scores(q)
        return s.max(axis=-1) - s[np.arange(len(s)), picked]

    def _scores(self, q: np.ndarray) -> np.ndarray:
        """Integer scores per class; one output s stands for two classes scoring cut - 1 and s."""
        s = np.asarray(q, dtype=np.int64) @ self.W + self.b
        return np.hstack([np.full_like(s, self.cut - 1), s]) if self.W.shape[1] == 1 else s

    def inputset(self) -> list[np.ndarray]:
        """Box corners reaching every score's and every gap's extremes, as (1, d) rows."""
        columns = [*self.W.T, *_gaps(self.W, self.b, self.cut)[0].T]
        d = self.W.shape[0]
        rows = [np.full(d, self.low), np.full(d, self.high)]
        for w in columns:
            rows += [np.where(w > 0, self.high, self.low), np.where(w < 0, self.high, self.low)]
        return [row[None, :].astype(np.int64) for row in np.unique(np.array(rows), axis=0)]


def plan(concrete: Any, point: Point | None = None) -> Plan:
    """Concrete ML's quantized linear classifier as integers, and the rounding steps for its gaps.

    Concrete ML's circuit outputs acc = q @ (Wq - zp_w) + bq and dequantizes S * (acc - zp_out) with
    S > 0, so the scores' signs and argmax are those of s = q @ (Wq - zp_w) + bq - zp_out, and a
    two-class operating point is a least s (`Point.cut`).
    """
    inputs, outputs = concrete.input_quantizers[0], concrete.output_quantizers[0]
    W = np.asarray(concrete._q_weights, dtype=np.int64) - int(concrete._weight_quantizer.zero_point)
    bias = np.asarray(concrete._q_bias, dtype=np.int64).reshape(-1)
    zero = np.broadcast_to(np.asarray(outputs.zero_point, dtype=np.float64).reshape(-1), bias.shape)
    if not np.all(zero == np.round(zero)):
        raise ValueError("Concrete ML's output zero point is not an integer: the label rule would not be exact")
    b = bias - zero.astype(np.int64)
    low, high = -int(inputs.offset), 2 ** int(inputs.n_bits) - 1 - int(inputs.offset)
    if point is not None and W.shape[1] != 1:
        raise ValueError("an operating point needs the one output of a two-class model")
    cut = 1 if point is None else point.cut(float(np.ravel(outputs.scale)[0]))
    gap_low, gap_high = _extremes(*_gaps(W, b, cut), low, high)
    first = max(_bits(gap_low, gap_high) - STAGES[0], 1)
    second = max(first + MARGIN - STAGES[1], 1)
    rounded_low, rounded_high = _rounded(gap_low, first), _rounded(gap_high, first)
    overflow = _bits(min(rounded_low, 0), max(rounded_high, 0)) > _bits(min(gap_low, 0), max(gap_high, 0))
    return Plan(W, b, cut, low, high, first, second, overflow)


def compile_label(concrete: Any, point: Point | None = None) -> tuple[Any, Plan]:
    """The label circuit of a quantized Concrete ML linear classifier (at `point`), compiled on box corners only."""
    from concrete import fhe

    rule = plan(concrete, point)
    return fhe.Compiler(_function(rule), {"q": "encrypted"}).compile(
        rule.inputset(), configuration=fhe.Configuration(**CONFIGURATION)
    ), rule


def _function(rule: Plan) -> Any:
    """The circuit: gaps, two approximate roundings each, the wins per class, the winner's index."""
    from concrete import fhe

    W, b, cut, first, second = rule.W, rule.b, rule.cut, rule.first, rule.second
    k = W.shape[1]
    i, j = _pairs(k)
    step, approximate = 1 << first, fhe.Exactness.APPROXIMATE
    lift = 1 << (second - 1)  # puts the second rounding's boundary exactly at a remainder of zero
    beats = np.zeros((len(i), k), dtype=np.int64)  # wins of class c = wins @ beats[:, c] + (pairs where c is j)
    beats[np.arange(len(i)), i], beats[np.arange(len(i)), j] = 1, -1
    losses = np.array([(j == c).sum() for c in range(k)], dtype=np.int64)

    def label(q: Any) -> Any:
        s = q @ W + b
        gap = s - cut if k == 1 else s[:, i] - s[:, j]
        coarse = fhe.round_bit_pattern(
            gap, lsbs_to_remove=first, exactness=approximate, overflow_protection=rule.overflow
        )
        # the remainder keeps the gap's sign: a wrong coarse step (half a step at most) moves it by one step
        rest = gap - fhe.univariate(lambda v: v - step * np.sign(v) - lift)(coarse)
        fine = fhe.round_bit_pattern(
            fhe.hint(rest, bit_width=first + MARGIN),
            lsbs_to_remove=second,
            exactness=approximate,
            overflow_protection=False,
        )
        wins = fhe.univariate(lambda v: (v >= (1 << second)).astype(np.int64))(fine)
        if k == 1:
            return wins
        count = fhe.hint(wins @ beats + losses, can_store=[0, k - 1])
        top = fhe.univariate(lambda t: (t == k - 1).astype(np.int64))(count)
        return fhe.hint(np.sum(top * np.arange(k), axis=1), can_store=[0, k - 1])  # not a dot: docs/privacy.md

    return label


def _pairs(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Class pairs (i < j) the circuit compares; with one output, none (the score is compared with zero)."""
    return np.triu_indices(k, 1)


def _gaps(W: np.ndarray, b: np.ndarray, cut: int) -> tuple[np.ndarray, np.ndarray]:
    """Each comparison's gap as a linear map of q (gap = q @ Wg + bg): s_i - s_j, i wins at >= 0; or s - cut."""
    if W.shape[1] == 1:
        return W, b - cut
    i, j = _pairs(W.shape[1])
    return W[:, i] - W[:, j], b[i] - b[j]


def _extremes(W: np.ndarray, b: np.ndarray, low: int, high: int) -> tuple[int, int]:
    """The smallest and largest of q @ W + b over the whole input box (each column is linear in q)."""
    top = (high * np.clip(W, 0, None) + low * np.clip(W, None, 0)).sum(axis=0) + b
    bottom = (low * np.clip(W, 0, None) + high * np.clip(W, None, 0)).sum(axis=0) + b
    return int(bottom.min()), int(top.max())


def _bits(low: int, high: int) -> int:
    """Bits of the integer Concrete gives a value in [low, high] (signed when low < 0)."""
    from concrete import fhe

    return int(fhe.Integer.that_can_represent([low, high]).bit_width)


def _rounded(value: int, lsbs: int) -> int:
    """Rounding half up to a multiple of 2**lsbs, as round_bit_pattern does exactly."""
    return ((value + (1 << (lsbs - 1))) >> lsbs) << lsbs
