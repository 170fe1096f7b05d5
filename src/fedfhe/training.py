"""Train on one machine: a Flower simulation of the federation (or one central fit), saved as a run."""

from __future__ import annotations

import dataclasses
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
from fedfhe.problem import Problem, merge_ranges, shared_range
from fedfhe.rundir import RunDir


def train(
    dataset: Dataset,
    config: TrainConfig,
    out: str | os.PathLike[str],
    on_round: RoundCallback | None = None,
    verbose: bool = False,
    resume: bool = False,
) -> LinearModel:
    """Train (federated when clients > 1) and write metrics.json, plots and model.npz into `out`.

    Federated runs checkpoint after every round; resume=True continues from the last one.
    """
    problem = config.problem(dataset)
    run = RunDir(out)
    if not resume:
        run.write_config(dataset.name, config)
    start = time.perf_counter()
    metrics: dict[str, Any] = {"rounds": []}
    if config.clients > 1:
        problem, params, metrics = _federate(dataset, problem, config, run, on_round, verbose, resume)
    elif config.input_ranges == "clients":  # the one owner's shared ranges, with the test set's
        ranges = merge_ranges([shared_range(dataset.X_train), shared_range(dataset.X_test)])
        problem = dataclasses.replace(problem, input_range=ranges)
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
    on_round: RoundCallback | None,
    verbose: bool,
    resume: bool,
) -> tuple[Problem, Params, dict[str, Any]]:
    """Partition, run the Flower simulation (from the last checkpoint when resuming), collect metrics.

    Returns the problem the federation agreed on (its input ranges may come from the owners).
    """
    from fedfhe.federated.simulation import simulate

    parts = partition(dataset.y_train, config.clients, config.partitioning, config.alpha, config.seed)
    save_partitions(dataset.X_train, dataset.y_train, parts, run.partitions)
    if not dataset.is_regression:
        counts = label_counts(dataset.y_train, parts, dataset.classes)
        plot_label_distribution(counts, dataset.classes, run.partitions_plot)
    start = run.load_checkpoint() if resume else None
    if start is None:
        run.clear_checkpoints()
    server = ServerRun(config, problem, dataset.X_test, dataset.y_test, run, start, on_round)
    if start is not None and start.round >= config.rounds:
        return server.problem, start.params, server.metrics()
    simulate(config, server, run.partitions, verbose)
    if server.params is None:
        raise FedfheError("the Flower simulation ended without a model")
    return server.problem, server.params, server.metrics()
