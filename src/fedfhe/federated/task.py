"""The models every client trains: scikit-learn's linear models on features scaled to [0, 1]."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import ElasticNet, Lasso, LinearRegression, LogisticRegression, Ridge
from sklearn.metrics import hinge_loss, log_loss, mean_squared_error, r2_score
from sklearn.svm import LinearSVC

from fedfhe.data import Range
from fedfhe.errors import FedfheError

Params = list[np.ndarray]


@dataclass(frozen=True)
class Kind:
    """A scikit-learn linear model that fedfhe trains federated and converts to Concrete ML."""

    estimator: type
    regression: bool
    federated: tuple[str, ...]  # estimator parameters the federated objective honours
    local_fit: str  # how a client trains in a round (recorded in the model's metadata)
    defaults: dict[str, Any] = field(default_factory=dict)  # where scikit-learn's suit [0, 1]-scaled data badly

    @property
    def smooth(self) -> bool:
        """Whether clients run L-BFGS on the summed objective (else scikit-learn's coordinate descent)."""
        return self.estimator not in (Lasso, ElasticNet)


LBFGS = "L-BFGS from the global weights on scikit-learn's objective (+ FedProx term)"
WARM_CD = "scikit-learn coordinate descent with warm_start from the global weights"
KINDS = {
    "logistic": Kind(LogisticRegression, False, ("C",), LBFGS, {"max_iter": 1000}),
    "svm": Kind(LinearSVC, False, ("C",), LBFGS, {"max_iter": 10_000}),
    "linear": Kind(LinearRegression, True, (), LBFGS),
    "ridge": Kind(Ridge, True, ("alpha",), LBFGS),
    "lasso": Kind(Lasso, True, ("alpha",), WARM_CD, {"alpha": 1e-4, "max_iter": 10_000}),
    "elasticnet": Kind(ElasticNet, True, ("alpha", "l1_ratio"), WARM_CD, {"alpha": 1e-4, "max_iter": 10_000}),
}


def kind_of(name: str) -> Kind:
    """The model kind called `name`, or a clear error."""
    if name not in KINDS:
        raise FedfheError(f"unknown model {name!r}; choose one of: {', '.join(KINDS)}")
    return KINDS[name]


def resolve_params(model: str, params: dict[str, Any]) -> dict[str, Any]:
    """Every parameter of the model's estimator: fedfhe's defaults, then the user's, validated by scikit-learn."""
    kind = kind_of(model)
    check_names(kind, params)
    estimator = kind.estimator(**{**kind.defaults, **params})
    try:
        estimator._validate_params()  # scikit-learn's own checks of types and ranges
    except ValueError as exc:
        raise FedfheError(f"--param: {exc}") from None
    return estimator.get_params()


def check_names(kind: Kind, params: dict[str, Any]) -> None:
    """Refuse parameter names the estimator does not have, listing the ones it has."""
    valid = kind.estimator().get_params()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise FedfheError(
            f"unknown parameter {unknown[0]!r} for {kind.estimator.__name__}; valid: {', '.join(sorted(valid))}"
        )


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """NAME=VALUE strings to a dict; values are JSON (numbers, true/false, null) or plain strings."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise FedfheError(f"--param must look like NAME=VALUE (got {pair!r})")
        words = {"None": None, "True": True, "False": False}
        try:
            value = words[text] if text in words else json.loads(text)
        except ValueError:
            value = text
        params[name.strip()] = value
    return params


@dataclass(frozen=True)
class Problem:
    """What every party agrees on before training: model kind, classes, feature and target ranges."""

    model: str
    classes: np.ndarray
    input_range: Range
    target_range: tuple[float, float] | None = None

    @property
    def kind(self) -> Kind:
        """The model kind."""
        return kind_of(self.model)

    @property
    def n_outputs(self) -> int:
        """Weight rows: class scores (multinomial logistic keeps two for binary), one per regressor or binary SVM."""
        if self.kind.regression or (self.model == "svm" and len(self.classes) == 2):
            return 1
        return len(self.classes)

    def initial_params(self) -> Params:
        """Zero weights: the common starting point of every client."""
        return [np.zeros((self.n_outputs, len(self.input_range[0]))), np.zeros(self.n_outputs)]

    def scale(self, X: np.ndarray) -> np.ndarray:
        """Map each feature's declared range to [0, 1]; a fixed map needs no statistics from anyone's data."""
        low, high = self.input_range
        return (X - low) / (high - low)

    def scale_target(self, y: np.ndarray) -> np.ndarray:
        """Regression targets mapped from their declared range to [0, 1]; class labels unchanged."""
        if self.target_range is None:
            return y
        low, high = self.target_range
        return (y - low) / (high - low)

    def unscale_target(self, predicted: np.ndarray) -> np.ndarray:
        """Predictions made on [0, 1]-scaled targets, back in target units (classes unchanged)."""
        if self.target_range is None:
            return predicted
        low, high = self.target_range
        return low + (high - low) * np.ravel(predicted)

    def unscale(self, params: Params) -> Params:
        """Fold both scalings into the weights so the exported model takes raw features, returns raw targets."""
        low, high = self.input_range
        coef, intercept = params[0] / (high - low), np.array(params[1], dtype=np.float64)
        intercept = intercept - coef @ low
        if self.target_range is not None:
            t_low, t_high = self.target_range
            coef, intercept = coef * (t_high - t_low), intercept * (t_high - t_low) + t_low
        return [coef, intercept]

    def to_config(self) -> dict[str, Any]:
        """The problem as config values every Flower layout carries (scalars and strings only)."""
        return {
            "model": self.model,
            "classes": ",".join(str(int(c)) for c in self.classes),
            "input-low": ",".join(repr(float(v)) for v in self.input_range[0]),
            "input-high": ",".join(repr(float(v)) for v in self.input_range[1]),
            "target-range": "" if self.target_range is None else ",".join(map(repr, self.target_range)),
        }

    @classmethod
    def from_config(cls, config: Any) -> Problem:
        """The problem as a client reads it from the server's config."""

        def floats(key: str) -> list[float]:
            return [float(v) for v in str(config[key]).split(",") if v]

        target = floats("target-range")
        return cls(
            model=str(config["model"]),
            classes=np.array([int(c) for c in str(config["classes"]).split(",") if c], dtype=np.int64),
            input_range=(np.array(floats("input-low")), np.array(floats("input-high"))),
            target_range=(target[0], target[1]) if target else None,
        )


def shared_range(X: np.ndarray) -> Range:
    """A data owner's per-feature min and max, rounded outward to two significant digits.

    This is all an owner reveals to fix the circuit's input ranges: never a row, and the rounding
    hides the exact extreme values.
    """

    def outward(values: np.ndarray, direction: Any) -> np.ndarray:
        magnitude = 10.0 ** (np.floor(np.log10(np.where(values == 0, 1.0, np.abs(values)))) - 1)
        return direction(values / magnitude) * magnitude

    low, high = outward(X.min(axis=0), np.floor), outward(X.max(axis=0), np.ceil)
    return low, np.where(high > low, high, low + np.maximum(np.abs(low), 1.0) * 0.01)


def merge_ranges(ranges: list[Range]) -> Range:
    """The smallest per-feature box holding every party's range."""
    return np.min([r[0] for r in ranges], axis=0), np.max([r[1] for r in ranges], axis=0)


def estimator(model: str, params: Params, classes: np.ndarray) -> Any:
    """A fitted scikit-learn estimator of this kind holding the given weights."""
    coef, intercept = np.array(params[0], dtype=np.float64), np.array(params[1], dtype=np.float64)
    kind = kind_of(model)
    fitted = kind.estimator()
    if kind.regression:
        fitted.coef_, fitted.intercept_ = coef[0], float(intercept[0])
    else:
        if len(classes) == 2 and len(coef) == 2:  # scikit-learn keeps one row for two classes
            coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
        fitted.coef_, fitted.intercept_ = coef, intercept
        fitted.classes_ = np.asarray(classes)
    fitted.n_features_in_ = coef.shape[1]
    return fitted


def fit(
    problem: Problem,
    params: Params,
    X: np.ndarray,
    y: np.ndarray,
    hyper: dict[str, float],
    iterations: int,
    mu: float = 0.0,
) -> Params:
    """Train from `params` on local data (X scaled, y scaled targets or labels); returns the new weights."""
    if problem.kind.smooth:
        return _lbfgs(problem, params, X, y, hyper, iterations, mu)
    local = problem.kind.estimator(**hyper, warm_start=True, max_iter=iterations)
    local.coef_ = np.array(params[0][0], dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        local.fit(X, y)
    return [local.coef_[None, :], np.array([local.intercept_], dtype=np.float64)]


def _lbfgs(
    problem: Problem, params: Params, X: np.ndarray, y: np.ndarray, hyper: dict[str, float], iterations: int, mu: float
) -> Params:
    """L-BFGS on weight * sum(loss) + strength * ||W||^2 / 2 (intercept not penalised) + FedProx's term.

    Classifiers use scikit-learn's C * sum(loss) + ||W||^2 / 2 (multinomial log-loss, or LinearSVC's
    one-vs-rest squared hinge); regressors half of Ridge's ||y - Xw||^2 + alpha ||w||^2. FedProx adds
    mu/2 * weight * n * ||theta - start||^2 (mu relative to the mean loss, as in the paper), which
    scikit-learn cannot, hence scipy. Every class keeps its row even when a client has no sample of it.
    """
    start = np.concatenate([params[0].ravel(), params[1]])
    n_out, n_features = params[0].shape
    weight, strength = (hyper["C"], 1.0) if not problem.kind.regression else (1.0, hyper.get("alpha", 0.0))
    prox = mu * weight * len(y)
    target = _targets(problem, y)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        W, b = theta[:-n_out].reshape(n_out, n_features), theta[-n_out:]
        loss, dZ = _loss(problem.model, X @ W.T + b, target)
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


def _loss(model: str, Z: np.ndarray, T: np.ndarray) -> tuple[float, np.ndarray]:
    """Summed loss of scores Z against targets T, and its gradient in Z."""
    if model == "logistic":
        lse = logsumexp(Z, axis=1)
        return float(np.sum(lse - np.sum(Z * T, axis=1))), np.exp(Z - lse[:, None]) - T
    if model == "svm":
        signs = 2 * T - 1
        margin = np.maximum(0.0, 1 - signs * Z)
        return float(np.sum(margin**2)), -2 * signs * margin
    residual = Z - T
    return 0.5 * float(np.sum(residual**2)), residual


def evaluate(problem: Problem, params: Params, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Score and loss on (X scaled, y raw): accuracy and log-loss or hinge, or R2 and MSE in target units."""
    fitted = estimator(problem.model, params, problem.classes)
    if problem.kind.regression:
        pred = problem.unscale_target(fitted.predict(X))
        return score(True, y, pred), float(mean_squared_error(y, pred))
    if problem.model == "svm":
        decision = fitted.decision_function(X)
        return score(False, y, fitted.predict(X)), float(hinge_loss(y, decision, labels=problem.classes))
    proba = fitted.predict_proba(X)
    return score(False, y, fitted.classes_[proba.argmax(axis=1)]), float(log_loss(y, proba, labels=problem.classes))


def score(regression: bool, y: np.ndarray, predicted: np.ndarray) -> float:
    """Accuracy of predicted classes, or R2 of predicted values (the first of score_names)."""
    return float(r2_score(y, predicted)) if regression else float(np.mean(predicted == y))


def score_names(model: str) -> tuple[str, str]:
    """What evaluate's two numbers are, for tables and plots."""
    if kind_of(model).regression:
        return "r2", "mse"
    return "accuracy", "hinge loss" if model == "svm" else "log-loss"


def client_hyper(model: str, params: dict[str, Any], clients: int) -> dict[str, float]:
    """Each client's share of the regularisation, so the clients' objectives add up to the central one.

    Summed objectives (L-BFGS kinds) split the penalty across clients; Lasso and ElasticNet average
    their loss over samples, so every client keeps the same alpha.
    """
    kind = kind_of(model)
    resolved = resolve_params(model, params)
    hyper = {name: float(resolved[name]) for name in kind.federated}
    if kind.smooth and "C" in hyper:
        hyper["C"] *= clients
    if kind.smooth and "alpha" in hyper:
        hyper["alpha"] /= clients
    return hyper


STRATEGIES = ("fedavg", "fedprox", "fedmedian", "krum", "trimmed-mean")
INPUT_RANGES = ("schema", "clients")  # the data set's declared ranges, or the owners' shared min/max


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
    model: str = "logistic"
    params: dict[str, Any] = field(default_factory=dict)
    engine: str = "sklearn"
    input_ranges: str = "schema"
    strategy: str = "fedavg"
    proximal_mu: float = 0.1
    min_clients: int = 1
    round_timeout: float = 600.0
    secagg: bool = False
    secagg_shares: float = 0.5
    secagg_threshold: float = 0.6
    secagg_clipping_range: float = 16.0
    secagg_quantization_range: int = 2**22
    secagg_max_weight: float = 10_000.0
    dp: bool = False
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    target_delta: float = 1e-5

    @property
    def sampled(self) -> int:
        """Clients sampled for training in each round."""
        return max(int(self.clients * self.fraction), 1)

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
        kind = kind_of(self.model)
        check_names(kind, self.params)
        central_only = sorted(set(self.params) - set(kind.federated))
        if self.clients > 1 and central_only:
            honoured = ", ".join(kind.federated) or "none"
            raise FedfheError(
                f"--param {central_only[0]} applies to centralized training (--clients 1) only; "
                f"federated {self.model} uses: {honoured}"
            )
        resolve_params(self.model, self.params)
        if self.input_ranges not in INPUT_RANGES:
            raise FedfheError(f"unknown input ranges {self.input_ranges!r}; choose one of: {', '.join(INPUT_RANGES)}")
        if self.engine not in ("sklearn", "concrete"):
            raise FedfheError(f"unknown engine {self.engine!r}; choose sklearn or concrete")
        if self.engine == "concrete" and self.clients != 1:
            raise FedfheError("--engine concrete fits Concrete ML's estimator on one machine: use --clients 1")
        if self.strategy not in STRATEGIES:
            raise FedfheError(f"unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        if self.strategy == "fedprox" and not kind.smooth:
            raise FedfheError(f"fedprox needs an L-BFGS model (not {self.model}, trained by coordinate descent)")
        if not 1 <= self.min_clients <= self.sampled:
            raise FedfheError(f"--min-clients must be between 1 and the {self.sampled} clients sampled per round")
        if self.secagg and (self.strategy not in ("fedavg", "fedprox") or self.sampled < 3):
            raise FedfheError("--secagg needs fedavg or fedprox and at least 3 clients per round")
        if self.dp and (self.noise_multiplier < 0 or self.clipping_norm <= 0 or not 0 < self.target_delta < 1):
            raise FedfheError("--dp needs --noise-multiplier >= 0, --clipping-norm > 0 and 0 < --target-delta < 1")
        if self.dp and self.strategy not in ("fedavg", "fedprox"):
            raise FedfheError("--dp works with fedavg or fedprox (its noise assumes an average of clipped updates)")
