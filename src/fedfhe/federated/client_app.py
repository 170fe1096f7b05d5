"""Flower ClientApp: each data owner trains and evaluates on its own data file.

One implementation serves both ways the server can talk: Flower's Message API (arrays + config
records) and the legacy record layout that SecAgg+ still requires in Flower 1.42 (fitins/fitres).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedfhe.federated import task


def _request(msg: Message) -> tuple[task.Params, ConfigRecord | dict, bool]:
    """Global weights, server config, and whether the message uses the legacy layout."""
    content = msg.content
    if "arrays" in content.array_records:
        return content["arrays"].to_numpy_ndarrays(), content["config"], False
    ins = (
        compat.recorddict_to_fitins(content, True)
        if "fitins.parameters" in content.array_records
        else (compat.recorddict_to_evaluateins(content, True))
    )
    return parameters_to_ndarrays(ins.parameters), ins.config, True


def _local_data(config: ConfigRecord | dict, context: Context, partition_dir: Path) -> tuple[np.ndarray, ...]:
    """The owner's data scaled as the server asks, its labels, and the federation's classes.

    Data comes from the node's `data-file`, else from its partition in the simulation folder.
    """
    path = context.node_config.get("data-file") or partition_dir / f"client-{context.node_config['partition-id']}.npz"
    with np.load(path, allow_pickle=False) as f:
        X, y = f["X"], f["y"]
    input_range = (float(config["input-low"]), float(config["input-high"]))
    classes = np.array([int(c) for c in str(config["classes"]).split(",")])
    return task.scale(X, input_range), y, classes


def build_client_app(partition_dir: Path, mods: list | None = None) -> ClientApp:
    """A ClientApp whose nodes read their data from files, never from the server."""
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """Warm-start from the global weights, train locally, send back weights and metrics."""
        start, config, legacy = _request(msg)
        X, y, classes = _local_data(config, context, partition_dir)
        params = task.fit(start, X, y, classes, float(config["C"]), int(config["local-iters"]), float(config["mu"]))
        accuracy, loss = task.evaluate(params, X, y, classes)
        # DP needs every client to weigh the same; otherwise FedAvg weighs by data size.
        weight = 1 if bool(config["uniform-weights"]) else len(y)
        metrics = {"weight": weight, "train-accuracy": accuracy, "train-loss": loss}
        if legacy:
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(params), weight, metrics)
            return Message(compat.fitres_to_recorddict(res, True), reply_to=msg)
        return Message(RecordDict({"arrays": ArrayRecord(params), "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Score the global weights on local data; the partition id lets the server report per client."""
        params, config, legacy = _request(msg)
        X, y, classes = _local_data(config, context, partition_dir)
        accuracy, loss = task.evaluate(params, X, y, classes)
        client = int(context.node_config.get("partition-id", context.node_id))
        metrics = {"weight": len(y), "accuracy": accuracy, "loss": loss, "client": client}
        if legacy:
            res = EvaluateRes(Status(Code.OK, ""), loss, len(y), metrics)
            return Message(compat.evaluateres_to_recorddict(res), reply_to=msg)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app
