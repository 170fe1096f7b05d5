"""The server's aggregation: Flower's Message API strategies, seeded, guarded and logged per round."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import Strategy as LegacyStrategy  # loaded with flwr.serverapp anyway
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

from fedfhe.config import TrainConfig
from fedfhe.errors import FedfheError
from fedfhe.federated.privacy import epsilon
from fedfhe.kinds import Params

WEIGHT = "weight"  # the metric FedAvg weighs client updates by


@dataclass
class RoundLog:
    """Per-round metrics, filled in while the strategy runs and saved with every checkpoint."""

    rows: dict[int, dict[str, Any]] = field(default_factory=dict)

    def row(self, server_round: int) -> dict[str, Any]:
        """The record of one round, created on first use."""
        return self.rows.setdefault(server_round, {"round": server_round})

    def ordered(self) -> list[dict[str, Any]]:
        """Every round's record, first round first."""
        return [self.rows[r] for r in sorted(self.rows)]

    def record_clients(self, server_round: int, replies: list[dict[str, Any]]) -> None:
        """Each client's score and loss of one round's global model, and their mean weighted by the client's examples."""
        if not replies:
            return
        row = self.row(server_round)
        weights = [float(r.get("examples", r[WEIGHT])) for r in replies]
        row["clients_mean"] = {
            key: sum(w * float(r[key]) for w, r in zip(weights, replies)) / (sum(weights) or 1)
            for key in ("score", "loss")
        }
        row["clients"] = sorted(
            (
                {"client": int(r["client"]), "score": float(r["score"]), "loss": float(r["loss"]), "examples": int(w)}
                for r, w in zip(replies, weights)
            ),
            key=lambda c: c["client"],
        )


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, what: str) -> list[int]:
    """The connected nodes once at least `wanted` are there, or a clear error after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise FedfheError(f"{what}: only {len(nodes)} of {wanted} clients connected")
        time.sleep(0.05)
    return nodes


class ServerStep:
    """The server optimizer: a step along the aggregate update, applied after aggregation (and DP noise).

    The rules are those of Reddi et al.'s FedOpt family (sgd with momentum = FedAvgM, adam, yogi). Flower's
    FedAvgM/FedAdam/FedYogi take the step inside FedAvg, before a DP wrapper adds its noise, so later
    rounds would reuse un-noised updates; here the step is post-processing of the private aggregate,
    and it follows robust aggregation too. Its state is checkpointed: a resumed run continues it.
    """

    BETA1, BETA2, TAU = 0.9, 0.99, 1e-3  # adam and yogi: first and second moment decay, and the denominator floor

    def __init__(self, config: TrainConfig, state: dict[str, np.ndarray]) -> None:
        """`state` is the run's server state, updated in place: each checkpoint saves it as it stands."""
        self.rule, self.lr, self.momentum = config.server_optimizer, config.lr, config.momentum
        self.state = state

    def __call__(self, current: Params, aggregate: Params) -> Params:
        """The next global weights from the current ones and the round's aggregate."""
        if self.rule == "sgd" and self.lr == 1 and not self.momentum:
            return aggregate  # FedAvg: the aggregate itself, bit for bit
        x, delta = _flat(current), _flat(aggregate) - _flat(current)
        if self.rule == "sgd":
            velocity = self.state.get("velocity")
            self.state["velocity"] = delta if velocity is None else self.momentum * velocity + delta
            return _shaped(x + self.lr * self.state["velocity"], current)
        first = self.BETA1 * self.state.get("first", 0.0) + (1 - self.BETA1) * delta
        second, squared = self.state.get("second", np.zeros_like(x)), delta * delta
        if self.rule == "adam":
            second = self.BETA2 * second + (1 - self.BETA2) * squared
        else:  # yogi: the second moment moves by a bounded amount, in the direction of the new one
            second = second - (1 - self.BETA2) * squared * np.sign(second - squared)
        self.state.update(first=first, second=second)
        return _shaped(x + self.lr * first / (np.sqrt(second) + self.TAU), current)


def finite_or_stop(params: Params, server_round: int) -> Params:
    """The round's new weights, or a one-line stop: a model that is not finite would poison every later round."""
    if not all(np.isfinite(np.asarray(p, dtype=np.float64)).all() for p in params):
        raise FedfheError(
            f"round {server_round}: the aggregated model is not finite (an overflow in aggregation or in the "
            "server step); the run stops here, its last checkpoint is the round before"
        )
    return params


def _finite(reply: Message) -> bool:
    """Whether a reply's update and metrics are all finite numbers (one NaN would make every median NaN)."""
    arrays = reply.content.array_records.get("arrays")
    updates = [] if arrays is None else arrays.to_numpy_ndarrays()
    metrics = [v for record in reply.content.metric_records.values() for v in record.values()]
    numbers = [np.asarray(v, dtype=np.float64) for v in metrics if isinstance(v, int | float | list)]
    return all(np.isfinite(u).all() for u in updates) and all(np.isfinite(n).all() for n in numbers)


