"""Evaluation figures that cannot mislead: each names its class, gives its counts and a 95% interval.

A classifier's figures lead with what a model must beat: the prevalence of each class and the
no-information accuracy (always answering the most common class), then balanced accuracy,
accuracy and per-class precision and recall; with two classes also sensitivity, specificity, PPV
and NPV at the model's decision, the ROC AUC and PR-AUC of the positive class's score and (for
probabilities that mean something, logistic models) the Brier score. A regressor gets MAE, RMSE
and R2. Proportions (k of n rows) get exact Clopper-Pearson intervals, which never collapse to a
point on few rows; the other figures percentile intervals over resampled rows (seeded). Both say
how much a figure would move on another test set of the same size, not how good the model is elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedfhe.errors import FedfheError

RESAMPLES = 1000
SEED = 0
CELLS = 1_000_000  # row weights held at once (resamples x rows): bounds memory for any row count
CONFIDENCE = 0.95
NEAR = 0.01  # accuracy within this of the no-information accuracy earns a warning (1 point)
FOUND = 0.5  # a class's recall below this earns a warning
ARGMAX = "the most probable class (argmax)"  # the decision without an operating point


def positive_index(value: str | None, classes: list[int], names: list[str], named: str | None = None) -> int:
    """Which class is positive: `value` (a name or number) if given, else the one the model names; never by position."""
    if value is None and named is None:
        raise FedfheError(
            f"the model names no positive class: give --positive-class ({' or '.join(names)}), "
            "the class sensitivity, PPV and AUC are about"
        )
    if value is None:
        return names.index(str(named))
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
    decision: str = ARGMAX,
) -> dict[str, Any]:
    """Prevalence, no-information and balanced accuracy, accuracy, per-class precision and recall; two classes:
    the clinical figures, AUC, PR-AUC and Brier; a warning when the model may be no better than guessing.

    `positive`: the positive class's index (two classes; ignored for more). `decision`: how `pred` was
    decided from the scores (the model's operating point), named beside the figures. Without probabilities (label outputs: the circuit sends the class only) there is no AUC, PR-AUC or Brier.
    """
    y, pred = np.asarray(y), np.asarray(pred)
    k, n = len(classes), len(y)
    index = {c: i for i, c in enumerate(classes)}
    truth, picked = np.array([index[int(c)] for c in y], dtype=np.int64), np.array([index[int(c)] for c in pred])
    score = None if proba is None or k != 2 else np.asarray(proba, dtype=np.float64)[:, positive]
    matrix = np.zeros((k, k), dtype=np.int64)  # rows: truth, columns: decision
    np.add.at(matrix, (truth, picked), 1)
    actual, predicted, hits = matrix.sum(axis=1), matrix.sum(axis=0), np.diag(matrix)
    majority = int(np.argmax(actual))
    members = truth[:, None] == np.arange(k)
    found = members & (picked == truth)[:, None]

    def balanced(weights: np.ndarray) -> np.ndarray:  # mean recall over the classes a resample holds
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nanmean((weights @ found) / (weights @ members), axis=1)

    figures: dict[str, Any] = {}
    if k == 2:
        figures["positive_class"] = names[positive]
        figures["prevalence"] = proportion(int(actual[positive]), n)
    figures["majority_class"] = names[majority]
    figures["no_information_accuracy"] = proportion(int(actual[majority]), n)
    figures["balanced_accuracy"] = _figure(_bootstrap(n, balanced), n)
    figures["accuracy"] = proportion(int(hits.sum()), n)
    if k == 2:
        negative, hit = 1 - positive, truth == positive
        if score is not None:
            figures["auc"] = _figure(_bootstrap(n, _auc(hit, score)), n)
            figures["pr_auc"] = _figure(_bootstrap(n, _average_precision(hit, score)), n)
        figures["sensitivity"] = proportion(int(hits[positive]), int(actual[positive]))
        figures["specificity"] = proportion(int(hits[negative]), int(actual[negative]))
        figures["ppv"] = proportion(int(hits[positive]), int(predicted[positive]))
        figures["npv"] = proportion(int(hits[negative]), int(predicted[negative]))
        if score is not None and calibrated:
            figures["brier"] = _figure(_bootstrap(n, lambda w: w @ (score - hit) ** 2 / n), n)
        figures["decision"] = decision
    figures["per_class"] = {
        name: {
            "prevalence": proportion(int(actual[c]), n),
            "precision": proportion(int(hits[c]), int(predicted[c])),
            "recall": proportion(int(hits[c]), int(actual[c])),
            "rows": int(actual[c]),
        }
        for c, name in enumerate(names)
    }
    if warning := _warning(figures, decision != ARGMAX):
        figures["warning"] = warning
    return figures


def _warning(figures: dict[str, Any], chosen: bool) -> str | None:
    """One line when the model may be no better than always answering the most common class.

    `chosen`: the decision is an operating point, which trades accuracy for finding the positive class.
    """
    accuracy, baseline = figures["accuracy"]["value"], figures["no_information_accuracy"]["value"]
    problems = []
    if accuracy is not None and accuracy < baseline + NEAR:
        relation = "below" if accuracy < baseline - NEAR else "within 1 point of"
        problems.append(
            f"accuracy {accuracy:.1%} is {relation} the {baseline:.1%} of always answering {figures['majority_class']}"
            + (
                " (an operating point gives up accuracy to find its class: judge it by each class's recall)"
                if chosen
                else ""
            )
        )
    for name, per in figures["per_class"].items():
        recall = per["recall"]
        if recall["value"] is not None and recall["value"] < FOUND:
            problems.append(f"{name} is found in {recall['count']} of its {recall['rows']} rows")
    return "; ".join(problems) or None


def proportion(count: int, rows: int) -> dict[str, Any]:
    """count of rows as a figure with its exact (Clopper-Pearson) 95% interval: 0 of 25 gives 0 to 0.137."""
    from scipy.stats import beta

    if rows == 0:
        return {"value": None, "low": None, "high": None, "rows": 0, "count": 0}
    tail = (1 - CONFIDENCE) / 2
    low = float(beta.ppf(tail, count, rows - count + 1)) if count > 0 else 0.0
    high = float(beta.ppf(1 - tail, count + 1, rows - count)) if count < rows else 1.0
    return {"value": count / rows, "low": low, "high": high, "rows": rows, "count": count}


def entries(figures: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The figures in reading order, each named with the class it is about (per class when more than two)."""
    positive, majority = figures.get("positive_class"), figures.get("majority_class")
    negative = next((c for c in figures.get("per_class", {}) if c != positive), None)
    titles = {
        "prevalence": f"prevalence of {positive}",
        "no_information_accuracy": f"no-information accuracy (always {majority})",
        "balanced_accuracy": "balanced accuracy (mean recall of the classes)",
        "auc": f"AUC ({positive} scored above {negative})",
        "pr_auc": f"PR-AUC ({positive})",
        "sensitivity": f"sensitivity (recall of {positive})",
        "specificity": f"specificity (recall of {negative})",
        "ppv": f"PPV (precision of {positive})",
        "npv": f"NPV (precision of {negative})",
        "brier": f"Brier score ({positive})",
    }
    shown = [(titles.get(name, name), f) for name, f in figures.items() if isinstance(f, dict) and "value" in f]
    for name, per in figures.get("per_class", {}).items() if positive is None else ():  # two: shown above
        shown += [(f"{name}: {figure}", per[figure]) for figure in ("prevalence", "precision", "recall")]
    return shown


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
    """A figure, its interval and its counts in a few characters: 0.0172 [0.000436, 0.0924] 1/58."""
    value, low, high = ("n/a" if figure[k] is None else f"{figure[k]:.3g}" for k in ("value", "low", "high"))
    return f"{value} [{low}, {high}] {counts(figure)}"


def counts(figure: dict[str, Any]) -> str:
    """k/n for a proportion, else the rows a figure was computed on."""
    return f"{figure['count']}/{figure['rows']}" if "count" in figure else f"{figure['rows']} rows"


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


def _average_precision(hit: np.ndarray, score: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """PR-AUC (average precision) as a statistic of row weights: precision at each distinct score, weighted by the
    positive rows it adds (scikit-learn's average_precision_score)."""
    order = np.argsort(-score, kind="stable")
    hit, score = hit[order], score[order]
    ends = np.r_[np.flatnonzero(score[1:] != score[:-1]), len(score) - 1]  # last row of each run of equal scores

    def statistic(weights: np.ndarray) -> np.ndarray:
        weights = weights[:, order]
        true = np.cumsum(weights * hit, axis=1)[:, ends]
        flagged = np.cumsum(weights, axis=1)[:, ends]
        gained = np.diff(true, axis=1, prepend=0)
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample without positives: undefined
            precision = np.where(flagged > 0, true / np.where(flagged > 0, flagged, 1), 0)
            return (gained * precision).sum(axis=1) / true[:, -1]

    return statistic


def _finite(value: float) -> float | None:
    """A number for JSON: None where undefined."""
    return float(value) if np.isfinite(value) else None
