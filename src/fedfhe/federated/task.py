"""The model every client trains: multinomial logistic regression on features scaled to [0, 1]."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from fedfhe.errors import FedfheError

Params = list[np.ndarray]


def scale(X: np.ndarray, input_range: tuple[float, float]) -> np.ndarray:
    """Map the declared input range to [0, 1]; a fixed map needs no statistics from anyone's data."""
    low, high = input_range
    return (X - low) / (high - low)


def unscale(coef: np.ndarray, intercept: np.ndarray, input_range: tuple[float, float]) -> Params:
    """Fold the [0, 1] scaling into the weights so the exported model takes raw features."""
    low, high = input_range
    raw_coef = coef / (high - low)
    return [raw_coef, intercept - raw_coef @ np.full(coef.shape[1], low)]


def initial_params(n_features: int, n_classes: int) -> Params:
    """Zero weights: the common starting point of every client."""
    rows = 1 if n_classes == 2 else n_classes
    return [np.zeros((rows, n_features)), np.zeros(rows)]


def classifier(params: Params, classes: np.ndarray) -> LogisticRegression:
    """A fitted scikit-learn classifier holding the given weights."""
    model = LogisticRegression()
    model.coef_, model.intercept_ = np.array(params[0], dtype=np.float64), np.array(params[1], dtype=np.float64)
    model.classes_ = np.asarray(classes)
    model.n_features_in_ = model.coef_.shape[1]
    return model


def fit(params: Params, X: np.ndarray, y: np.ndarray, classes: np.ndarray, C: float, iterations: int) -> Params:
    """Run `iterations` lbfgs iterations from `params` on local data; returns the new weights.

    A client may lack some classes; one zero-weight row per missing class keeps every class's
    coefficients in the model (and out of the loss), so all clients' updates stay aligned.
    """
    missing = np.setdiff1d(classes, y)
    weights = np.concatenate([np.ones(len(y)), np.zeros(len(missing))])
    X = np.vstack([X, np.zeros((len(missing), X.shape[1]))])
    y = np.concatenate([y, missing])
    model = LogisticRegression(C=C, max_iter=iterations, warm_start=True)
    model.coef_, model.intercept_ = params[0].copy(), params[1].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # scipy's notice about lbfgs options
        model.fit(X, y, sample_weight=weights)
    return [model.coef_, model.intercept_]


def evaluate(params: Params, X: np.ndarray, y: np.ndarray, classes: np.ndarray) -> tuple[float, float]:
    """Accuracy and log-loss of the weights on (X, y)."""
    model = classifier(params, classes)
    proba = model.predict_proba(X)
    accuracy = float(np.mean(model.classes_[proba.argmax(axis=1)] == y))
    return accuracy, float(log_loss(y, proba, labels=classes))


@dataclass(frozen=True)
class TrainConfig:
    """How the federation trains; every field is recorded in the model's metadata."""

    clients: int = 10
    rounds: int = 5
    local_iters: int = 20
    fraction: float = 1.0
    partitioning: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    C: float = 1.0

    def check(self, n_train: int) -> None:
        """Reject settings that cannot run on n_train samples, naming the option."""
        if self.clients < 1:
            raise FedfheError(f"--clients must be at least 1 (got {self.clients})")
        if self.clients > n_train:
            raise FedfheError(f"--clients {self.clients} is more than the {n_train} training samples")
        if self.rounds < 1:
            raise FedfheError(f"--rounds must be at least 1 (got {self.rounds})")
        if self.local_iters < 1:
            raise FedfheError(f"--local-iters must be at least 1 (got {self.local_iters})")
        if not 0 < self.fraction <= 1:
            raise FedfheError(f"--fraction must be in (0, 1] (got {self.fraction})")
        if self.C <= 0:
            raise FedfheError(f"--C must be > 0 (got {self.C})")
