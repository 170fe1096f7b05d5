"""The operating point of a two-class model: the positive class's score from which it answers that class.

Answering the class with the larger probability (0.5) misses a rare class: a readmission model then flags
almost nobody. A clinical team chooses where the model trades sensitivity for specificity: Youden's J
(the largest sensitivity + specificity), a sensitivity or a specificity to reach, or a threshold of its
own. It is chosen on labelled rows the coordinator holds, stored in the model (part of its sha256),
pinned in the client spec, and applied where the scores are: by the client to its decrypted scores, or
inside a label circuit.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfhe.errors import FedfheError
from fedfhe.quality import ARGMAX

RULES = ("youden", "sensitivity=F", "specificity=F")
POINT_MEMBER = "fedfhe-operating-point.json"  # in client.zip: the positive class and the threshold a client applies
EDGE = 1e-9  # thresholds stay this far inside (0, 1), so their log-odds are finite


@dataclass(frozen=True)
class Rule:
    """How the threshold is found: youden, sensitivity or specificity (to reach `value`), or threshold (given)."""

    name: str
    value: float | None = None

    def __str__(self) -> str:
        return self.name if self.value is None else f"{self.name}={self.value:g}"


@dataclass(frozen=True)
class Point:
    """An operating point: rows whose `positive` class (its index) scores at least `threshold` get that class."""

    positive: int
    threshold: float

    def picks(self, proba: np.ndarray) -> np.ndarray:
        """Class indexes for rows of the two classes' scores."""
        return np.where(np.asarray(proba)[:, self.positive] >= self.threshold, self.positive, 1 - self.positive)

    def cut(self, scale: float) -> int:
        """The least integer output s (logit scale * s) that gets class 1: the rule a label circuit computes."""
        log_odds = math.log(self.threshold / (1 - self.threshold))
        if self.positive == 1:  # sigmoid(scale * s) >= threshold
            return math.ceil(log_odds / scale)
        return math.floor(-log_odds / scale) + 1  # 1 - sigmoid(scale * s) < threshold


def decide(proba: np.ndarray, point: Point | None) -> np.ndarray:
    """Class indexes for rows of class scores: at the operating point, or the most probable class."""
    return np.argmax(proba, axis=1) if point is None else point.picks(proba)


def read_point(raw: bytes, where: str) -> Point:
    """An operating point as a client spec pins it, refused in one line unless a class index and a score."""
    try:
        stored = json.loads(raw)
        point = Point(stored["positive"], float(stored["threshold"]))
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise FedfheError(f"{where}: unreadable operating point ({type(exc).__name__}: {exc})") from None
    if point.positive not in (0, 1) or type(point.positive) is not int or not EDGE <= point.threshold <= 1 - EDGE:
        raise FedfheError(f"{where}: refused, operating point {stored!r} is not a class of two and a score in (0, 1)")
    return point


def parse(operating_point: str | None, threshold: float | None) -> Rule | None:
    """--operating-point youden | sensitivity=F | specificity=F, or --threshold P; one line for anything else."""
    if operating_point is not None and threshold is not None:
        raise FedfheError("--operating-point or --threshold, not both: a rule that finds the threshold, or one given")
    if threshold is not None:
        if not 0 < threshold < 1:
            raise FedfheError(f"--threshold must be a score strictly between 0 and 1 (got {threshold:g})")
        return Rule("threshold", float(threshold))
    if operating_point is None:
        return None
    name, equals, text = operating_point.partition("=")
    if name == "youden" and not equals:
        return Rule("youden")
    if name in ("sensitivity", "specificity") and equals:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if 0 < value < 1:
            return Rule(name, value)
    raise FedfheError(
        f"--operating-point must be one of {', '.join(RULES)}, F a fraction strictly between 0 and 1 "
        f"(got {operating_point!r})"
    )


def positive_scores(model: Any, X: np.ndarray, positive: int) -> np.ndarray:
    """The float model's score of the positive class, as a client computes it: the sigmoid of the logit."""
    logit = np.asarray(model.to_sklearn().decision_function(X), dtype=np.float64).reshape(len(X), -1)
    if logit.shape[1] != 1:
        raise FedfheError("an operating point applies to two-class models")
    p = np.exp(-np.logaddexp(0, -logit[:, 0]))
    return p if positive == 1 else 1 - p


def predict(model: Any, X: np.ndarray) -> np.ndarray:
    """The float model's predictions: classes at its operating point, else scikit-learn's predict (values too)."""
    point = point_of(model)
    if point is None:
        return np.asarray(model.to_sklearn().predict(X))
    score = positive_scores(model, X, 1)
    return np.asarray(model.classes)[point.picks(np.column_stack([1 - score, score]))]


