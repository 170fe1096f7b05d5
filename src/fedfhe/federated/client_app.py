"""Flower ClientApp: each data owner trains and evaluates on its own data file.

One implementation serves both ways the server can talk: Flower's Message API (arrays + config
records) and the legacy record layout that SecAgg+ still requires in Flower 1.42 (fitins/fitres).
A train reply also carries the client's score of the global model it received, so rounds need no
evaluate messages; on the Deployment Engine every message starts a fresh process, so this module
imports little (scikit-learn and SciPy load only when a handler needs them).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedfhe import objective
from fedfhe.config import TrainConfig
from fedfhe.data import load_dataset, read_table
from fedfhe.errors import FedfheError
from fedfhe.kinds import Params
from fedfhe.partition import label_counts, partition
from fedfhe.problem import Problem, shared_range
from fedfhe.table import Rows, Schema, read_rows


def _request(msg: Message) -> tuple[Params, Mapping[str, Any], bool]:
    """Global weights, server config, and whether the message uses the legacy layout."""
    content = msg.content
    if "arrays" in content.array_records:
        return content.array_records["arrays"].to_numpy_ndarrays(), content.config_records["config"], False
    ins = (
        compat.recorddict_to_fitins(content, True)
        if "fitins.parameters" in content.array_records
        else (compat.recorddict_to_evaluateins(content, True))
    )
    return parameters_to_ndarrays(ins.parameters), ins.config, True


@functools.lru_cache(maxsize=4)
def _owner_data(
    node_config: tuple[tuple[str, Any], ...],
    partition_dir: Path | None,
    share_of: tuple[str, str, float, int],
    schema: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a node's data once per process: its `data-file` (a table, by the run's schema), a demo partition, or its simulation share."""
    nc = dict(node_config)
    if schema and "data-file" not in nc:
        raise FedfheError("this run trains on tables: set the SuperNode's node config data-file to its owner's table")
    if schema:
        rows = _table_rows(str(nc["data-file"]), schema)
        assert rows.y is not None  # read_rows reads the label
        return rows.X, rows.y
    if "data-file" in nc:
        X, y = read_table(Path(str(nc["data-file"])))
        if y is None:
            raise FedfheError(f"{nc['data-file']}: no labels (need y in the .npz or a label column in the .csv)")
        return X, y
    if "dataset" in nc:  # demo: this node's share of a bundled data set
        data = load_dataset(str(nc["dataset"]), seed=int(nc.get("seed", 0)))
        parts = partition(data.y_train, int(nc["num-partitions"]), seed=int(nc.get("seed", 0)))
        idx = parts[int(nc["partition-id"])]
        return data.X_train[idx], data.y_train[idx]
    dataset, scheme, alpha, seed = share_of
    if partition_dir is None and dataset and {"partition-id", "num-partitions"} <= nc.keys():
        # Flower's simulated SuperNodes (`flwr run .`): the node's share of the run's data set, as `train` splits it
        data = load_dataset(dataset, seed=seed)
        idx = partition(data.y_train, int(nc["num-partitions"]), scheme, alpha, seed)[int(nc["partition-id"])]
        return data.X_train[idx], data.y_train[idx]
    if partition_dir is None:
        raise FedfheError("this SuperNode has no data: set node config data-file (or dataset and partition-id)")
    with np.load(partition_dir / f"client-{nc['partition-id']}.npz", allow_pickle=False) as f:
        return f["X"], f["y"]


def _local_data(
    config: Mapping[str, Any], context: Context, partition_dir: Path | None
) -> tuple[Problem, np.ndarray, np.ndarray]:
    """The problem as the server states it, and the owner's features scaled as it asks, with labels."""
    problem = Problem.from_config(config)
    X, y = _checked_data(context, partition_dir, len(problem.input_range[0]))
    return problem, problem.scale(X), y