def _sender(reply: Message) -> int | None:
    """The client a reply says it is from (its metrics' "client"), if it says so in a usable way."""
    metrics = reply.content.metric_records.get("metrics")
    value = None if metrics is None else metrics.get("client")
    return int(value) if isinstance(value, int | float) and np.isfinite(value) else None


def _flat(params: Params) -> np.ndarray:
    """All weights as one vector."""
    return np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in params])


def _shaped(flat: np.ndarray, like: Params) -> Params:
    """A vector cut back into arrays shaped like `like`."""
    sizes = np.cumsum([np.size(p) for p in like])[:-1]
    return [part.reshape(np.shape(p)) for part, p in zip(np.split(flat, sizes), like)]


class LegacyStepped(LegacyStrategy):
    """A legacy strategy (SecAgg+'s workflow) with the server step after its aggregation and DP noise."""

    def __init__(self, inner: LegacyStrategy, step: ServerStep) -> None:
        self.inner, self.step = inner, step
        self.current: Params | None = None

    def initialize_parameters(self, client_manager: Any) -> Any:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        self.current = parameters_to_ndarrays(parameters)
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        aggregate, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if aggregate is not None and self.current is not None:
            stepped = self.step(self.current, parameters_to_ndarrays(aggregate))
            aggregate = ndarrays_to_parameters(finite_or_stop(stepped, server_round))
        return aggregate, metrics

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Any) -> Any:
        return self.inner.evaluate(server_round, parameters)


