"""Train on one machine: a Flower simulation of the federation (or one central fit), saved as a run."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from typing import Any

import numpy as np

from fedfhe import result
from fedfhe.config import TrainConfig
from fedfhe.data import Dataset
from fedfhe.errors import FedfheError
from fedfhe.federated.server_app import RoundCallback, ServerRun
from fedfhe.kinds import Params
from fedfhe.model import LinearModel
from fedfhe.objective import evaluate
from fedfhe.partition import label_counts, partition, plot_label_distribution, save_partitions
from fedfhe.problem import Problem, merge_ranges, observed_record, shared_range
from fedfhe.rundir import Checkpoint, RunDir


def train(
    dataset: Dataset,
    config: TrainConfig,
    out: str | os.PathLike[str],
    on_round: RoundCallback | None = None,
    verbose: bool = False,
    resume: bool = False,
    force: bool = False,
) -> LinearModel:
    """Train (federated when clients > 1) and write metrics.json, plots and model.npz into `out`.

    Federated runs checkpoint after every round; resume=True continues from the last one. A folder that
    already holds a run is refused unless force=True, which first removes what that run wrote there
    (RunDir.written, nothing else). Every check comes before anything is written.
    """
    problem = config.problem(dataset)
    run = RunDir(out)
    federated = config.clients > 1
    parts: list[np.ndarray] = []  # each client's rows: the split may refuse the data, so it comes first
    if federated and dataset.owners:  # one file per owner: its rows, as they came
        ends = np.cumsum(dataset.owners)
        parts = [np.arange(end - size, end) for size, end in zip(dataset.owners, ends)]
    elif federated:
        with warnings.catch_warnings():  # flwr-datasets warns at each failed Dirichlet draw, every alpha listed
            warnings.simplefilter("ignore")
            parts = partition(dataset.y_train, config.clients, config.partitioning, config.alpha, config.seed)
    checkpoint = run.load_checkpoint() if resume and federated else None
    if not resume and not force and run.holds_run():
        raise FedfheError(
            f"{run.path} already holds a run: pass --force to start over (its files are removed first), "
            f"or continue it with: fedfhe train --resume {run.path}"
        )
    run.create()
    if not resume:
        if force:
            run.clear()
        run.write_config(dataset.name, config, dataset.source)
        if dataset.schema is not None:
            run.schema_file.write_text(json.dumps(dataset.schema, indent=1))
    start = time.perf_counter()
    metrics: dict[str, Any] = {"rounds": []}
    if federated:
        problem, params, metrics = _federate(dataset, problem, config, run, parts, checkpoint, on_round, verbose)
    else:
        if config.input_ranges == "clients":  # the one owner's shared ranges, with the test set's
            ranges = merge_ranges([shared_range(dataset.X_train), shared_range(dataset.X_test)])
            problem = dataclasses.replace(problem, input_range=ranges)
        if dataset.schema is not None:  # a user's table: the one owner's observed ranges, as a federation's
            metrics["observed_range"] = observed_record(shared_range(dataset.X_train))
    central, _ = centralized_params(problem, dataset, config)
    score, loss = evaluate(problem, central, problem.scale(dataset.X_test), dataset.y_test)
    metrics["centralized"] = {"score": score, "loss": loss}
    if config.engine == "concrete":
        params, fitted = centralized_params(problem, dataset, config, "concrete")
        # Concrete ML's own quantized model (calibrated on the training data), scored in the clear
        predicted = problem.unscale_target(fitted.predict(problem.scale(dataset.X_test)))
        metrics["concrete_quantized"] = problem.kind.score(dataset.y_test, predicted)
    elif config.clients == 1:
        params = central
    metrics["train_seconds"] = time.perf_counter() - start
    return result.save(run, dataset, problem, config, params, metrics)


def centralized_params(problem: Problem, dataset: Dataset, config: TrainConfig, engine: str = "sklearn") -> Any:
    """One fit on the whole training set with the estimator's own solver: scikit-learn's, or Concrete ML's.

    Returns the float weights in the scaled space and, for Concrete ML, its fitted (quantized) estimator.
    """
    X, y = problem.scale(dataset.X_train), problem.scale_target(dataset.y_train)
    params = problem.kind.resolve(config.params)
    if problem.class_weight is not None:  # the federation's weights, so the reference weighs as the clients did
        params["class_weight"] = dict(zip(problem.classes.tolist(), problem.class_weight.tolist()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if engine == "concrete":
            from fedfhe.fhe import fit_concrete

            fitted = fit_concrete(problem.kind, params, X, y)
            weights = fitted.sklearn_model
        else:
            fitted = weights = problem.kind.estimator(**params).fit(X, y)
    return [np.atleast_2d(weights.coef_), np.atleast_1d(weights.intercept_).astype(np.float64)], fitted


def _federate(
    dataset: Dataset,
    problem: Problem,
    config: TrainConfig,
    run: RunDir,
    parts: list[np.ndarray],
    start: Checkpoint | None,
    on_round: RoundCallback | None,
    verbose: bool,
) -> tuple[Problem, Params, dict[str, Any]]:
    """Write the partitions, run the Flower simulation (from `start` when resuming), collect metrics.

    Returns the problem the federation agreed on (its input ranges may come from the owners).
    """
    from fedfhe.federated.simulation import simulate

    save_partitions(dataset.X_train, dataset.y_train, parts, run.partitions)
    if not dataset.is_regression:
        counts = label_counts(dataset.y_train, parts, dataset.classes)
        plot_label_distribution(counts, result.names(dataset)["class_names"], run.partitions_plot)
    server = ServerRun(
        config, problem, dataset.X_test, dataset.y_test, run, start, on_round, dataset.schema is not None
    )
    if start is None or start.round < config.rounds:
        simulate(config, server, run.partitions, verbose)
    return server.problem, server.state().params, server.metrics()
