"""Evaluation figures with intervals, checked against scikit-learn's metrics on the same rows."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cli
from sklearn.metrics import (
    accuracy_score,
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
    assert quality.positive_index(None, [0, 1], ["malignant", "benign"]) == 1
    assert quality.positive_index("malignant", [0, 1], ["malignant", "benign"]) == 0
    assert quality.positive_index("1", [0, 1], ["malignant", "benign"]) == 1
    with pytest.raises(FedfheError, match="'cancer' is not a class; the classes are: malignant, benign"):
        quality.positive_index("cancer", [0, 1], ["malignant", "benign"])
    out = tmp_path / "run"
    done = cli("run", "--dataset", "breast-cancer", "--positive-class", "cancer", "--out", str(out))
    assert done.returncode == 2 and "the classes are: malignant, benign" in done.stderr and not out.exists()
    done = cli("run", "--dataset", "diabetes", "--model", "ridge", "--positive-class", "1", "--out", str(out))
    assert done.returncode == 2 and "applies to two-class models" in done.stderr and not out.exists()
    assert quality.positive_index("0", [0, 1], ["1", "0"]) == 1  # a name before a number


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
