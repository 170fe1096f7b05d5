"""Flower ServerApp: the chosen strategy over the clients, evaluated and checkpointed every round.

Plain training uses Flower's Message API strategies. Secure aggregation (SecAgg+) still needs
Flower's legacy workflow in 1.42, so `--secagg` runs the same rounds through `DefaultWorkflow` with
`SecAggPlusWorkflow`; the clients answer both (see client_app.py).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedfhe.data import Range
from fedfhe.errors import FedfheError
from fedfhe.federated import task

RoundCallback = Callable[[int, dict[str, float]], None]
WEIGHT = "weight"


@dataclass
class RoundLog:
    """Per-round metrics, filled in while the strategy runs and saved with every checkpoint."""

    rows: dict[int, dict[str, Any]] = field(default_factory=dict)

    def row(self, server_round: int) -> dict[str, Any]:
        """The record of one round, created on first use."""
        return self.rows.setdefault(server_round, {"round": server_round})

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
    rows = sorted((r["metrics"]["client"], r["metrics"]["score"], r["metrics"]["loss"]) for r in records)
    merged["clients"] = [int(row[0]) for row in rows]
    merged["client-score"] = [float(row[1]) for row in rows]
    merged["client-loss"] = [float(row[2]) for row in rows]
    return merged


class Guarded(Strategy):
    """Wraps a strategy: seeded sampling, fixed reply order, failures counted, a minimum enforced."""

    def __init__(self, inner: Strategy, config: task.TrainConfig, log: RoundLog, offset: int) -> None:
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


def make_strategy(config: task.TrainConfig) -> Strategy:
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


def client_config(config: task.TrainConfig, problem: task.Problem) -> dict[str, Any]:
    """What every client is told: the problem (model, classes, ranges) and how to train."""
    return {
        **problem.to_config(),
        "hyper": json.dumps(task.client_hyper(config.model, config.params, config.clients)),
        "local-iters": config.local_iters,
        "mu": config.proximal_mu if config.strategy == "fedprox" else 0.0,
        "uniform-weights": config.dp,
    }


def save_checkpoint(folder: Path, server_round: int, params: task.Params, log: RoundLog, problem: task.Problem) -> None:
    """Global weights, metrics and the agreed input ranges after a round; atomic, read back by --resume."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = json.dumps([log.rows[r] for r in sorted(log.rows) if r <= server_round])
    tmp = folder / f".round-{server_round:04d}.npz"
    with open(tmp, "wb") as f:
        np.savez(
            f,
            coef=params[0],
            intercept=params[1],
            input_low=problem.input_range[0],
            input_high=problem.input_range[1],
            rows=np.frombuffer(rows.encode(), dtype=np.uint8),
        )
    tmp.replace(folder / f"round-{server_round:04d}.npz")


def load_checkpoint(folder: Path) -> tuple[int, task.Params, RoundLog, Range]:
    """The last completed round's weights, metrics and input ranges."""
    files = sorted(folder.glob("round-*.npz"))
    if not files:
        raise FedfheError(f"{folder}: no checkpoint to resume from")
    try:
        with np.load(files[-1], allow_pickle=False) as f:
            params = [f["coef"], f["intercept"]]
            input_range = (f["input_low"], f["input_high"])
            rows = json.loads(f["rows"].tobytes())
    except (OSError, ValueError, KeyError) as exc:
        raise FedfheError(f"{files[-1]}: unreadable checkpoint ({exc})") from None
    return int(files[-1].stem.split("-")[1]), params, RoundLog({row["round"]: row for row in rows}), input_range


ServerMain = Callable[[Grid, Context], None]