def choose(rule: Rule, score: np.ndarray, hit: np.ndarray) -> float:
    """The threshold `rule` picks on these rows' scores and truths (hit: the row is of the positive class).

    Between two neighbouring scores any threshold flags the same rows; the midpoint is taken, so
    quantization and float rounding cannot move a row it was chosen on across it.
    """
    if rule.name == "threshold":
        assert rule.value is not None
        return rule.value
    from sklearn.metrics import roc_curve

    if hit.all() or not hit.any():
        raise FedfheError(
            f"--operating-point {rule} needs rows of both classes to choose on ({len(hit)} rows, one class)"
        )
    fpr, tpr, cuts = roc_curve(hit, score, drop_intermediate=False)  # cuts: inf, then every score, falling
    if rule.name == "youden":
        i = int(np.argmax(tpr - fpr))  # the first, highest threshold among equals
    elif rule.name == "sensitivity":
        i = int(np.flatnonzero(tpr >= rule.value)[0])  # the highest threshold that reaches it: most specific
    else:
        i = int(np.flatnonzero(1 - fpr >= rule.value)[-1])  # the lowest that keeps it: most sensitive
    upper = 1.0 if i == 0 else float(cuts[i])
    lower = float(cuts[i + 1]) if i + 1 < len(cuts) else 0.0
    return float(np.clip((upper + lower) / 2, EDGE, 1 - EDGE))


def at(point: Point, score: np.ndarray, hit: np.ndarray) -> dict[str, Any]:
    """Sensitivity and specificity at the point on the rows it was chosen on, with their counts."""
    flagged = score >= point.threshold
    return {
        "rows": len(hit),
        "positives": int(hit.sum()),
        "sensitivity": float(flagged[hit].mean()),
        "specificity": float((~flagged[~hit]).mean()),
    }


def point_of(model: Any) -> Point | None:
    """The model's stored operating point (None: it answers its most probable class), checked."""
    stored = model.metadata.get("operating_point")
    if stored is None:
        return None
    try:
        point = Point(model.class_names.index(str(stored["class"])), float(stored["threshold"]))
    except (KeyError, TypeError, ValueError):
        raise FedfheError(f"unreadable operating point {str(stored)[:80]!r} in the model") from None
    if len(model.classes) != 2 or not EDGE <= point.threshold <= 1 - EDGE:
        raise FedfheError(f"the model's operating point {point.threshold:g} is not a score of one of two classes")
    return point


def check_classes(n_classes: int) -> None:
    """An operating point needs a model of two classes."""
    if n_classes != 2:
        raise FedfheError(
            f"--operating-point and --threshold apply to two-class models; this one has {n_classes or 'no'} classes"
        )


def apply(model: Any, rule: Rule, X: np.ndarray, y: np.ndarray, positive: int, on: str, source: str) -> Any:
    """A copy of the model answering at the point `rule` picks for class `positive` on these rows.

    `on` names the rows for people; `source` is what a report's `evaluated_on` says of the same rows.
    """
    check_classes(len(model.classes))
    score, hit = positive_scores(model, X, positive), np.asarray(y) == model.classes[positive]
    point = Point(positive, choose(rule, score, hit))
    metadata = {
        **model.metadata,
        "operating_point": {"class": model.class_names[positive], "threshold": point.threshold},
        "operating_point_choice": {"rule": str(rule), "on": on, "source": source, **at(point, score, hit)},
    }
    return dataclasses.replace(model, metadata=metadata)


def describe(model: Any, rows: str | None = None) -> str:
    """The model's decision in a line: argmax, or the threshold, its class, and where and how it was chosen.

    Figures on the very `rows` (a report's `evaluated_on`) it was chosen on are optimistic: the line says so.
    """
    point = point_of(model)
    if point is None:
        return ARGMAX
    choice = model.metadata.get("operating_point_choice")
    choice = choice if isinstance(choice, dict) else {}  # how it was chosen is not hashed: read it with care
    line = f"{model.class_names[point.positive]} when its score >= {point.threshold:.4g}"
    rule, sensitivity, specificity = choice.get("rule"), choice.get("sensitivity"), choice.get("specificity")
    if rule is None or str(rule).startswith("threshold"):
        return f"{line} (threshold given)"
    there = ""
    if isinstance(sensitivity, float) and isinstance(specificity, float):
        there = f": sensitivity {sensitivity:.3f}, specificity {specificity:.3f} there"
    line = f"{line} ({rule}, chosen on {choice.get('on')}{there})"
    if rows is not None and choice.get("source") == rows:
        line += "; chosen on these very rows, so figures at it are optimistic (`fedfhe evaluate --data` other rows)"
    return line
