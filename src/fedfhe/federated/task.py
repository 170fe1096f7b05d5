"""The model every client trains: multinomial logistic regression on features scaled to [0, 1]."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp
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
    """Zero weights, one row per class: the common starting point of every client."""
    return [np.zeros((n_classes, n_features)), np.zeros(n_classes)]


def classifier(params: Params, classes: np.ndarray) -> LogisticRegression:
    """A fitted scikit-learn classifier holding the given weights (binary: one row, as sklearn does)."""
    coef, intercept = np.array(params[0], dtype=np.float64), np.array(params[1], dtype=np.float64)
    if len(classes) == 2 and len(coef) == 2:
        coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
    model = LogisticRegression()
    model.coef_, model.intercept_ = coef, intercept
    model.classes_ = np.asarray(classes)
    model.n_features_in_ = coef.shape[1]
    return model


def fit(
    params: Params, X: np.ndarray, y: np.ndarray, classes: np.ndarray, C: float, iterations: int, mu: float = 0.0
) -> Params:
    """Run `iterations` L-BFGS iterations from `params` on local data; returns the new weights.

    The objective is scikit-learn's multinomial one, C * sum(log-loss) + ||W||^2 / 2 (intercept not
    penalised), plus FedProx's proximal term mu/2 * C * n * ||theta - start||^2 (mu relative to
    the mean loss, as in the FedProx paper). scikit-learn cannot add that term, hence scipy here.
    Every class keeps its row even when this client has no sample of it.
    """
    start = np.concatenate([params[0].ravel(), params[1]])
    n_classes, n_features = params[0].shape
    onehot = (y[:, None] == classes[None, :]).astype(np.float64)
    prox = mu * C * len(y)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        W, b = theta[:-n_classes].reshape(n_classes, n_features), theta[-n_classes:]
        z = X @ W.T + b
        lse = logsumexp(z, axis=1)
        G = C * (np.exp(z - lse[:, None]) - onehot)
        diff = theta - start
        value = C * float(np.sum(lse - np.sum(z * onehot, axis=1))) + 0.5 * float(np.sum(W * W))
        grad = np.concatenate([(G.T @ X + W).ravel(), G.sum(axis=0)]) + prox * diff
        return value + 0.5 * prox * float(diff @ diff), grad

    theta = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": iterations}).x
    return [theta[:-n_classes].reshape(n_classes, n_features), theta[-n_classes:]]


def evaluate(params: Params, X: np.ndarray, y: np.ndarray, classes: np.ndarray) -> tuple[float, float]:
    """Accuracy and log-loss of the weights on (X, y)."""
    model = classifier(params, classes)
    proba = model.predict_proba(X)
    accuracy = float(np.mean(model.classes_[proba.argmax(axis=1)] == y))
    return accuracy, float(log_loss(y, proba, labels=classes))


STRATEGIES = ("fedavg", "fedprox", "fedmedian", "krum", "trimmed-mean")


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
        if self.C <= 0:
            raise FedfheError(f"--C must be > 0 (got {self.C})")
        if self.strategy not in STRATEGIES:
            raise FedfheError(f"unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        if not 1 <= self.min_clients <= self.sampled:
            raise FedfheError(f"--min-clients must be between 1 and the {self.sampled} clients sampled per round")
        if self.secagg and (self.strategy not in ("fedavg", "fedprox") or self.sampled < 3):
            raise FedfheError("--secagg needs fedavg or fedprox and at least 3 clients per round")
        if self.dp and (self.noise_multiplier < 0 or self.clipping_norm <= 0 or not 0 < self.target_delta < 1):
            raise FedfheError("--dp needs --noise-multiplier >= 0, --clipping-norm > 0 and 0 < --target-delta < 1")
        if self.dp and self.strategy not in ("fedavg", "fedprox"):
            raise FedfheError("--dp works with fedavg or fedprox (its noise assumes an average of clipped updates)")
