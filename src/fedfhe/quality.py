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
    proba: np.ndarray,
    classes: list[int],
    names: list[str],
    positive: int,
    calibrated: bool,
) -> dict[str, Any]:
    """Accuracy, per-class precision and recall; with two classes, the clinical figures, AUC and Brier."""
    y, pred, proba = np.asarray(y), np.asarray(pred), np.asarray(proba, dtype=np.float64)
    index = {c: i for i, c in enumerate(classes)}
    truth, picked = np.array([index[int(c)] for c in y]), np.array([index[int(c)] for c in pred])
    k, resamples = len(classes), _resamples(len(y))
    figures: dict[str, Any] = {"accuracy": _figure(lambda i: float(np.mean(truth[i] == picked[i])), resamples)}

    def confusion(i: np.ndarray) -> np.ndarray:
        return np.bincount(truth[i] * k + picked[i], minlength=k * k).reshape(k, k)  # rows: truth

    def precision(c: int) -> Callable[[np.ndarray], float]:
        return lambda i: _ratio(confusion(i)[c, c], confusion(i)[:, c].sum())

    def recall(c: int) -> Callable[[np.ndarray], float]:
        return lambda i: _ratio(confusion(i)[c, c], confusion(i)[c].sum())

    figures["per_class"] = {
        name: {
            "precision": _figure(precision(c), resamples),
            "recall": _figure(recall(c), resamples),
            "rows": int((truth == c).sum()),
        }
        for c, name in enumerate(names)
    }
    if k == 2:
        negative = 1 - positive
        hit = truth == positive
        figures["positive_class"] = names[positive]
        figures["sensitivity"] = _figure(recall(positive), resamples)
        figures["specificity"] = _figure(recall(negative), resamples)
        figures["ppv"] = _figure(precision(positive), resamples)
        figures["npv"] = _figure(precision(negative), resamples)
        figures["auc"] = _figure(lambda i: _auc(hit[i], proba[i, positive]), resamples)
        if calibrated:
            figures["brier"] = _figure(lambda i: float(np.mean((proba[i, positive] - hit[i]) ** 2)), resamples)
    return figures


def regressor(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """MAE, RMSE and R2 of the predictions, with their intervals."""
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    resamples = _resamples(len(y))

    def r2(i: np.ndarray) -> float:
        spread = float(np.sum((y[i] - y[i].mean()) ** 2))
        return float(1 - np.sum((y[i] - pred[i]) ** 2) / spread) if spread > 0 else float("nan")

    return {
        "mae": _figure(lambda i: float(np.mean(np.abs(y[i] - pred[i]))), resamples),
        "rmse": _figure(lambda i: float(np.sqrt(np.mean((y[i] - pred[i]) ** 2))), resamples),
        "r2": _figure(r2, resamples),
    }


def _resamples(n: int) -> np.ndarray:
    """Row indices of every bootstrap resample, the first row being the rows as they are."""
    rng = np.random.default_rng(SEED)
    return np.vstack([np.arange(n)[None, :], rng.integers(0, n, (RESAMPLES, n))])


def _figure(statistic: Callable[[np.ndarray], float], resamples: np.ndarray) -> dict[str, Any]:
    """The figure on the rows, its 95% percentile interval over the resamples, and the row count."""
    value = statistic(resamples[0])
    spread = np.array([statistic(i) for i in resamples[1:]])
    spread = spread[np.isfinite(spread)]
    low, high = np.percentile(spread, [2.5, 97.5]) if len(spread) else (np.nan, np.nan)
    return {"value": _finite(value), "low": _finite(low), "high": _finite(high), "rows": int(resamples.shape[1])}


def _ratio(hits: int, total: int) -> float:
    """hits / total, undefined (NaN) when nothing was counted."""
    return float(hits / total) if total else float("nan")


def _auc(hit: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve: the chance a positive row scores above a negative one (ties count half)."""
    from scipy.stats import rankdata

    positives, negatives = int(hit.sum()), int((~hit).sum())
    if not positives or not negatives:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[hit].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _finite(value: float) -> float | None:
    """A number for JSON: None where undefined."""
    return float(value) if np.isfinite(value) else None
