"""Flower ServerApp: FedAvg over the clients, with a centralized evaluation after every round."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedfhe.federated import task

RoundCallback = Callable[[int, MetricRecord], None]


def per_client_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means across clients, plus each client's own accuracy and loss as lists."""
    merged = aggregate_metricrecords(records, weight_key)
    del merged["client"]
    rows = sorted((r["metrics"]["client"], r["metrics"]["accuracy"], r["metrics"]["loss"]) for r in records)
    merged["clients"] = [int(row[0]) for row in rows]
    merged["client-accuracy"] = [float(row[1]) for row in rows]
    merged["client-loss"] = [float(row[2]) for row in rows]
    return merged


class OrderedFedAvg(FedAvg):
    """FedAvg that sums the replies in a fixed order: the same seed gives the same model, bit for bit."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sort replies by content hash (arrival order varies), then average as FedAvg does."""
        ordered = sorted(replies, key=lambda m: "" if m.has_error() else m.content["arrays"].object_id)
        return super().aggregate_train(server_round, ordered)


def build_server_app(
    config: task.TrainConfig,
    X_test: np.ndarray,
    y_test: np.ndarray,
    classes: np.ndarray,
    input_range: tuple[float, float],
    results: list[Result],
    on_round: RoundCallback | None = None,
) -> ServerApp:
    """A ServerApp that runs FedAvg and appends its Result to `results`."""
    app = ServerApp()
    X_eval = task.scale(X_test, input_range)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """The server's held-out test set scores the global model after each round."""
        accuracy, loss = task.evaluate(arrays.to_numpy_ndarrays(), X_eval, y_test, classes)
        metrics = MetricRecord({"accuracy": accuracy, "loss": loss})
        if on_round is not None:
            on_round(server_round, metrics)
        return metrics

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        """Run the configured number of FedAvg rounds."""
        random.seed(config.seed)  # FedAvg samples clients with the `random` module
        strategy = OrderedFedAvg(
            fraction_train=config.fraction,
            fraction_evaluate=1.0,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=config.clients,
            evaluate_metrics_aggr_fn=per_client_metrics,
        )
        shared = {"input-low": input_range[0], "input-high": input_range[1], "classes": [int(c) for c in classes]}
        # C scales with the number of clients so the clients' objectives add up to the centralized one.
        train_config = ConfigRecord({**shared, "C": config.C * config.clients, "local-iters": config.local_iters})
        results.append(
            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(task.initial_params(X_test.shape[1], len(classes))),
                num_rounds=config.rounds,
                train_config=train_config,
                evaluate_config=ConfigRecord(shared),
                evaluate_fn=central_evaluate,
            )
        )

    return app
