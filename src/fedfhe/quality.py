"""Evaluation figures worth reading, each with a bootstrap 95% interval and the rows behind it.

A classifier gets accuracy and per-class precision and recall; with two classes also sensitivity,
specificity, PPV and NPV for the positive class, the ROC AUC of its score and (for probabilities
that mean something, logistic models) the Brier score. A regressor gets MAE, RMSE and R2. The
intervals are percentile intervals over resampled rows (seeded): they say how much the figure would
move on another test set of the same size, not how good the model is elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedfhe.errors import FedfheError

RESAMPLES = 1000
SEED = 0
CELLS = 1_000_000  # row weights held at once (resamples x rows): bounds memory for any row count


def positive_index(value: str | None, classes: list[int], names: list[str]) -> int:
    """Which class is positive: given by name or number, else the last one."""
    if value is None:
        return len(classes) - 1
    if value in names:  # a name first: a schema may name class 0 "1"
        return names.index(value)
    if value in (numbers := [str(c) for c in classes]):
        return numbers.index(value)
    raise FedfheError(f"--positive-class {value!r} is not a class; the classes are: {', '.join(names)}")


def classifier(
    y: np.ndarray,
    pred: np.ndarray,
    proba: np.ndarray | None,
    classes: list[int],
    names: list[str],
    positive: int,
    calibrated: bool,
) -> dict[str, Any]:
    """Accuracy, per-class precision and recall; with two classes, the clinical figures, AUC and Brier.

    Without probabilities (label outputs: the circuit sends the class only) there is no AUC or Brier.
    """
    y, pred = np.asarray(y), np.asarray(pred)
    index = {c: i for i, c in enumerate(classes)}
    truth, picked = np.array([index[int(c)] for c in y]), np.array([index[int(c)] for c in pred])
    n, k = len(y), len(classes)
    # one confusion matrix per resample (rows: truth): the weights of the rows in each of the k*k cells
    cell = truth * k + picked
    order = np.argsort(cell, kind="stable")
    present, starts = np.unique(cell[order], return_index=True)

    def confusion(weights: np.ndarray) -> np.ndarray:
        counts = np.zeros((len(weights), k * k))
        counts[:, present] = np.add.reduceat(weights[:, order], starts, axis=1)
        return counts

    matrices = _bootstrap(n, confusion).reshape(-1, k, k)
    hits, predicted, actual = matrices[:, np.arange(k), np.arange(k)], matrices.sum(axis=1), matrices.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):  # a class nobody predicted: precision undefined
        precision, recall = hits / predicted, hits / actual
    figures: dict[str, Any] = {"accuracy": _figure(hits.sum(axis=1) / n, n)}
    figures["per_class"] = {
        name: {
            "precision": _figure(precision[:, c], predicted[0, c]),
            "recall": _figure(recall[:, c], actual[0, c]),
            "rows": int(actual[0, c]),
        }
        for c, name in enumerate(names)
    }
    if k == 2:
        negative = 1 - positive
        hit = truth == positive
        figures["positive_class"] = names[positive]
        figures["sensitivity"] = _figure(recall[:, positive], actual[0, positive])
        figures["specificity"] = _figure(recall[:, negative], actual[0, negative])
        figures["ppv"] = _figure(precision[:, positive], predicted[0, positive])
        figures["npv"] = _figure(precision[:, negative], predicted[0, negative])
        if proba is not None:
            score = np.asarray(proba, dtype=np.float64)[:, positive]
            figures["auc"] = _figure(_bootstrap(n, _auc(hit, score)), n)
            if calibrated:
                figures["brier"] = _figure(_bootstrap(n, lambda w: w @ (score - hit) ** 2 / n), n)
    return figures


def regressor(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """MAE, RMSE and R2 of the predictions, with their intervals."""
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    n, errors = len(y), y - pred

    centred = y - y.mean()  # sums of squares about a resample's mean, without cancellation

    def sums(weights: np.ndarray) -> np.ndarray:  # per resample: sum |e|, sum e^2, sum y, sum y^2
        return weights @ np.column_stack([np.abs(errors), errors**2, centred, centred**2])

    mae, squared, total, total_squared = _bootstrap(n, sums).T
    spread = total_squared - total**2 / n
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample of one repeated value: R2 undefined
        r2 = np.where(spread > 1e-9 * total_squared[0], 1 - squared / spread, np.nan)
    return {
        "mae": _figure(mae / n, n),
        "rmse": _figure(np.sqrt(squared / n), n),
        "r2": _figure(r2, n),
    }


def _bootstrap(n: int, statistic: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """A statistic of row weights on the rows as they are (first), then on every resample (seeded).

    A resample is given as how often it draws each row; resamples go in chunks of about CELLS
    weights, so memory stays bounded however many rows there are.
    """
    rng = np.random.default_rng(SEED)
    chunk = max(1, CELLS // max(n, 1))
    results = [statistic(np.ones((1, n)))]
    for start in range(0, RESAMPLES, chunk):
        size = min(chunk, RESAMPLES - start)
        drawn = rng.integers(0, n, (size, n)) + n * np.arange(size)[:, None]
        results.append(statistic(np.bincount(drawn.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)))
    return np.concatenate(results)


def _figure(values: np.ndarray, rows: int) -> dict[str, Any]:
    """A figure on the rows as they are (values[0]), its 95% percentile interval over the resamples, the row count."""
    spread = values[1:][np.isfinite(values[1:])]
    low, high = np.percentile(spread, [2.5, 97.5]) if len(spread) else (np.nan, np.nan)
    return {"value": _finite(values[0]), "low": _finite(low), "high": _finite(high), "rows": int(rows)}


def shown(figure: dict[str, Any]) -> str:
    """A figure and its interval in a few characters: 0.986 [0.964, 0.998]."""
    value, low, high = ("n/a" if figure[k] is None else f"{figure[k]:.3g}" for k in ("value", "low", "high"))
    return f"{value} [{low}, {high}]"


def _auc(hit: np.ndarray, score: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Area under the ROC curve as a statistic of row weights: the chance a positive row scores above a negative one (ties count half)."""
    order = np.argsort(score, kind="stable")
    hit, score = hit[order], score[order]
    new = np.r_[True, score[1:] != score[:-1]]  # where a run of equal scores begins
    starts, group = np.flatnonzero(new), np.cumsum(new) - 1
    ends = np.r_[starts[1:], len(score)]

    def statistic(weights: np.ndarray) -> np.ndarray:
        weights = weights[:, order]
        positive, negative = weights * hit, weights * ~hit
        below = np.hstack([np.zeros((len(weights), 1)), np.cumsum(negative, axis=1)])  # negatives before each row
        under = below[:, starts] + 0.5 * (below[:, ends] - below[:, starts])  # per run: below it, and half of it
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample of one class: AUC undefined
            return (positive * under[:, group]).sum(axis=1) / (positive.sum(axis=1) * negative.sum(axis=1))

    return statistic


def _finite(value: float) -> float | None:
    """A number for JSON: None where undefined."""
    return float(value) if np.isfinite(value) else None
