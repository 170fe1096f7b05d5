"""How a federation trains: the one place every training default and check lives.

The CLI builds its options from these fields, the Flower apps read them back from the run config,
and the model file records them; nothing below re-defaults or re-validates them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from fedfhe.data import Dataset, class_names
from fedfhe.errors import FedfheError, unknown
from fedfhe.kinds import KINDS, Kind, kind_of
from fedfhe.partition import SCHEMES, label_counts
from fedfhe.problem import Problem, balanced_weights

STRATEGIES = ("fedavg", "fedprox", "fedmedian", "krum", "trimmed-mean")
INPUT_RANGES = ("schema", "clients")  # the data set's declared ranges, or the owners' shared min/max
ENGINES = ("sklearn", "concrete")
SERVER_OPTIMIZERS = {"sgd": 1.0, "adam": 0.03, "yogi": 0.03}  # each optimizer's default --server-lr
CLIPPINGS = ("adaptive", "fixed")
RunConfig = dict[str, bool | int | float | str]
DATA, SECAGG, DP = "Data", "Secure aggregation", "Differential privacy"  # option panels in --help


def option(default: Any, help: str, panel: str = "Training", key: str | None = None) -> Any:
    """A config field with its CLI option's help and panel and, if not the field's name, its run-config key."""
    metadata = {"help": help, "panel": panel, **({"key": key} if key else {})}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


def _choices(names: Any) -> str:
    """Choices as a help text lists them."""
    return " | ".join(names)


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting, checked when the config is made: an invalid TrainConfig cannot exist."""

    clients: int = option(10, "Data owners (Flower clients); 1 trains centrally on one machine.")
    rounds: int = option(5, "Federated rounds.", key="num-server-rounds")
    local_iters: int | None = option(
        None,
        "Local optimiser iterations per client per round (default: the square root of the client's rows, 3 to 20).",
    )
    fraction: float = option(1.0, "Fraction of clients that train in each round (with --dp: each one's chance to).")
    partitioning: str = option("iid", f"How the data is split among clients: {_choices(SCHEMES)}.")
    alpha: float = option(0.5, "Dirichlet concentration (smaller = more label skew).")
    seed: int = option(0, "Seed of the split, the partitions and client sampling.")
    model: str = option("logistic", "logistic | svm (classifiers); linear | ridge | lasso | elasticnet (regressors).")
    params: dict[str, Any] = option({}, "Estimator parameter NAME=VALUE (repeatable), e.g. --param C=0.5.")
    class_weight: str | None = option(
        None,
        "Classifiers: each class's weight in every client's loss: balanced (n / (classes x count), from the owners' "
        "class counts) | CLASS=WEIGHT,... (classes as the data names them; others weigh 1)  [default: all weigh 1]",
    )
    engine: str = option("sklearn", f"{_choices(ENGINES)} (fit Concrete ML's own estimator; --clients 1).")
    input_ranges: str = option(
        "schema", "schema (the data set's declared ranges) | clients (owners share rounded min/max)."
    )
    allow_overlap: bool = option(
        False,
        "Train although rows of the --test file are in the owners' files (found by row hashes; refused otherwise): "
        "for other records that happen to have equal values.",
        DATA,
    )
    strategy: str = option("fedavg", f"Aggregation: {_choices(STRATEGIES)}.")
    proximal_mu: float = option(0.1, "FedProx proximal strength, relative to the mean loss.")
    server_optimizer: str = option(
        "sgd", f"How the server steps along the aggregate update: {_choices(SERVER_OPTIMIZERS)} (sgd at lr 1: FedAvg)."
    )
    server_lr: float | None = option(None, "Server learning rate (default: 1.0 for sgd, 0.03 for adam and yogi).")
    server_momentum: float | None = option(None, "Server momentum of --server-optimizer sgd (FedAvgM; default: 0).")
    min_clients: int = option(1, "Fewest successful clients a round accepts.")
    round_timeout: float = option(600.0, "Seconds to wait for the clients in a round.")
    evaluate_every_round: bool = option(
        False,
        "Send evaluate messages every round (by default a train reply carries the client's score of the model "
        "it received, and one evaluation follows the last round).",
    )
    secagg: bool = option(False, "SecAgg+: the server only learns the sum of updates.", SECAGG)
    secagg_shares: float = option(0.5, "SecAgg+ shares per client (a fraction of the clients if < 1).", SECAGG)
    secagg_threshold: float = option(0.6, "SecAgg+ shares needed to reconstruct (fraction if < 1).", SECAGG)
    secagg_clipping_range: float = option(16.0, "SecAgg+ clipping range of each weighted parameter.", SECAGG)
    secagg_quantization_range: int = option(2**22, "SecAgg+ quantization levels over the clipping range.", SECAGG)
    secagg_max_weight: float = option(10_000.0, "SecAgg+ bound on a client's sample count.", SECAGG)
    dp: bool = option(
        False, "Central DP: each client sampled with probability --fraction, its update clipped, noise on the sum.", DP
    )
    noise_multiplier: float | None = option(None, "DP noise standard deviation / clipping norm (default: 1.0).", DP)
    target_epsilon: float | None = option(
        None,
        "DP epsilon to reach after the last round: picks the noise multiplier (instead of --noise-multiplier).",
        DP,
    )
    clipping: str = option("adaptive", f"DP clipping: {_choices(CLIPPINGS)} (adaptive tracks a quantile of norms).", DP)
    clipping_norm: float = option(1.0, "DP bound on the L2 norm of a client's update (adaptive: where it starts).", DP)
    clip_quantile: float = option(0.5, "Adaptive clipping: the fraction of updates left unclipped.", DP)
    target_delta: float = option(1e-5, "DP delta at which epsilon is reported.", DP)

    def __post_init__(self) -> None:
        """Check types, then every rule that does not depend on the data."""
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _typed(f, getattr(self, f.name), f"--{f.name.replace('_', '-')}"))
        self._check()

    @property
    def kind(self) -> Kind:
        """The resolved model kind."""
        return KINDS[self.model]

    @property
    def sampled(self) -> int:
        """Clients sampled for training in each round."""
        return max(int(self.clients * self.fraction), 1)

    def _check(self) -> None:
        """Refuse settings that cannot run, naming the option."""
        if self.clients < 1:
            raise FedfheError(f"--clients must be at least 1 (got {self.clients})")
        if self.rounds < 1:
            raise FedfheError(f"--rounds must be at least 1 (got {self.rounds})")
        if self.local_iters is not None and self.local_iters < 1:
            raise FedfheError(f"--local-iters must be at least 1 (got {self.local_iters})")
        if not 0 < self.fraction <= 1:
            raise FedfheError(f"--fraction must be in (0, 1] (got {self.fraction})")
        if self.partitioning not in SCHEMES:
            raise unknown("partitioning", self.partitioning, SCHEMES)
        if not self.alpha > 0:
            raise FedfheError(f"--alpha must be > 0 (got {self.alpha})")
        if not 0 <= self.seed < 2**32:  # numpy's and the data sets' shuffles take 32-bit seeds
            raise FedfheError(f"--seed must be between 0 and 2**32 - 1 (got {self.seed})")
        kind = kind_of(self.model)
        kind.check_names(self.params)
        central_only = sorted(set(self.params) - set(kind.federated))
        if self.clients > 1 and central_only:
            honoured = ", ".join(kind.federated) or "none"
            hint = " (class weights: --class-weight)" if central_only[0] == "class_weight" else ""
            raise FedfheError(
                f"--param {central_only[0]} applies to centralized training (--clients 1) only; "
                f"federated {self.model} uses: {honoured}{hint}"
            )
        kind.resolve(self.params)
        if self.class_weight is not None:
            if kind.regression:
                raise FedfheError(f"--class-weight applies to classifiers, not {self.model}")
            if "class_weight" in self.params:
                raise FedfheError("give --class-weight or --param class_weight, not both")
            if self.class_weight != "balanced":
                parse_class_weight(self.class_weight)
        if self.input_ranges not in INPUT_RANGES:
            raise unknown("input ranges", self.input_ranges, INPUT_RANGES)
        if self.engine not in ENGINES:
            raise unknown("engine", self.engine, ENGINES)
        if self.engine == "concrete" and self.clients != 1:
            raise FedfheError("--engine concrete fits Concrete ML's estimator on one machine: use --clients 1")
        if self.strategy not in STRATEGIES:
            raise unknown("strategy", self.strategy, STRATEGIES)
        if self.strategy == "fedprox" and not kind.smooth:
            raise FedfheError(f"fedprox needs an L-BFGS model (not {self.model}, trained by coordinate descent)")
        if not self.proximal_mu >= 0:
            raise FedfheError(f"--proximal-mu must be >= 0 (got {self.proximal_mu})")
        if not 1 <= self.min_clients <= self.sampled:
            raise FedfheError(f"--min-clients must be between 1 and the {self.sampled} clients sampled per round")
        if not self.round_timeout > 0:
            raise FedfheError(f"--round-timeout must be > 0 seconds (got {self.round_timeout})")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise unknown("server optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        if self.server_lr is not None and not self.server_lr > 0:
            raise FedfheError(f"--server-lr must be > 0 (got {self.server_lr})")
        if self.server_momentum is not None and self.server_optimizer != "sgd":
            raise FedfheError(f"--server-momentum applies to --server-optimizer sgd, not {self.server_optimizer}")
        if self.server_momentum is not None and not 0 <= self.server_momentum < 1:
            raise FedfheError(f"--server-momentum must be in [0, 1) (got {self.server_momentum})")
        if self.secagg and (self.strategy not in ("fedavg", "fedprox") or self.sampled < 3):
            raise FedfheError("--secagg needs fedavg or fedprox and at least 3 clients per round")
        for name in ("secagg_shares", "secagg_threshold"):
            value = getattr(self, name)
            if not (0 < value < 1 or (value >= 1 and float(value).is_integer())):
                flag = "--" + name.replace("_", "-")
                raise FedfheError(f"{flag} must be a fraction in (0, 1) or a whole number of clients (got {value})")
        self._check_privacy()
        if self.dp and self.strategy not in ("fedavg", "fedprox"):
            raise FedfheError("--dp works with fedavg or fedprox (its noise assumes an average of clipped updates)")
        if self.dp and self.clients < 2:
            raise FedfheError("--dp protects each client of a federation: use --clients 2 or more")

    def _check_privacy(self) -> None:
        """Refuse DP settings that cannot hold their guarantee or cannot run."""
        dp_only = ("noise_multiplier", "target_epsilon")
        given = [f"--{name.replace('_', '-')}" for name in dp_only if getattr(self, name) is not None]
        if given and not self.dp:
            raise FedfheError(f"{given[0]} applies to DP training: add --dp")
        if len(given) == 2:
            raise FedfheError("give --noise-multiplier or --target-epsilon, not both")
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise FedfheError(f"--noise-multiplier must be >= 0 (got {self.noise_multiplier})")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise FedfheError(f"--target-epsilon must be > 0 (got {self.target_epsilon})")
        if self.clipping not in CLIPPINGS:
            raise unknown("clipping", self.clipping, CLIPPINGS)
        if self.dp and (not self.clipping_norm > 0 or not 0 < self.target_delta < 1 or not 0 < self.clip_quantile < 1):
            raise FedfheError("--dp needs --clipping-norm > 0, 0 < --clip-quantile < 1 and 0 < --target-delta < 1")
        if self.dp and self.secagg and self.clipping == "adaptive":
            raise FedfheError(
                "--secagg --dp needs --clipping fixed: adaptive clipping reports each client's clipped bit in the clear"
            )

    @property
    def lr(self) -> float:
        """The server learning rate, the optimizer's default unless given."""
        return SERVER_OPTIMIZERS[self.server_optimizer] if self.server_lr is None else self.server_lr

    @property
    def momentum(self) -> float:
        """The server momentum of sgd (adam and yogi keep moments of their own)."""
        return self.server_momentum or 0.0

    @property
    def expected(self) -> float:
        """Clients expected in a round, q N: the fixed denominator of DP's average."""
        return self.clients * self.fraction

    @property
    def poisson(self) -> bool:
        """Whether clients are sampled independently (DP without SecAgg+: what the accountant amplifies)."""
        return self.dp and not self.secagg

    def problem(self, dataset: Dataset) -> Problem:
        """The training problem on this data set, refusing what the data cannot support."""
        if dataset.owners and self.clients != len(dataset.owners):
            raise FedfheError(
                f"{dataset.name} holds {len(dataset.owners)} owner files, each one client: "
                f"--clients {self.clients} does not match (leave it out)"
            )
        if dataset.owners and self.partitioning != "iid":
            raise FedfheError(f"--partitioning {self.partitioning} does not apply: each owner's file is its partition")
        if len(dataset.y_train) and self.clients > len(dataset.y_train):  # a deployed server holds no training rows
            raise FedfheError(f"--clients {self.clients} is more than the {len(dataset.y_train)} training samples")
        if self.kind.regression != dataset.is_regression:
            fitting = [name for name, kind in KINDS.items() if kind.regression == dataset.is_regression]
            raise FedfheError(
                f"model {self.model} does not fit data set {dataset.name} "
                f"({'regression' if dataset.is_regression else 'classification'}); use one of: {', '.join(fitting)}"
            )
        if dataset.is_regression and self.clients > 1 and self.partitioning != "iid":
            raise FedfheError(f"{self.partitioning} partitioning skews class labels; {dataset.name} has none (use iid)")
        return Problem(
            self.kind, dataset.classes, dataset.input_range, dataset.target_range, self._class_weights(dataset)
        )

    def _class_weights(self, dataset: Dataset) -> np.ndarray | None:
        """The weights --class-weight gives this data set's classes; federated balanced ones come from ServerRun.agree."""
        if self.class_weight is None or (self.class_weight == "balanced" and self.clients > 1):
            return None
        if self.class_weight == "balanced":  # one owner: its own rows are the whole federation's
            everything = [np.arange(len(dataset.y_train))]
            return balanced_weights(label_counts(dataset.y_train, everything, dataset.classes)[0], dataset.classes)
        names, weights = class_names(dataset), np.ones(len(dataset.classes))
        for name, weight in parse_class_weight(self.class_weight).items():
            if name not in names:
                raise FedfheError(f"--class-weight: {dataset.name} has no class {name!r} (classes: {', '.join(names)})")
            weights[names.index(name)] = weight
        return weights

    def client_hyper(self) -> dict[str, float]:
        """Each client's share of the regularisation, so the clients' objectives add up to the central one.

        Summed objectives (L-BFGS kinds) split the penalty across clients; Lasso and ElasticNet average
        their loss over samples, so every client keeps the same alpha.
        """
        resolved = self.kind.resolve(self.params)
        hyper = {name: float(resolved[name]) for name in self.kind.federated}
        if self.kind.smooth and "C" in hyper:
            hyper["C"] *= self.clients
        if self.kind.smooth and "alpha" in hyper:
            hyper["alpha"] /= self.clients
        return hyper

    def to_run_config(self) -> RunConfig:
        """Every field as a Flower run-config entry (TOML scalars); `from_run_config` reads it back."""
        entries: RunConfig = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:  # TOML has no null, and Flower refuses keys its app config lacks: None is ""
                value = ""
            if f.name == "params":
                value = " ".join(shlex.quote(f"{k}={json.dumps(v)}") for k, v in sorted(value.items()))
            entries[run_config_key(f)] = value
        return entries

    @classmethod
    def setting(cls, run_config: dict[str, Any], name: str) -> Any:
        """One field's value in a run config, typed, without checking a whole config (a ClientApp asks per message)."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        key = run_config_key(f)
        return _typed(f, run_config[key], f"run config {key}") if key in run_config else f.default

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> TrainConfig:
        """The config a Flower run was started with; keys it lacks keep their defaults."""
        settings: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = run_config_key(f)
            if key not in run_config:
                continue
            value = run_config[key]
            if f.name == "params":
                try:
                    value = parse_params(shlex.split(str(value)))
                except ValueError as exc:
                    raise FedfheError(f"run config params: {exc}") from None
            settings[f.name] = _typed(f, value, f"run config {key}")
        return cls(**settings)


def run_config_key(f: dataclasses.Field) -> str:
    """The run-config key of a config field (its name with dashes, unless it declares one)."""
    return str(f.metadata.get("key", f.name.replace("_", "-")))


def _typed(f: dataclasses.Field, value: Any, name: str) -> Any:
    """The value as the field's type (an int for a float field is fine), or a one-line error."""
    types: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "bool": bool, "str": str}
    kind = str(f.type).removesuffix(" | None")
    if kind != str(f.type) and value in (None, ""):  # "": None in a run config
        return None
    expected = types.get(kind)
    if expected is None:  # params
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise FedfheError(f"{name} must map parameter names to values (got {value!r})")
        return dict(value)
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        raise FedfheError(f"{name} must be {kind} (got {value!r})")
    return float(cast(float, value)) if kind == "float" else value


def parse_class_weight(text: str) -> dict[str, float]:
    """--class-weight CLASS=WEIGHT,... as {class: weight}, each weight a positive number, or a one-line error."""
    weights: dict[str, float] = {}
    for pair in text.split(","):
        name, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not name:
            raise FedfheError(f"--class-weight must be balanced or CLASS=WEIGHT,... (got {text!r})")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise FedfheError(f"--class-weight {name}: the weight must be a positive number (got {value!r})")
        if name in weights:
            raise FedfheError(f"--class-weight names class {name!r} twice")
        weights[name] = weight
    return weights


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """NAME=VALUE strings to a dict; values are JSON (numbers, true/false, null) or plain strings."""
    params: dict[str, Any] = {}
    words = {"None": None, "True": True, "False": False}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise FedfheError(f"--param must look like NAME=VALUE (got {pair!r})")
        try:
            value = words[text] if text in words else json.loads(text)
        except ValueError:
            value = text
        params[name.strip()] = value
    return params