@dataclass
class Outcome:
    """What a server run leaves behind: the agreed problem (input ranges included) and the final weights."""

    problem: task.Problem | None = None
    params: task.Params | None = None


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, what: str) -> list[int]:
    """The connected nodes once at least `wanted` are there, or a clear error after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise FedfheError(f"{what}: only {len(nodes)} of {wanted} clients connected")
        time.sleep(0.05)
    return nodes


def gather_ranges(grid: Grid, config: task.TrainConfig, problem: task.Problem, X_test: np.ndarray) -> task.Problem:
    """Input ranges from every owner's shared (rounded) min/max and the server's own test set."""
    nodes = wait_for_nodes(grid, config.clients, config.round_timeout, "sharing input ranges")
    asked = {"n-features": len(problem.input_range[0])}
    messages = [
        Message(RecordDict({"config": ConfigRecord(asked)}), dst_node_id=node, message_type=MessageType.QUERY)
        for node in nodes
    ]
    replies = [m for m in grid.send_and_receive(messages, timeout=config.round_timeout) if not m.has_error()]
    if len(replies) < len(nodes):
        raise FedfheError(f"only {len(replies)} of {len(nodes)} clients shared their feature ranges")
    ranges = [tuple(m.content["range"].to_numpy_ndarrays()) for m in replies]
    return dataclasses.replace(problem, input_range=task.merge_ranges([*ranges, task.shared_range(X_test)]))


def make_server_main(
    config: task.TrainConfig,
    problem: task.Problem,
    X_test: np.ndarray,
    y_test: np.ndarray,
    checkpoints: Path,
    log: RoundLog,
    outcome: Outcome,
    start: tuple[int, task.Params] | None = None,
    on_round: RoundCallback | None = None,
) -> ServerMain:
    """The server's main function: agree on the input ranges, then train; fills `outcome`. `start` resumes."""

    def main(grid: Grid, context: Context) -> None:
        gather = config.input_ranges == "clients" and start is None  # a resumed run keeps its checkpointed ranges
        outcome.problem = gather_ranges(grid, config, problem, X_test) if gather else problem
        rounds_main(outcome.problem)(grid, context)

    def rounds_main(problem: task.Problem) -> ServerMain:
        """The training rounds for an agreed problem, through a Message API strategy or SecAgg+."""
        X_eval = problem.scale(X_test)
        offset, initial = start or (0, problem.initial_params())
        shared = client_config(config, problem)

        def central_evaluate(server_round: int, params: task.Params) -> dict[str, float]:
            """The server's held-out test set scores the global model; then checkpoint."""
            absolute = server_round + offset
            score, loss = task.evaluate(problem, params, X_eval, y_test)
            metrics = {"score": score, "loss": loss}
            if server_round > 0 or offset == 0:
                log.row(absolute)["global"] = metrics
            if server_round > 0:
                save_checkpoint(checkpoints, absolute, params, log, problem)
            if on_round is not None and (server_round > 0 or offset == 0):
                on_round(absolute, metrics)
            return metrics

        def message_api_main(grid: Grid, context: Context) -> None:
            """Plain (or DP, or robust) training with a Message API strategy."""
            strategy = Guarded(make_strategy(config), config, log, offset)
            result = strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(initial),
                num_rounds=config.rounds - offset,
                timeout=config.round_timeout,
                train_config=ConfigRecord(shared),
                evaluate_config=ConfigRecord(shared),
                evaluate_fn=lambda r, arrays: MetricRecord(central_evaluate(r, arrays.to_numpy_ndarrays())),
            )
            outcome.params = result.arrays.to_numpy_ndarrays() if len(result.arrays) else initial

        def secagg_main(grid: Grid, context: Context) -> None:
            """The same rounds through SecAgg+: the server only ever sees the masked sum of updates."""
            from flwr.common import ndarrays_to_parameters
            from flwr.server import LegacyContext, ServerConfig
            from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping as LegacyDP
            from flwr.server.strategy import FedAvg as LegacyFedAvg
            from flwr.server.workflow import DefaultWorkflow

            current = {"round": 0}

            def fit_config(server_round: int) -> dict[str, Any]:
                """Called just before sampling: seed it as the Message API path does."""
                current["round"] = server_round + offset
                random.seed(f"{config.seed}/{server_round + offset}")
                return dict(shared)

            def fit_metrics(results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
                """Count the clients whose masked update was lost, keep the mean training metrics."""
                row = log.row(current["round"])
                row["failures"] = config.sampled - len(results)
                total = sum(n for n, _ in results) or 1
                row["train"] = {k: sum(n * m[k] for n, m in results) / total for k in ("train-score", "train-loss")}
                return row["train"]

            def evaluate_metrics(results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
                """Per-client figures, as the Message API path records them."""
                records = [RecordDict({"metrics": MetricRecord({**m, WEIGHT: n})}) for n, m in results]
                merged = dict(per_client_metrics(records, WEIGHT))
                log.record_clients(current["round"], merged)
                return {"score": merged["score"], "loss": merged["loss"]}

            def evaluate_fn(server_round: int, params: task.Params, _: dict) -> tuple[float, dict[str, float]]:
                metrics = central_evaluate(server_round, params)
                return metrics["loss"], metrics

            strategy: Any = LegacyFedAvg(
                fraction_fit=config.fraction,
                fraction_evaluate=1.0,
                min_fit_clients=config.sampled,
                min_evaluate_clients=1,
                min_available_clients=config.clients,
                evaluate_fn=evaluate_fn,
                on_fit_config_fn=fit_config,
                on_evaluate_config_fn=lambda _: dict(shared),
                initial_parameters=ndarrays_to_parameters(initial),
                fit_metrics_aggregation_fn=fit_metrics,
                evaluate_metrics_aggregation_fn=evaluate_metrics,
            )
            if config.dp:
                strategy = LegacyDP(strategy, config.noise_multiplier, config.clipping_norm, config.sampled)
            legacy = LegacyContext(context, ServerConfig(num_rounds=config.rounds - offset), strategy)
            workflow = DefaultWorkflow(fit_workflow=secagg_workflow(config))
            workflow(grid, legacy)
            outcome.params = legacy.state.array_records["parameters"].to_numpy_ndarrays()

        return secagg_main if config.secagg else message_api_main

    return main


def secagg_workflow(config: task.TrainConfig) -> Any:
    """SecAgg+ with our shares, threshold, clipping and quantization range."""
    from flwr.server.workflow import SecAggPlusWorkflow

    return SecAggPlusWorkflow(
        num_shares=config.secagg_shares,
        reconstruction_threshold=config.secagg_threshold,
        clipping_range=config.secagg_clipping_range,
        quantization_range=config.secagg_quantization_range,
        # Updates are scaled by weight / max_weight before quantization: keep the ratio near 1.
        max_weight=1.0 if config.dp else config.secagg_max_weight,
    )


def build_server_app(main: ServerMain) -> ServerApp:
    """Wrap a server main function as a Flower ServerApp."""
    app = ServerApp()
    app.main()(main)
    return app


def deployment_main(grid: Grid, context: Context) -> None:
    """What `flwr run` starts on the SuperLink: settings from the run config, outputs to out-dir."""
    from fedfhe.data import load_dataset
    from fedfhe.training import problem_for, save_model

    rc = context.run_config
    config = task.TrainConfig(
        clients=int(rc["clients"]),
        rounds=int(rc["num-server-rounds"]),
        local_iters=int(rc["local-iters"]),
        fraction=float(rc["fraction"]),
        seed=int(rc["seed"]),
        model=str(rc["model"]),
        params=task.parse_params(str(rc["params"]).split()),
        strategy=str(rc["strategy"]),
        min_clients=int(rc["min-clients"]),
        input_ranges=str(rc["input-ranges"]),
        round_timeout=float(rc["round-timeout"]),
    )
    dataset = load_dataset(str(rc["dataset"]), seed=config.seed)
    config.check(len(dataset.y_train))
    problem = problem_for(dataset, config)
    out = Path(str(rc["out-dir"])).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log, outcome = RoundLog(), Outcome()
    started = time.perf_counter()
    make_server_main(config, problem, dataset.X_test, dataset.y_test, out / "checkpoints", log, outcome)(grid, context)
    rows = [log.rows[r] for r in sorted(log.rows)]
    metrics = {"rounds": rows, "failures": sum(row.get("failures", 0) for row in rows)}
    metrics["train_seconds"] = time.perf_counter() - started
    save_model(dataset, outcome.problem, config, out, outcome.params, metrics)


app = build_server_app(deployment_main)
