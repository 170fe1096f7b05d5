"""The server's aggregation: Flower's Message API strategies, seeded, guarded and logged per round."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

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


class Guarded(Strategy):
    """Wraps a strategy: seeded sampling, fixed reply order, failures counted, a minimum enforced."""

    def __init__(self, inner: Strategy, config: TrainConfig, log: RoundLog, offset: int) -> None:
        self.inner, self.config, self.log, self.offset = inner, config, log, offset
        self.sampled, self.started = 0, time.monotonic()

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
        self.sampled, self.started = len(messages), time.monotonic()
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop failed replies (counted), require --min-clients, aggregate in content-hash order.

        Each reply also scored the global model it received: the previous round's clients row.
        """
        arrived = time.monotonic()
        ok = sorted((m for m in replies if not m.has_error()), key=lambda m: m.content["arrays"].object_id)
        absolute = server_round + self.offset
        row = self.log.row(absolute)
        row["failures"] = self.sampled - len(ok)
        if len(ok) < self.config.min_clients:
            raise FedfheError(
                f"round {absolute}: only {len(ok)} of {self.sampled} clients returned an update "
                f"(--min-clients {self.config.min_clients})"
            )
        reports: list[dict[str, Any]] = [dict(m.content.metric_records["metrics"]) for m in ok]
        if not self.config.evaluate_every_round:
            self.log.record_clients(absolute - 1, reports)
        arrays, metrics = self.inner.aggregate_train(server_round, ok)
        if metrics is not None:
            row["train"] = {key: metrics[key] for key in ("train-score", "train-loss")}
        row["timing"] = {  # where a round's time goes: a node's fresh process, its training, the rest is waiting
            "round_s": time.monotonic() - self.started,
            "aggregate_s": time.monotonic() - arrived,
            "client_process_s": sum(float(r["process-seconds"]) for r in reports) / len(reports),
            "client_train_s": sum(float(r["train-seconds"]) for r in reports) / len(reports),
        }
        return arrays, metrics

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


def make_strategy(config: TrainConfig) -> Strategy:
    """The Message API strategy named by --strategy, wrapped for DP when asked."""
    common: dict[str, Any] = {
        "fraction_train": config.fraction,
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
    if config.dp:
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy, config.noise_multiplier, config.clipping_norm, config.sampled
        )
    return strategy


def evaluate_everyone(grid: Grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float) -> list[dict[str, Any]]:
    """Every connected client's score and loss of the final model, in one evaluate message each."""
    content = RecordDict({"arrays": arrays, "config": config})
    messages = [Message(content, dst_node_id=node, message_type=MessageType.EVALUATE) for node in grid.get_node_ids()]
    replies = grid.send_and_receive(messages, timeout=timeout)
    return [dict(m.content.metric_records["metrics"]) for m in replies if not m.has_error()]
