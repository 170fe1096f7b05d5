"""Evaluation figures worth reading, each with a bootstrap 95% interval and the rows behind it.

A classifier gets accuracy and per-class precision and recall; with two classes also sensitivity,
specificity, PPV and NPV for the positive class, the ROC AUC of its score and (for probabilities
that mean something, logistic models) the Brier score. A regressor gets MAE, RMSE and R2. The
intervals are percentile intervals over resampled rows (seeded): they say how much the figure would
move on another test set of the same size, not how good the model is elsewhere.
"""

from __future__ import annotations

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
    n, k, resamples = len(y), len(classes), _resamples(len(y))
    # one confusion matrix per resample (rows: truth), every count-based figure read from them
    confusion = np.stack([np.bincount(truth[i] * k + picked[i], minlength=k * k) for i in resamples])
    confusion = confusion.reshape(-1, k, k)
    hits = confusion[:, np.arange(k), np.arange(k)]
    with np.errstate(invalid="ignore", divide="ignore"):  # a class nobody predicted: precision undefined
        precision, recall = hits / confusion.sum(axis=1), hits / confusion.sum(axis=2)
    figures: dict[str, Any] = {"accuracy": _figure(hits.sum(axis=1) / n, n)}
    figures["per_class"] = {
        name: {
            "precision": _figure(precision[:, c], n),
            "recall": _figure(recall[:, c], n),
            "rows": int((truth == c).sum()),
        }
        for c, name in enumerate(names)
    }
    if k == 2:
        negative = 1 - positive
        hit = truth == positive
        figures["positive_class"] = names[positive]
        figures["sensitivity"] = _figure(recall[:, positive], n)
        figures["specificity"] = _figure(recall[:, negative], n)
        figures["ppv"] = _figure(precision[:, positive], n)
        figures["npv"] = _figure(precision[:, negative], n)
        figures["auc"] = _figure(np.array([_auc(hit[i], proba[i, positive]) for i in resamples]), n)
        if calibrated:
            figures["brier"] = _figure(np.mean((proba[resamples, positive] - hit[resamples]) ** 2, axis=1), n)
    return figures


def regressor(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """MAE, RMSE and R2 of the predictions, with their intervals."""
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    n, resamples = len(y), _resamples(len(y))
    truth, errors = y[resamples], y[resamples] - pred[resamples]  # one row per resample
    spread = np.sum((truth - truth.mean(axis=1, keepdims=True)) ** 2, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample of one repeated value: R2 undefined
        r2 = 1 - np.sum(errors**2, axis=1) / spread
    return {
        "mae": _figure(np.mean(np.abs(errors), axis=1), n),
        "rmse": _figure(np.sqrt(np.mean(errors**2, axis=1)), n),
        "r2": _figure(np.where(spread > 0, r2, np.nan), n),
    }


def _resamples(n: int) -> np.ndarray:
    """Row indices of every bootstrap resample, the first row being the rows as they are."""
    rng = np.random.default_rng(SEED)
    return np.vstack([np.arange(n)[None, :], rng.integers(0, n, (RESAMPLES, n))])


def _figure(values: np.ndarray, rows: int) -> dict[str, Any]:
    """A figure on the rows as they are (values[0]), its 95% percentile interval over the resamples, the row count."""
    spread = values[1:][np.isfinite(values[1:])]
    low, high = np.percentile(spread, [2.5, 97.5]) if len(spread) else (np.nan, np.nan)
    return {"value": _finite(values[0]), "low": _finite(low), "high": _finite(high), "rows": rows}


def shown(figure: dict[str, Any]) -> str:
    """A figure and its interval in a few characters: 0.986 [0.964, 0.998]."""
    value, low, high = ("n/a" if figure[k] is None else f"{figure[k]:.3g}" for k in ("value", "low", "high"))
    return f"{value} [{low}, {high}]"


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
