"""The linear model kinds fedfhe trains federated and encrypts, each resolved once from its name."""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedfhe.errors import FedfheError, unknown

Params = list[np.ndarray]  # [coef (outputs x features), intercept (outputs)]
LBFGS = "L-BFGS from the global weights on scikit-learn's objective (+ FedProx term)"
WARM_CD = "scikit-learn coordinate descent with warm_start from the global weights"


@dataclass(frozen=True, eq=False)
class Kind:
    """A scikit-learn linear model: how clients train it and which Concrete ML class encrypts it.

    The estimator is imported on first use, so resolving a kind costs no scikit-learn import.
    """

    name: str
    module: str  # the scikit-learn module holding the estimator
    class_name: str  # the estimator's name, the same in scikit-learn and in concrete.ml.sklearn
    regression: bool
    federated: tuple[str, ...]  # estimator parameters the federated objective honours
    smooth: bool  # clients run L-BFGS on the summed objective; else scikit-learn's coordinate descent
    defaults: dict[str, Any] = field(default_factory=dict)  # where scikit-learn's suit [0, 1]-scaled data badly

    def __str__(self) -> str:
        return self.name

    @property
    def estimator(self) -> type:
        """The scikit-learn estimator class."""
        return getattr(importlib.import_module(self.module), self.class_name)

    @property
    def local_fit(self) -> str:
        """How a client trains in a round (recorded in the model's metadata)."""
        return LBFGS if self.smooth else WARM_CD

    @property
    def score_names(self) -> tuple[str, str]:
        """What a score and a loss of this kind are called in tables and plots."""
        if self.regression:
            return "r2", "mse"
        return "accuracy", "hinge loss" if self.name == "svm" else "log-loss"

    def n_outputs(self, n_classes: int) -> int:
        """Weight rows: class scores (multinomial logistic keeps two for binary), one per regressor or binary SVM."""
        return 1 if self.regression or (self.name == "svm" and n_classes == 2) else n_classes

    def resolve(self, params: dict[str, Any]) -> dict[str, Any]:
        """Every estimator parameter: fedfhe's defaults, then `params`, validated by scikit-learn itself.

        Names are checked against `get_params()`; values and their combinations by fitting the
        estimator on four rows, which runs all of scikit-learn's own checks through its public API.
        """
        self.check_names(params)
        estimator = self.estimator(**{**self.defaults, **params})
        X = np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                estimator.fit(X, np.array([0, 1, 0, 1]))
        except (ValueError, TypeError) as exc:
            raise FedfheError(f"--param: {str(exc).splitlines()[0]}") from None
        return estimator.get_params()

    def check_names(self, params: dict[str, Any]) -> None:
        """Refuse parameter names the estimator does not have, listing the ones it has."""
        valid = self.estimator().get_params()
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise FedfheError(
                f"unknown parameter {unknown[0]!r} for {self.class_name}; valid: {', '.join(sorted(valid))}"
            )

    def fitted(self, params: Params, classes: np.ndarray) -> Any:
        """A fitted scikit-learn estimator of this kind holding the given weights."""
        coef, intercept = np.array(params[0], dtype=np.float64), np.array(params[1], dtype=np.float64)
        estimator = self.estimator()
        if self.regression:
            estimator.coef_, estimator.intercept_ = coef[0], float(intercept[0])
        else:
            if len(classes) == 2 and len(coef) == 2:  # scikit-learn keeps one row for two classes
                coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
            estimator.coef_, estimator.intercept_ = coef, intercept
            estimator.classes_ = np.asarray(classes)
        estimator.n_features_in_ = coef.shape[1]
        return estimator

    def score(self, y: np.ndarray, predicted: np.ndarray) -> float:
        """Accuracy of predicted classes, or R2 of predicted values (the first of score_names), as scikit-learn has them."""
        if not self.regression:
            return float(np.mean(predicted == y))
        residual = float(np.sum((y - predicted) ** 2))
        total = float(np.sum((y - np.mean(y)) ** 2))
        if total == 0:  # scikit-learn's force_finite: a constant target scores 1 if matched exactly, else 0
            return 1.0 if residual == 0 else 0.0
        return 1 - residual / total


KINDS = {
    kind.name: kind
    for kind in (
        Kind("logistic", "sklearn.linear_model", "LogisticRegression", False, ("C",), True, {"max_iter": 1000}),
        Kind("svm", "sklearn.svm", "LinearSVC", False, ("C",), True, {"max_iter": 10_000}),
        Kind("linear", "sklearn.linear_model", "LinearRegression", True, (), True),
        Kind("ridge", "sklearn.linear_model", "Ridge", True, ("alpha",), True),
        Kind("lasso", "sklearn.linear_model", "Lasso", True, ("alpha",), False, {"alpha": 1e-4, "max_iter": 10_000}),
        Kind(
            "elasticnet",
            "sklearn.linear_model",
            "ElasticNet",
            True,
            ("alpha", "l1_ratio"),
            False,
            {"alpha": 1e-4, "max_iter": 10_000},
        ),
    )
}


def kind_of(name: str) -> Kind:
    """The model kind called `name`, or a one-line error listing the kinds."""
    if name not in KINDS:
        raise unknown("model", name, KINDS)
    return KINDS[name]
