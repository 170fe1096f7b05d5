"""What a client optimises in a round, and how any party scores weights on its own data.

Scoring is NumPy alone and equals scikit-learn's metrics (tests/test_model.py): a Deployment Engine
ClientApp starts a fresh process for every message, and importing scikit-learn costs it 0.4 s.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING

import numpy as np

from fedfhe.kinds import Params
from fedfhe.problem import Problem

if TYPE_CHECKING:
    from threadpoolctl import ThreadpoolController


def fit(
    problem: Problem,
    params: Params,
    X: np.ndarray,
    y: np.ndarray,
    hyper: dict[str, float],
    iterations: int,
    mu: float = 0.0,
) -> Params:
    """Train from `params` on local data (X scaled, y scaled targets or labels); returns the new weights.

    On one BLAS thread: a Ray actor has one, a Deployment Engine ClientApp process one per core, and a
    matrix product split across threads sums in another order. So the same data gives the same weights,
    bit for bit, on every engine, hence the same model sha256.
    """
    with _blas().limit(limits=1, user_api="blas"):
        if problem.kind.smooth:
            return _lbfgs(problem, params, X, y, hyper, iterations, mu)
        local = problem.kind.estimator(**hyper, warm_start=True, max_iter=iterations)
        local.coef_ = np.array(params[0][0], dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: a few sweeps per round is the point
            local.fit(X, y)
    return [local.coef_[None, :], np.array([local.intercept_], dtype=np.float64)]


@functools.cache
def _blas() -> ThreadpoolController:
    """threadpoolctl's handle on numpy's and scipy's BLAS, listed once a process (25 ms; a limit then 0.3 ms)."""
    import scipy.optimize  # noqa: F401  (loads scipy's BLAS before the libraries are listed)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _lbfgs(
    problem: Problem, params: Params, X: np.ndarray, y: np.ndarray, hyper: dict[str, float], iterations: int, mu: float
) -> Params:
    """L-BFGS on weight * sum(loss) + strength * ||W||^2 / 2 (intercept not penalised) + FedProx's term.

    Classifiers use scikit-learn's C * sum(loss) + ||W||^2 / 2 (multinomial log-loss, or LinearSVC's
    one-vs-rest squared hinge), each row's loss times its class's weight if the problem has class weights
    (scikit-learn's class_weight); regressors half of Ridge's ||y - Xw||^2 + alpha ||w||^2. FedProx adds
    mu/2 * weight * n * ||theta - start||^2 (mu relative to the mean loss, as in the paper), which
    scikit-learn cannot, hence scipy. Every class keeps its row even when a client has no sample of it.
    """
    from scipy.optimize import minimize

    start = np.concatenate([params[0].ravel(), params[1]])
    n_out, n_features = params[0].shape
    weight, strength = (hyper["C"], 1.0) if not problem.kind.regression else (1.0, hyper.get("alpha", 0.0))
    prox = mu * weight * len(y)
    target, rows = _targets(problem, y), problem.row_weights(y)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        W, b = theta[:-n_out].reshape(n_out, n_features), theta[-n_out:]
        loss, dZ = _loss(problem.kind.name, X @ W.T + b, target, rows)
        diff = theta - start
        value = weight * loss + 0.5 * strength * float(np.sum(W * W)) + 0.5 * prox * float(diff @ diff)
        grad = np.concatenate([(weight * dZ.T @ X + strength * W).ravel(), weight * dZ.sum(axis=0)]) + prox * diff
        return value, grad

    theta = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": iterations}).x
    return [theta[:-n_out].reshape(n_out, n_features), theta[-n_out:]]


def _targets(problem: Problem, y: np.ndarray) -> np.ndarray:
    """One-hot labels (one column for binary SVM), or the scaled targets as a column."""
    if problem.kind.regression:
        return np.asarray(y, dtype=np.float64)[:, None]
    onehot = (y[:, None] == problem.classes[None, :]).astype(np.float64)
    return onehot[:, 1:] if problem.n_outputs == 1 else onehot


def _loss(model: str, Z: np.ndarray, T: np.ndarray, rows: np.ndarray | None) -> tuple[float, np.ndarray]:
    """Summed loss of scores Z against targets T, each row's times its weight in `rows` if given, and its gradient."""
    if model == "logistic":
        lse = _logsumexp(Z)
        loss, dZ = lse - np.sum(Z * T, axis=1), np.exp(Z - lse[:, None]) - T
    elif model == "svm":
        signs = 2 * T - 1
        margin = np.maximum(0.0, 1 - signs * Z)
        loss, dZ = margin**2, -2 * signs * margin
    else:
        residual = Z - T
        loss, dZ = 0.5 * residual**2, residual
    if rows is not None:
        loss, dZ = loss * (rows if loss.ndim == 1 else rows[:, None]), dZ * rows[:, None]
    return float(np.sum(loss)), dZ


def _logsumexp(Z: np.ndarray) -> np.ndarray:
    """log(sum(exp(Z))) per row, shifted by the row's maximum so nothing overflows."""
    top = Z.max(axis=1)
    return top + np.log(np.exp(Z - top[:, None]).sum(axis=1))  # type: ignore[no-any-return]


def evaluate(problem: Problem, params: Params, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Score and loss on (X scaled, y raw): accuracy and log-loss or hinge, or R2 and MSE in target units."""
    kind, classes = problem.kind, problem.classes
    Z = X @ np.asarray(params[0], dtype=np.float64).T + np.asarray(params[1], dtype=np.float64)
    if kind.regression:
        predicted = problem.unscale_target(Z[:, 0])
        return kind.score(y, predicted), float(np.mean((y - predicted) ** 2))
    winner = (Z[:, 0] > 0).astype(np.int64) if Z.shape[1] == 1 else Z.argmax(axis=1)  # one row: binary SVM
    accuracy = kind.score(y, classes[winner])
    onehot = y[:, None] == classes[None, :]
    if kind.name == "svm":
        if Z.shape[1] == 1:  # scikit-learn's binary hinge: labels as -1/+1 times the decision value
            margin = np.where(onehot[:, 1], 1.0, -1.0) * Z[:, 0]
        else:  # Crammer-Singer: the true class's score against the best other one
            margin = Z[onehot] - np.where(onehot, -np.inf, Z).max(axis=1)
        return accuracy, float(np.mean(np.maximum(0.0, 1.0 - margin)))
    if Z.shape[1] == 1:
        Z = np.hstack([np.zeros_like(Z), Z])
    log_p = Z - _logsumexp(Z)[:, None]
    eps = np.finfo(np.float64).eps  # scikit-learn's log_loss clips probabilities to [eps, 1 - eps]
    return accuracy, float(-np.mean(np.log(np.clip(np.exp(log_p[onehot]), eps, 1 - eps))))