class AdaptiveClipping(DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping, with the quantile estimate of Andrew et al. (2021).

    The norm tracks the --clip-quantile of update norms: it grows while fewer updates than that fit
    under it. Flower 1.42 counts the clipped updates instead, which shrinks the norm while most are
    clipped (towards zero: docs/many-clients.md). And the fraction is over the expected number of
    clients q N, fixed as the accounting assumes, not over the replies Poisson sampling happened to draw.
    """

    def _noisy_fraction(self, count: int, total: int) -> float:
        """The noised fraction of the expected clients whose update was not clipped."""
        return float(np.random.normal(total - count, self.clipped_count_stddev)) / self.num_sampled_clients


class Guarded(Strategy):
    """Wraps a strategy: seeded sampling, fixed reply order, failures counted, a minimum enforced."""

    def __init__(
        self, inner: Strategy, config: TrainConfig, log: RoundLog, offset: int, step: ServerStep, noise: float
    ) -> None:
        self.inner, self.config, self.log, self.offset, self.step, self.noise = inner, config, log, offset, step, noise
        self.sampled, self.started, self.current = 0, time.monotonic(), ArrayRecord()
        self.rng = np.random.default_rng([config.seed, offset])  # Poisson sampling, continued by a resumed run

    @property
    def private(self) -> DifferentialPrivacyClientSideFixedClipping | AdaptiveClipping | None:
        """The DP wrapper, if the run is private."""
        private = (DifferentialPrivacyClientSideFixedClipping, AdaptiveClipping)
        return self.inner if isinstance(self.inner, private) else None

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Wait for the nodes, then sample with a seed of (seed, round); the round's clock starts.

        FedAvg sizes its sample from the nodes connected at that moment, so the first round waits
        for every node (sampling earlier would silently train on fewer); later rounds go on with
        whoever is still connected, if at least --min-clients are.
        """
        wanted = self.config.clients if server_round == 1 else self.config.min_clients
        wait_for_nodes(grid, wanted, self.config.round_timeout, f"round {server_round + self.offset}")
        random.seed(f"{self.config.seed}/{server_round + self.offset}")
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if self.config.poisson:  # the inner strategy addressed every node: each joins with probability q
            messages = [m for m in messages if self.rng.random() < self.config.fraction]
        if self.private is not None:
            self.log.row(server_round + self.offset)["privacy"] = {"clipping_norm": self.private.clipping_norm}
        self.sampled, self.started, self.current = len(messages), time.monotonic(), arrays
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop failed replies and non-finite ones (counted, the latter named), require --min-clients,
        aggregate in content-hash order; an aggregate that is not finite stops the run at this round.

        Each reply also scored the global model it received: the previous round's clients row.
        """
        arrived = time.monotonic()
        ok: list[Message] = []
        poisoned: list[Message] = []
        for m in replies:
            if not m.has_error():
                (ok if _finite(m) else poisoned).append(m)
        ok.sort(key=lambda m: m.content["arrays"].object_id)
        absolute = server_round + self.offset
        row = self.log.row(absolute)
        row["failures"], row["sampled"] = self.sampled - len(ok), self.sampled
        if poisoned:
            row["dropped"] = [{"client": _sender(m), "reason": "non-finite update or metrics"} for m in poisoned]
        if len(ok) < min(self.config.min_clients, self.sampled):
            raise FedfheError(
                f"round {absolute}: only {len(ok)} of {self.sampled} clients returned an update "
                f"(--min-clients {self.config.min_clients})"
            )
        reports: list[dict[str, Any]] = [dict(m.content.metric_records["metrics"]) for m in ok]
        if not self.config.evaluate_every_round:
            self.log.record_clients(absolute - 1, reports)
        if self.config.poisson:
            self._fix_denominator(ok)
        arrays, metrics = self.inner.aggregate_train(server_round, ok)
        if self.private is not None:
            arrays = arrays if ok else self._noise_only()
            row["privacy"]["epsilon"] = epsilon(self.config, self.noise, absolute)
        if arrays is not None:
            current = self.current.to_numpy_ndarrays()
            arrays = ArrayRecord(finite_or_stop(self.step(current, arrays.to_numpy_ndarrays()), absolute))
        if metrics is not None:
            row["train"] = {key: metrics[key] for key in ("train-score", "train-loss")}
        row["timing"] = {  # where a round's time goes: a node's fresh process, its training, the rest is waiting
            "round_s": time.monotonic() - self.started,
            "aggregate_s": time.monotonic() - arrived,
            "client_process_s": sum(float(r["process-seconds"]) for r in reports) / max(len(reports), 1),
            "client_train_s": sum(float(r["train-seconds"]) for r in reports) / max(len(reports), 1),
        }
        return arrays, metrics

    def _fix_denominator(self, replies: list[Message]) -> None:
        """Scale each update by k / (q N): the mean of the k replies becomes their sum over the expected count.

        The accountant's Poisson analysis bounds one client's effect on that sum (C / qN); a mean over
        however many clients happened to join would not have that bound.
        """
        current = _flat(self.current.to_numpy_ndarrays())
        scale = len(replies) / self.config.expected
        for m in replies:
            params = m.content.array_records["arrays"].to_numpy_ndarrays()
            scaled = current + (_flat(params) - current) * scale
            m.content.array_records["arrays"] = ArrayRecord(_shaped(scaled, params))

    def _noise_only(self) -> ArrayRecord:
        """A round no client joined still releases the global weights plus the noise (the mechanism analysed)."""
        assert self.private is not None
        params = self.current.to_numpy_ndarrays()
        dp = self.private
        add_gaussian_noise_inplace(params, compute_stdv(dp.noise_multiplier, dp.clipping_norm, dp.num_sampled_clients))
        return ArrayRecord(params)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As the wrapped strategy."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate failed-free replies and keep the per-client figures."""
        ok = [m for m in replies if not m.has_error()]
        self.log.record_clients(server_round + self.offset, [dict(m.content.metric_records["metrics"]) for m in ok])
        return self.inner.aggregate_evaluate(server_round, ok)


def make_strategy(config: TrainConfig, noise: float) -> Strategy:
    """The Message API strategy named by --strategy, wrapped for DP when asked (Guarded samples DP rounds)."""
    common: dict[str, Any] = {
        "fraction_train": 1.0 if config.poisson else config.fraction,
        "fraction_evaluate": 1.0 if config.evaluate_every_round else 0.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": config.min_clients,  # Guarded waits for every node before round 1
        "weighted_by_key": WEIGHT,
    }
    strategy: Strategy
    if config.strategy in ("fedavg", "fedprox"):  # FedProx = FedAvg + the proximal term on the clients
        strategy = FedAvg(**common)
    elif config.strategy == "fedmedian":
        strategy = FedMedian(**common)
    elif config.strategy == "krum":
        strategy = Krum(**common, num_malicious_nodes=max((config.sampled - 3) // 2, 0))
    else:
        strategy = FedTrimmedAvg(**common, beta=0.2)
    if not config.dp:
        return strategy
    expected: Any = config.expected  # Flower types it int; the noise is z C / (q N)
    if config.clipping == "fixed":
        return DifferentialPrivacyClientSideFixedClipping(strategy, noise, config.clipping_norm, expected)
    return AdaptiveClipping(
        strategy,
        noise,
        expected,
        initial_clipping_norm=config.clipping_norm,
        target_clipped_quantile=config.clip_quantile,
        clipped_count_stddev=max(expected / 20, noise),  # Andrew et al.'s m / 20; at least z, so the count costs little
    )


def evaluate_everyone(grid: Grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float) -> list[dict[str, Any]]:
    """Every connected client's score and loss of the final model, in one evaluate message each."""
    content = RecordDict({"arrays": arrays, "config": config})
    messages = [Message(content, dst_node_id=node, message_type=MessageType.EVALUATE) for node in grid.get_node_ids()]
    replies = grid.send_and_receive(messages, timeout=timeout)
    return [dict(m.content.metric_records["metrics"]) for m in replies if not m.has_error()]
