"""Evaluation figures with intervals, checked against scikit-learn's metrics on the same rows."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cli
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    mean_absolute_error,
    precision_recall_fscore_support,
    r2_score,
    roc_auc_score,
)

from fedfhe import quality
from fedfhe.errors import FedfheError


@pytest.fixture
def binary():
    """300 rows of a noisy two-class problem: truth, predicted class, class probabilities."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p1 = np.clip(0.25 + 0.5 * y + rng.normal(0, 0.2, 300), 0, 1)
    return y, (p1 > 0.5).astype(int), np.column_stack([1 - p1, p1])


def test_two_class_figures_equal_scikit_learns_and_carry_intervals(binary):
    y, pred, proba = binary
    figures = quality.classifier(y, pred, proba, [0, 1], ["benign", "malignant"], 1, calibrated=True)
    precision, recall, _, support = precision_recall_fscore_support(y, pred)
    assert figures["positive_class"] == "malignant"
    expected = {
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "prevalence": np.mean(y == 1),
        "no_information_accuracy": max(np.mean(y == 0), np.mean(y == 1)),
        "pr_auc": average_precision_score(y, proba[:, 1]),
        "sensitivity": recall[1],
        "specificity": recall[0],
        "ppv": precision[1],
        "npv": precision[0],
        "auc": roc_auc_score(y, proba[:, 1]),
        "brier": brier_score_loss(y, proba[:, 1]),
    }
    for name, value in expected.items():
        f = figures[name]
        assert f["value"] == pytest.approx(value, abs=1e-12), name
        assert f["low"] <= f["value"] <= f["high"] and f["high"] - f["low"] < 0.2, (name, f)
    predicted = np.bincount(pred, minlength=2)
    rows = {"accuracy": 300, "auc": 300, "brier": 300, "sensitivity": support[1], "specificity": support[0]}
    rows |= {"ppv": predicted[1], "npv": predicted[0]}  # each figure's row count is its denominator
    assert {name: figures[name]["rows"] for name in rows} == rows
    assert figures["sensitivity"]["count"] == int(((pred == 1) & (y == 1)).sum())  # k of n, for k/n
    assert (
        "count" not in figures["auc"]
        and figures["decision"] == "the most probable class (argmax)"
        and "warning" not in figures
    )
    assert figures["per_class"]["benign"]["rows"] == support[0]
    assert figures["per_class"]["benign"]["precision"]["rows"] == predicted[0]
    assert figures["per_class"]["malignant"]["recall"]["value"] == pytest.approx(recall[1])
    flipped = quality.classifier(y, pred, proba, [0, 1], ["benign", "malignant"], 0, calibrated=False)
    assert flipped["sensitivity"]["value"] == pytest.approx(recall[0]) and "brier" not in flipped
    assert flipped["auc"]["value"] == pytest.approx(roc_auc_score(1 - y, proba[:, 0]))


def test_many_classes_and_a_regressor(binary):
    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))
    figures = quality.classifier(y, pred, np.eye(4)[pred], [0, 1, 2, 3], list("abcd"), 3, calibrated=True)
    precision, recall, _, _ = precision_recall_fscore_support(y, pred)
    assert [figures["per_class"][c]["precision"]["value"] for c in "abcd"] == pytest.approx(precision)
    assert [figures["per_class"][c]["recall"]["value"] for c in "abcd"] == pytest.approx(recall)
    assert "auc" not in figures and "sensitivity" not in figures
    truth = rng.normal(10, 3, 150)
    guess = truth + rng.normal(0, 1, 150)
    errors = quality.regressor(truth, guess)
    assert errors["mae"]["value"] == pytest.approx(mean_absolute_error(truth, guess))
    assert errors["rmse"]["value"] == pytest.approx(np.sqrt(np.mean((truth - guess) ** 2)))
    assert errors["r2"]["value"] == pytest.approx(r2_score(truth, guess))
    assert errors["r2"]["low"] < errors["r2"]["value"] < errors["r2"]["high"]