def _checked_data(context: Context, partition_dir: Path | None, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """The owner's data, refused unless it has the federation's number of features."""
    run = context.run_config
    share_of = (
        str(run.get("dataset", "")),
        str(run.get("partitioning", "iid")),
        float(run.get("alpha", 0.5)),
        int(run.get("seed", 0)),
    )
    schema = str(run.get("schema", ""))
    X, y = _owner_data(tuple(sorted(context.node_config.items())), partition_dir, share_of, schema)
    if X.ndim != 2 or X.shape[1] != n_features:
        raise FedfheError(f"local data has shape {X.shape}; the federation trains on {n_features} features")
    return X, y


def client_mods(secagg: bool, dp: bool, clipping: str) -> list[Any]:
    """Client-side privacy layers around training: SecAgg+ masking, and clipping of the update for DP (inside it)."""
    if secagg:
        from flwr.client.mod import fixedclipping_mod, secaggplus_mod

        return [secaggplus_mod, fixedclipping_mod] if dp else [secaggplus_mod]
    if dp:
        from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

        return [adaptiveclipping_mod if clipping == "adaptive" else fixedclipping_mod]
    return []


def configured_mods(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The privacy layers a deployed run asks for in its run config (the simulation passes them directly)."""
    from flwr.client.mod import make_ffn

    settings = (TrainConfig.setting(context.run_config, name) for name in ("secagg", "dp", "clipping"))
    return make_ffn(call_next, client_mods(*settings))(msg, context)


def _started() -> float:
    """Seconds since this process started: what a fresh ClientApp process costs before its handler runs."""
    with open(f"/proc/{os.getpid()}/stat", "rb") as f:
        ticks = int(f.read().split(b") ", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


def build_client_app(partition_dir: Path | None, train_mods: list | None = None) -> ClientApp:
    """A ClientApp whose nodes read their data from files, never from the server.

    `train_mods` (SecAgg+ masking, DP clipping) wrap training only: they expect an update in the reply,
    which evaluation and queries do not send.
    """
    app = ClientApp()

    @app.train(mods=train_mods or [])
    def train(msg: Message, context: Context) -> Message:
        """Score the global weights received, warm-start from them, train locally, send back both."""
        waited = _started() if partition_dir is None else 0.0  # a deployed node's fresh process
        start, config, legacy = _request(msg)
        problem, X, y = _local_data(config, context, partition_dir)
        received = objective.evaluate(problem, start, X, y)
        hyper = json.loads(str(config["hyper"]))
        began = time.perf_counter()
        iterations = int(config["local-iters"]) or local_iterations(len(y))
        params = objective.fit(problem, start, X, problem.scale_target(y), hyper, iterations, float(config["mu"]))
        trained = time.perf_counter() - began
        score, loss = objective.evaluate(problem, params, X, y)
        # DP needs every client to weigh the same; otherwise FedAvg weighs by data size.
        weight = 1 if bool(config["uniform-weights"]) else len(y)
        metrics: dict[str, Any] = {
            "weight": weight,
            "train-score": score,
            "train-loss": loss,
            "score": received[0],  # of the global model this client received, on its own data
            "loss": received[1],
            "examples": len(y),
            "client": _client_id(context),
            "process-seconds": waited,
            "train-seconds": trained,
        }
        if legacy:
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(params), weight, metrics)
            return Message(compat.fitres_to_recorddict(res, True), reply_to=msg)
        return Message(RecordDict({"arrays": ArrayRecord(params), "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Score the global weights on local data; the partition id lets the server report per client."""
        params, config, legacy = _request(msg)
        problem, X, y = _local_data(config, context, partition_dir)
        score, loss = objective.evaluate(problem, params, X, y)
        metrics: dict[str, Any] = {"weight": len(y), "score": score, "loss": loss, "client": _client_id(context)}
        if legacy:
            res = EvaluateRes(Status(Code.OK, ""), loss, len(y), metrics)
            return Message(compat.evaluateres_to_recorddict(res), reply_to=msg)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Share what the server asks, never a row: rounded per-feature min and max (shared_range), rows per class."""
        asked = msg.content.config_records["config"]
        X, y = _checked_data(context, partition_dir, cast(int, asked["n-features"]))
        shared = RecordDict()
        if asked["ranges"]:
            shared["range"] = ArrayRecord(list(shared_range(X)))
        if asked["classes"]:
            classes = np.array([int(c) for c in str(asked["classes"]).split(",")])
            shared["counts"] = ArrayRecord([label_counts(y, [np.arange(len(y))], classes)[0]])
        schema = str(context.run_config.get("schema", ""))
        if asked.get("filled") and schema and "data-file" in context.node_config:  # a deployed owner's own table
            shared["filled"] = ConfigRecord({"client": _client_id(context), **_filled(context, schema)})
        return Message(shared, reply_to=msg)

    return app


def local_iterations(rows: int) -> int:
    """The default local work: the square root of the client's rows, 3 to 20.

    Each client's objective carries the whole federation's weight on its own rows, so many
    iterations on few rows overfit them and the average drifts (mnist-5k, 100 clients of 40 rows,
    20 rounds: 80.6% with 20 iterations, 89.0% with 6; docs/many-clients.md).
    """
    return min(max(round(math.sqrt(rows)), 3), 20)


@functools.lru_cache(maxsize=2)
def _table_rows(path: str, schema: str) -> Rows:
    """An owner's table read once per process by the run's schema: its rows, and the cells it filled."""
    return read_rows(path, Schema.from_json(schema, "run config schema"))


def _filled(context: Context, schema: str) -> dict[str, int]:
    """The cells of the owner's table filled as the schema declares, per feature (counts only, never a row)."""
    agreed = Schema.from_json(schema, "run config schema")
    return _table_rows(str(context.node_config["data-file"]), schema).filled_counts(agreed)


def _client_id(context: Context) -> int:
    """The data owner's number for per-client reports: its partition id, or its node id."""
    return int(context.node_config.get("partition-id", context.node_id))


# What `flwr run` loads on a SuperNode (pyproject [tool.flwr.app.components]): data from node config,
# privacy layers from the run config.
app = build_client_app(None, [configured_mods])
