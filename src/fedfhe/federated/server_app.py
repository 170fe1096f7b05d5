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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedfhe import leakage, result, table
from fedfhe.config import TrainConfig
from fedfhe.data import Dataset, load_dataset
from fedfhe.errors import FedfheError
from fedfhe.federated.grids import AuditGrid, PromptGrid
from fedfhe.federated.privacy import noise_multiplier, privacy_spent
from fedfhe.federated.strategy import (
    WEIGHT,
    Guarded,
    LegacyStepped,
    RoundLog,
    ServerStep,
    evaluate_everyone,
    make_strategy,
    wait_for_nodes,
)
from fedfhe.kinds import Params
from fedfhe.objective import evaluate
from fedfhe.problem import Problem, balanced_weights, merge_ranges, observed_record, shared_range
from fedfhe.rundir import Checkpoint, RunDir

RoundCallback = Callable[[int, dict[str, float]], None]


class ServerRun:
    """One training as the server sees it: agree on input ranges and class weights, run the rounds, checkpoint each.

    Called with (grid, context) it is a ServerApp main function; `start` resumes from a checkpoint.
    Afterwards `problem` holds the agreed problem (input ranges, class weights) and `params` the final weights.
    """

    def __init__(
        self,
        config: TrainConfig,
        problem: Problem,
        X_test: np.ndarray,
        y_test: np.ndarray,
        run: RunDir,
        start: Checkpoint | None = None,
        on_round: RoundCallback | None = None,
        observe: bool = False,
    ) -> None:
        """`observe`: a user's table, whose owners' observed ranges the model keeps (see `agree`)."""
        self.config, self.X_test, self.y_test, self.run = config, X_test, y_test, run
        self.start, self.on_round, self.observe = start, on_round, observe
        self.problem, self.log = problem, RoundLog()
        self.params: Params | None = None
        self.noise = noise_multiplier(config) if config.dp else 0.0  # --target-epsilon out of reach fails here
        self.server: dict[str, np.ndarray] = {}  # the server optimizer's state (ServerStep's), DP's clipping norm
        if start is not None:
            self.restore(start)

    @property
    def offset(self) -> int:
        """Rounds done before this run started."""
        return 0 if self.start is None else self.start.round

    def __call__(self, grid: Grid, context: Context) -> None:
        """Agree on what the owners must tell (a resumed run keeps its checkpointed answers), then train."""
        self.problem = self.agree(grid)
        rounds = self._secagg_rounds if self.config.secagg else self._message_api_rounds
        self.params = rounds(grid, context)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without on_round: a callback stays in the process that gave it (see simulation.simulate)."""
        return {**self.__dict__, "on_round": None}

    def state(self) -> Checkpoint:
        """Where the training stands (weights, rounds so far, agreed ranges): a child process hands this back."""
        if self.params is None:
            raise FedfheError("the Flower simulation ended without a model")
        rounds = max(self.log.rows, default=0)
        return Checkpoint(rounds, self.params, self.log.ordered(), self.problem.input_range, self.server)

    def restore(self, state: Checkpoint) -> None:
        """Take up a state: a checkpoint to resume from, or what a child process ended with."""
        self.params, self.server = state.params, dict(state.server)
        weights = self.problem.class_weight
        if "class_counts" in self.server:  # the owners' counts, asked before the first round
            weights = balanced_weights(self.server["class_counts"], self.problem.classes)
        self.problem = dataclasses.replace(self.problem, input_range=state.input_range, class_weight=weights)
        self.log = RoundLog({row["round"]: row for row in state.rows})

    def metrics(self) -> dict[str, Any]:
        """The per-round log, failures counted and, under DP, the privacy spent."""
        rows = self.log.ordered()
        metrics: dict[str, Any] = {"rounds": rows, "failures": sum(row.get("failures", 0) for row in rows)}
        if "class_counts" in self.server:
            metrics["class_counts"] = self.server["class_counts"].tolist()
        if "filled" in self.server:  # a deployed federation's owners (the simulation's Dataset has its files')
            metrics["filled"] = json.loads(self.server["filled"].tobytes())
        if "observed_low" in self.server:
            metrics["observed_range"] = observed_record((self.server["observed_low"], self.server["observed_high"]))
        if self.config.dp:
            clipping_norm = float(self.server.get("clipping_norm", self.config.clipping_norm))
            metrics["privacy"] = privacy_spent(self.config, self.noise, clipping_norm)
        return metrics

    def agree(self, grid: Grid) -> Problem:
        """Ask every owner, in one query, what the problem still lacks: input ranges, class counts, or nothing.

        Ranges: each owner's shared (rounded) min/max. On a user's table they are always asked and kept, merged
        over the owners alone, as the observed ranges (inputs outside them are extrapolation); with
        `--input-ranges clients` they are also merged with the server's test set's into the circuit's input ranges.
        Class counts: each owner's rows per class, summed into the balanced weights. All are answered in the clear,
        SecAgg+ or not.
        """
        config, problem = self.config, self.problem
        ranges = config.input_ranges == "clients" and self.start is None
        observe = self.observe and "observed_low" not in self.server  # a checkpoint keeps them
        count = config.class_weight == "balanced" and "class_counts" not in self.server
        share = ranges or observe  # each owner's rounded min/max
        if not share and not count:
            return problem
        nodes = wait_for_nodes(grid, config.clients, config.round_timeout, "sharing what the problem needs")
        classes = ",".join(str(int(c)) for c in problem.classes) if count else ""
        asked = ConfigRecord(
            {"n-features": len(problem.input_range[0]), "ranges": share, "classes": classes, "filled": observe}
        )
        messages = [
            Message(RecordDict({"config": asked}), dst_node_id=node, message_type=MessageType.QUERY) for node in nodes
        ]
        replies = [m for m in grid.send_and_receive(messages, timeout=config.round_timeout) if not m.has_error()]
        if len(replies) < len(nodes):
            wanted = " and ".join(["feature ranges"] * share + ["class counts"] * count)
            raise FedfheError(f"only {len(replies)} of {len(nodes)} clients shared their {wanted}")
        if share:
            shared = [tuple(m.content.array_records["range"].to_numpy_ndarrays()) for m in replies]
            if observe:  # the owners' rows alone
                self.server["observed_low"], self.server["observed_high"] = merge_ranges(shared)  # type: ignore[arg-type]
                filled: list[dict[str, Any]] = [
                    dict(m.content.config_records["filled"]) for m in replies if "filled" in m.content
                ]
                owners = {f"owner {r.pop('client')}": r for r in sorted(filled, key=lambda r: int(str(r["client"])))}
                self.server["filled"] = np.frombuffer(json.dumps(owners).encode(), np.uint8)  # kept by checkpoints
            if ranges:
                merged = merge_ranges([*shared, shared_range(self.X_test)])  # type: ignore[list-item]
                problem = dataclasses.replace(problem, input_range=merged)
        if count:
            counts = [m.content.array_records["counts"].to_numpy_ndarrays()[0] for m in replies]
            self.server["class_counts"] = np.sum(counts, axis=0)
            weights = balanced_weights(self.server["class_counts"], problem.classes)
            problem = dataclasses.replace(problem, class_weight=weights)
        return problem

    def client_config(self) -> dict[str, Any]:
        """What every client is told: the problem (model, classes and their weights, ranges) and how to train."""
        return {
            **self.problem.to_config(),
            "hyper": json.dumps(self.config.client_hyper()),
            "local-iters": self.config.local_iters or 0,  # 0: each client suits it to its rows
            "mu": self.config.proximal_mu if self.config.strategy == "fedprox" else 0.0,
            "uniform-weights": self.config.dp,
        }

    def evaluate_round(self, server_round: int, params: Params) -> dict[str, Any]:
        """The server's held-out test set scores the global model; then the round is checkpointed."""
        absolute, problem = server_round + self.offset, self.problem
        score, loss = evaluate(problem, params, problem.scale(self.X_test), self.y_test)
        metrics = {"score": score, "loss": loss}
        fresh = server_round > 0 or self.offset == 0  # a resumed run's round 0 is the checkpoint, known
        if fresh:
            self.log.row(absolute)["global"] = metrics
        if server_round > 0:
            checkpoint = Checkpoint(absolute, params, self.log.ordered(), problem.input_range, self.server)
            self.run.save_checkpoint(checkpoint)
        if self.on_round is not None and fresh:
            self.on_round(absolute, metrics)
        return metrics

    def _initial(self) -> Params:
        """Where the rounds start: the checkpoint's weights, or zeros."""
        return self.problem.initial_params() if self.start is None else self.start.params

    def _message_api_rounds(self, grid: Grid, context: Context) -> Params:
        """Plain (or DP, or robust) training with a Message API strategy."""
        initial, shared = self._initial(), self.client_config()
        step = ServerStep(self.config, self.server)
        strategy = Guarded(make_strategy(self.config, self.noise), self.config, self.log, self.offset, step, self.noise)
        if strategy.private is not None and "clipping_norm" in self.server:  # a resumed run's adapted norm
            strategy.private.clipping_norm = float(self.server["clipping_norm"])

        def evaluated(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            """Keep the adapted clipping norm with the round's checkpoint, then score the round's weights."""
            if strategy.private is not None:
                self.server["clipping_norm"] = np.array(strategy.private.clipping_norm)
            return MetricRecord(self.evaluate_round(server_round, arrays.to_numpy_ndarrays()))

        outcome = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=self.config.rounds - self.offset,
            timeout=self.config.round_timeout,
            train_config=ConfigRecord(shared),  # two records: the DP wrapper adds its clipping norm to this one
            evaluate_config=ConfigRecord(shared),
            evaluate_fn=evaluated,
        )
        final = outcome.arrays if len(outcome.arrays) else ArrayRecord(initial)
        if not self.config.evaluate_every_round:  # train replies scored each round's model but the last
            reports = evaluate_everyone(grid, final, ConfigRecord(shared), self.config.round_timeout)
            self.log.record_clients(self.config.rounds, reports)
        return final.to_numpy_ndarrays()

    def _secagg_rounds(self, grid: Grid, context: Context) -> Params:
        """The same rounds through SecAgg+: the server only ever sees the masked sum of updates."""
        from flwr.common import ndarrays_to_parameters
        from flwr.server import LegacyContext, ServerConfig
        from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping as LegacyDP
        from flwr.server.strategy import FedAvg as LegacyFedAvg
        from flwr.server.workflow import DefaultWorkflow

        config, log, shared = self.config, self.log, self.client_config()
        current = {"round": 0, "aggregated": 0}

        def fit_config(server_round: int) -> dict[str, Any]:
            """Called just before sampling: wait for the nodes and seed it, as the Message API path does."""
            current["round"] = server_round + self.offset
            wanted = config.clients if server_round == 1 else config.min_clients
            wait_for_nodes(grid, wanted, config.round_timeout, f"round {current['round']}")
            random.seed(f"{config.seed}/{server_round + self.offset}")
            return dict(shared)

        def fit_metrics(results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
            """Count the clients whose masked update was lost, keep the mean training metrics."""
            row = log.row(current["round"])
            row["failures"] = config.sampled - len(results)
            if len(results) < config.min_clients:
                raise FedfheError(
                    f"round {current['round']}: only {len(results)} of {config.sampled} clients' masked updates "
                    f"arrived (--min-clients {config.min_clients})"
                )
            total = sum(n for n, _ in results) or 1
            row["train"] = {k: sum(n * m[k] for n, m in results) / total for k in ("train-score", "train-loss")}
            current["aggregated"] = current["round"]
            return dict(row["train"])

        def evaluate_metrics(results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
            """Per-client figures, as the Message API path records them."""
            log.record_clients(current["round"], [{**m, WEIGHT: n} for n, m in results])
            return dict(log.row(current["round"]).get("clients_mean", {}))

        def evaluate_fn(server_round: int, params: Params, _: dict[str, Any]) -> tuple[float, dict[str, Any]]:
            """The server's test score; a round SecAgg+ could not aggregate (Flower only logs it) stops the run."""
            if server_round > 0 and current["aggregated"] != server_round + self.offset:
                raise FedfheError(
                    f"round {server_round + self.offset}: SecAgg+ could not unmask the sum: too few clients kept "
                    f"their masked updates and shares (reconstruction threshold {config.secagg_threshold:g})"
                )
            metrics = self.evaluate_round(server_round, params)
            return metrics["loss"], dict(metrics)

        strategy: Any = LegacyFedAvg(
            fraction_fit=config.fraction,
            fraction_evaluate=1.0,
            min_fit_clients=1,  # fit_config has waited for the nodes; fraction_fit sizes the sample
            min_evaluate_clients=1,
            min_available_clients=config.min_clients,
            evaluate_fn=evaluate_fn,
            on_fit_config_fn=fit_config,
            on_evaluate_config_fn=lambda _: dict(shared),
            initial_parameters=ndarrays_to_parameters(self._initial()),
            fit_metrics_aggregation_fn=fit_metrics,
            evaluate_metrics_aggregation_fn=evaluate_metrics,
        )
        if config.dp:
            strategy = LegacyDP(strategy, self.noise, config.clipping_norm, config.sampled)
        strategy = LegacyStepped(strategy, ServerStep(config, self.server))
        rounds = ServerConfig(num_rounds=config.rounds - self.offset, round_timeout=config.round_timeout)
        legacy = LegacyContext(context, rounds, strategy)
        DefaultWorkflow(fit_workflow=secagg_workflow(config))(grid, legacy)
        return legacy.state.array_records["parameters"].to_numpy_ndarrays()


def secagg_workflow(config: TrainConfig) -> Any:
    """SecAgg+ with our shares, threshold, clipping and quantization range."""
    from flwr.server.workflow import SecAggPlusWorkflow

    def share(value: float) -> int | float:
        """Flower reads an int as a number of clients and a float as a fraction of them."""
        return int(value) if value >= 1 else value

    return SecAggPlusWorkflow(
        num_shares=share(config.secagg_shares),
        reconstruction_threshold=share(config.secagg_threshold),
        clipping_range=config.secagg_clipping_range,
        quantization_range=config.secagg_quantization_range,
        # Updates are scaled by weight / max_weight before quantization: keep the ratio near 1.
        max_weight=1.0 if config.dp else config.secagg_max_weight,
        timeout=config.round_timeout,  # each of SecAgg+'s four stages; without it a dead node stalls the run
    )


def build_server_app(main: Callable[[Grid, Context], None]) -> ServerApp:
    """Wrap a server main function as a Flower ServerApp."""
    app = ServerApp()
    app.main()(main)
    return app


def deployment_main(grid: Grid, context: Context) -> None:
    """What `flwr run` starts on the SuperLink: the config from the run config, outputs to out-dir."""
    settings = context.run_config
    config = TrainConfig.from_run_config(settings)
    dataset = _server_data(settings, config.seed)
    run = RunDir(Path(str(settings["out-dir"])).resolve())
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(dataset.name, config, dataset.source)
    if dataset.schema is not None:
        run.schema_file.write_text(json.dumps(dataset.schema, indent=1))
    audit = str(settings.get("audit-dir", ""))
    problem, observe = config.problem(dataset), dataset.schema is not None
    server = ServerRun(config, problem, dataset.X_test, dataset.y_test, run, observe=observe)
    started = time.perf_counter()
    server(AuditGrid(grid, Path(audit)) if audit else PromptGrid(grid), context)
    metrics = {**server.metrics(), "train_seconds": time.perf_counter() - started}
    if server.params is None:
        raise FedfheError("the federated run ended without a model")
    result.save(run, dataset, server.problem, config, server.params, metrics)


def _server_data(settings: dict[str, Any], seed: int) -> Dataset:
    """What the server holds: a bundled data set by name, or (a user's table) its held-out test file and the schema."""
    if not settings.get("schema"):
        return load_dataset(str(settings["dataset"]), seed=seed)
    schema = table.Schema.from_json(str(settings["schema"]), "run config schema")
    schema.check_positive()
    data = table.held_out(str(settings["test-file"]), schema)
    if settings.get("leakage"):  # the row-hash counts the coordinator found before training
        data = dataclasses.replace(data, leakage=leakage.parse(str(settings["leakage"]), "run config leakage"))
    owners = str(settings.get("owners-dir", ""))
    return dataclasses.replace(data, name=owners, source={"owners": owners, **(data.source or {})}) if owners else data


app = build_server_app(deployment_main)