def test_the_positive_class_by_name_or_number_and_bad_ones(tmp_path):
    assert quality.positive_index(None, [0, 1], ["malignant", "benign"], "malignant") == 0  # the one the model names
    with pytest.raises(FedfheError, match=r"names no positive class: give --positive-class \(malignant or benign\)"):
        quality.positive_index(None, [0, 1], ["malignant", "benign"])  # never the last by position
    assert quality.positive_index("malignant", [0, 1], ["malignant", "benign"], "benign") == 0
    assert quality.positive_index("1", [0, 1], ["malignant", "benign"]) == 1
    with pytest.raises(FedfheError, match="'cancer' is not a class; the classes are: malignant, benign"):
        quality.positive_index("cancer", [0, 1], ["malignant", "benign"])
    out = tmp_path / "run"
    done = cli("run", "--dataset", "breast-cancer", "--positive-class", "cancer", "--out", str(out))
    assert done.returncode == 2 and "the classes are: malignant, benign" in done.stderr and not out.exists()
    done = cli("run", "--dataset", "diabetes", "--model", "ridge", "--positive-class", "1", "--out", str(out))
    assert done.returncode == 2 and "applies to two-class models" in done.stderr and not out.exists()
    assert quality.positive_index("0", [0, 1], ["1", "0"]) == 1  # a name before a number


def test_proportions_get_exact_intervals_that_never_collapse_on_few_rows():
    none_of_25, one_of_one = quality.proportion(0, 25), quality.proportion(1, 1)
    assert none_of_25["low"] == 0 and none_of_25["high"] == pytest.approx(1 - 0.025 ** (1 / 25))  # 0.137
    assert one_of_one["low"] == pytest.approx(0.025) and one_of_one["high"] == 1  # not [1, 1]
    assert quality.proportion(0, 0)["value"] is None
    assert quality.shown(quality.proportion(1, 58)) == "0.0172 [0.000436, 0.0924] 1/58"


def test_a_model_that_always_answers_no_is_warned_about():
    """The issue's readmission case: 58 of 400 readmitted, one flagged: 85.8% accuracy against 85.5% for "no"."""
    y = np.r_[np.ones(58, int), np.zeros(342, int)]
    pred = np.r_[1, np.zeros(399, int)]
    score = np.r_[np.full(58, 0.3), np.full(342, 0.1)]
    proba = np.column_stack([1 - score, score])
    figures = quality.classifier(y, pred, proba, [0, 1], ["no", "yes"], 1, calibrated=True)
    assert figures["warning"] == (
        "accuracy 85.8% is within 1 point of the 85.5% of always answering no; yes is found in 1 of its 58 rows"
    )
    shown = dict(quality.entries(figures))
    assert list(shown)[:4] == [
        "prevalence of yes",
        "no-information accuracy (always no)",
        "balanced accuracy (mean recall of the classes)",
        "accuracy",
    ]
    assert quality.counts(shown["sensitivity (recall of yes)"]) == "1/58" and "PPV (precision of yes)" in shown
    lowered = np.where(proba[:, 1] >= 0.2, 1, 0)  # an operating point decides: the figures follow the decision
    at = quality.classifier(y, lowered, proba, [0, 1], ["no", "yes"], 1, calibrated=True, decision="yes at >= 0.2")
    assert at["sensitivity"]["count"] == 58 and at["decision"] == "yes at >= 0.2" and "warning" not in at


def test_intervals_do_not_depend_on_how_resamples_are_chunked(binary, monkeypatch):
    """Memory is bounded by drawing resamples in chunks; the figures must not change with the chunk size."""
    y, pred, proba = binary

    def figures() -> tuple[dict, dict]:
        return quality.classifier(y, pred, proba, [0, 1], list("ab"), 1, calibrated=True), quality.regressor(y, pred)

    whole = figures()
    monkeypatch.setattr(quality, "CELLS", 7 * len(y))  # seven resamples at a time instead of all of them
    assert _same(figures(), whole)


def _same(a, b) -> bool:
    """Nested figures equal to 1e-12."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return all(_same(x, z) for x, z in zip(a, b, strict=True))
    return a == pytest.approx(b, abs=1e-12) if isinstance(a, float) else a == b
