"""The server's aggregation: Flower's Message API strategies, seeded, guarded and logged per round."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedfhe.config import TrainConfig
from fedfhe.errors import FedfheError

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

    def record_clients(self, server_round: int, metrics: dict[str, Any]) -> None:
        """Split aggregated client metrics (see per_client_metrics) into mean and per-client rows."""
        row = self.row(server_round)
        row["clients_mean"] = {"score": metrics["score"], "loss": metrics["loss"]}
        row["clients"] = [
            {"client": c, "score": a, "loss": l}
            for c, a, l in zip(metrics["clients"], metrics["client-score"], metrics["client-loss"])
        ]


def per_client_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means across clients, plus each client's own score and loss as lists."""
    merged = aggregate_metricrecords(records, weight_key)
    del merged["client"]
    metrics: list[Any] = [r["metrics"] for r in records]
    rows = sorted((m["client"], m["score"], m["loss"]) for m in metrics)
    merged["clients"] = [int(row[0]) for row in rows]
    merged["client-score"] = [float(row[1]) for row in rows]
    merged["client-loss"] = [float(row[2]) for row in rows]
    return merged


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, what: str) -> list[int]:
    """The connected nodes once at least `wanted` are there, or a clear error after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise FedfheError(f"{what}: only {len(nodes)} of {wanted} clients connected")
        time.sleep(0.05)
    return nodes


class Guarded(Strategy):
    """Wraps a strategy: seeded sampling, fixed reply order, failures counted, a minimum enforced."""

    def __init__(self, inner: Strategy, config: TrainConfig, log: RoundLog, offset: int) -> None:
        self.inner, self.config, self.log, self.offset = inner, config, log, offset
        self.sampled = 0

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Wait for the nodes, then sample with a seed of (seed, round).

        FedAvg sizes its sample from the nodes connected at that moment, so the first round waits
        for every node (sampling earlier would silently train on fewer); later rounds go on with
        whoever is still connected, if at least --min-clients are.
        """
        wanted = self.config.clients if server_round == 1 else self.config.min_clients
        wait_for_nodes(grid, wanted, self.config.round_timeout, f"round {server_round + self.offset}")
        random.seed(f"{self.config.seed}/{server_round + self.offset}")
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.sampled = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop failed replies (counted), require --min-clients, aggregate in content-hash order."""
        ok = sorted((m for m in replies if not m.has_error()), key=lambda m: m.content["arrays"].object_id)
        absolute = server_round + self.offset
        row = self.log.row(absolute)
        row["failures"] = self.sampled - len(ok)
        if len(ok) < self.config.min_clients:
            raise FedfheError(
                f"round {absolute}: only {len(ok)} of {self.sampled} clients returned an update "
                f"(--min-clients {self.config.min_clients})"
            )
        arrays, metrics = self.inner.aggregate_train(server_round, ok)
        if metrics is not None:
            row["train"] = dict(metrics)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As the wrapped strategy."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate failed-free replies and keep the per-client figures."""
        metrics = self.inner.aggregate_evaluate(server_round, [m for m in replies if not m.has_error()])
        if metrics is not None:
            self.log.record_clients(server_round + self.offset, dict(metrics))
        return metrics


def make_strategy(config: TrainConfig) -> Strategy:
    """The Message API strategy named by --strategy, wrapped for DP when asked."""
    common: dict[str, Any] = {
        "fraction_train": config.fraction,
        "fraction_evaluate": 1.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": config.min_clients,  # Guarded waits for every node before round 1
        "weighted_by_key": WEIGHT,
        "evaluate_metrics_aggr_fn": per_client_metrics,
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
    if config.dp:
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy, config.noise_multiplier, config.clipping_norm, config.sampled
        )
    return strategy
