"""Flower ClientApp: each data owner trains and evaluates on its own partition file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfhe.federated import task


def _local_data(msg: Message, context: Context, partition_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The owner's data scaled as the server asks, its labels, and the federation's classes.

    Data comes from the node's `data-file`, else from its partition in the simulation folder.
    """
    config = msg.content["config"]
    path = context.node_config.get("data-file") or partition_dir / f"client-{context.node_config['partition-id']}.npz"
    with np.load(path, allow_pickle=False) as f:
        X, y = f["X"], f["y"]
    input_range = (float(config["input-low"]), float(config["input-high"]))
    return task.scale(X, input_range), y, np.asarray(config["classes"], dtype=np.int64)


def build_client_app(partition_dir: Path) -> ClientApp:
    """A ClientApp whose nodes read their data from files, never from the server."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """Warm-start from the global weights, train locally, send back weights and metrics."""
        X, y, classes = _local_data(msg, context, partition_dir)
        config = msg.content["config"]
        start = msg.content["arrays"].to_numpy_ndarrays()
        params = task.fit(start, X, y, classes, float(config["C"]), int(config["local-iters"]))
        accuracy, loss = task.evaluate(params, X, y, classes)
        metrics = MetricRecord({"num-examples": len(y), "train-accuracy": accuracy, "train-loss": loss})
        return Message(RecordDict({"arrays": ArrayRecord(params), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Score the global weights on local data; the partition id lets the server report per client."""
        X, y, classes = _local_data(msg, context, partition_dir)
        accuracy, loss = task.evaluate(msg.content["arrays"].to_numpy_ndarrays(), X, y, classes)
        metrics = MetricRecord(
            {
                "num-examples": len(y),
                "accuracy": accuracy,
                "loss": loss,
                "client": int(context.node_config.get("partition-id", context.node_id)),
            }
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app
