"""Train a model, federated or centrally, and save it with its metrics and plots in a run directory."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from fedfhe.data import Dataset
from fedfhe.errors import FedfheError
from fedfhe.federated import task
from fedfhe.federated.server_app import Outcome, RoundCallback, RoundLog, load_checkpoint, make_server_main
from fedfhe.federated.task import Problem, TrainConfig
from fedfhe.model import MODEL_FILE, LinearModel
from fedfhe.partition import label_counts, partition, plot_label_distribution, save_partitions

CONFIG_FILE = "train_config.json"


def problem_for(dataset: Dataset, config: TrainConfig) -> Problem:
    """The training problem, refusing a classifier on regression data, the reverse, and label skew without labels."""
    if task.kind_of(config.model).regression != dataset.is_regression:
        fitting = [name for name, kind in task.KINDS.items() if kind.regression == dataset.is_regression]
        raise FedfheError(
            f"model {config.model} does not fit data set {dataset.name} "
            f"({'regression' if dataset.is_regression else 'classification'}); use one of: {', '.join(fitting)}"
        )
    if dataset.is_regression and config.clients > 1 and config.partitioning != "iid":
        raise FedfheError(f"{config.partitioning} partitioning skews class labels; {dataset.name} has none (use iid)")
    return Problem(config.model, dataset.classes, dataset.input_range, dataset.target_range)


def centralized_params(problem: Problem, dataset: Dataset, config: TrainConfig, engine: str = "sklearn") -> Any:
    """One fit on the whole training set with the estimator's own solver: scikit-learn's, or Concrete ML's.

    Returns the float weights in the scaled space and, for Concrete ML, its fitted (quantized) estimator.
    """
    X, y = problem.scale(dataset.X_train), problem.scale_target(dataset.y_train)
    params = task.resolve_params(config.model, config.params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if engine == "concrete":
            from fedfhe.fhe import concrete_class

            fitted = concrete_class(config.model)(**params).fit(X, y)
            weights = fitted.sklearn_model
        else:
            fitted = weights = task.kind_of(config.model).estimator(**params).fit(X, y)
    return [np.atleast_2d(weights.coef_), np.atleast_1d(weights.intercept_).astype(np.float64)], fitted


def train(
    dataset: Dataset,
    config: TrainConfig,
    out_dir: Path,
    on_round: RoundCallback | None = None,
    verbose: bool = False,
    resume: bool = False,
) -> LinearModel:
    """Train (federated when clients > 1), write metrics.json, plots and model.npz into out_dir.

    Federated runs checkpoint after every round; resume=True continues from the last one.
    """
    config.check(len(dataset.y_train))
    problem = problem_for(dataset, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out_dir / CONFIG_FILE).write_text(
            json.dumps({"dataset": dataset.name, "training": dataclasses.asdict(config)})
        )
    start = time.perf_counter()
    metrics: dict[str, Any] = {"rounds": []}
    if config.clients > 1:
        problem, params, metrics["rounds"] = _federate(dataset, problem, config, out_dir, on_round, verbose, resume)
        metrics["failures"] = sum(row.get("failures", 0) for row in metrics["rounds"])
    elif config.input_ranges == "clients":  # the one owner's shared ranges, with the test set's
        ranges = [task.shared_range(dataset.X_train), task.shared_range(dataset.X_test)]
        problem = dataclasses.replace(problem, input_range=task.merge_ranges(ranges))
    X_test = problem.scale(dataset.X_test)
    central, _ = centralized_params(problem, dataset, config)
    score, loss = task.evaluate(problem, central, X_test, dataset.y_test)
    metrics["centralized"] = {"score": score, "loss": loss}
    if config.engine == "concrete":
        params, fitted = centralized_params(problem, dataset, config, "concrete")
        # Concrete ML's own quantized model (calibrated on the training data), scored in the clear
        predicted = problem.unscale_target(fitted.predict(X_test))
        metrics["concrete_quantized"] = task.score(problem.kind.regression, dataset.y_test, predicted)
    elif config.clients == 1:
        params = central
    metrics["train_seconds"] = time.perf_counter() - start
    return save_model(dataset, problem, config, out_dir, params, metrics)


def save_model(
    dataset: Dataset,
    problem: Problem,
    config: TrainConfig,
    out_dir: Path,
    params: task.Params,
    metrics: dict[str, Any],
) -> LinearModel:
    """Score the final weights, then write metrics.json, training.png and model.npz."""
    score, loss = task.evaluate(problem, params, problem.scale(dataset.X_test), dataset.y_test)
    metrics["final"] = {"score": score, "loss": loss}
    metrics["score_names"] = list(task.score_names(config.model))
    if config.dp:
        metrics["privacy"] = privacy_spent(config)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if metrics.get("rounds"):
        plot_rounds(metrics, out_dir / "training.png")
    kept = ("centralized", "final", "score_names", "concrete_quantized", "train_seconds", "privacy")
    model = LinearModel(
        *problem.unscale(params),
        classes=dataset.classes,
        input_range=problem.input_range,
        kind=config.model,
        metadata={
            "dataset": dataset.name,
            "n_train": int(len(dataset.y_train)),
            "n_test": int(len(dataset.y_test)),
            "training": dataclasses.asdict(config),
            "local_fit": task.kind_of(config.model).local_fit if config.clients > 1 else "centralized",
            "metrics": {k: metrics[k] for k in kept if k in metrics},
        },
    )
    model.save(out_dir / MODEL_FILE)
    return model


def saved_config(run_dir: Path) -> tuple[str, TrainConfig]:
    """The data set name and training config a run was started with (for --resume)."""
    try:
        saved = json.loads((run_dir / CONFIG_FILE).read_text())
        return saved["dataset"], TrainConfig(**saved["training"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FedfheError(f"{run_dir}: not a resumable run ({exc})") from None


def privacy_spent(config: TrainConfig) -> dict[str, Any]:
    """Epsilon at the target delta after all rounds, from Flower's RDP accountant.

    Client-level DP (one client's whole data set is the unit protected). No amplification by
    sampling is claimed: conservative, and true whatever the client sampling.
    """
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=config.target_delta,
            population_size=config.clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    event = GaussianPrivacyEvent(config.noise_multiplier, config.sampled, config.clients)
    accountant.compose(event, count=config.rounds)
    epsilon = accountant.get_epsilon(config.target_delta) if config.noise_multiplier > 0 else float("inf")
    return {
        "epsilon": epsilon,
        "delta": config.target_delta,
        "noise_multiplier": config.noise_multiplier,
        "clipping_norm": config.clipping_norm,
        "unit": "client",
    }


def _federate(
    dataset: Dataset,
    problem: Problem,
    config: TrainConfig,
    out_dir: Path,
    on_round: RoundCallback | None,
    verbose: bool,
    resume: bool,
) -> tuple[Problem, task.Params, list[dict[str, Any]]]:
    """Partition, run the Flower simulation (from the last checkpoint when resuming), collect metrics.

    Returns the problem the federation agreed on (its input ranges may come from the owners).
    """
    from fedfhe.federated.simulation import simulate

    parts = partition(dataset.y_train, config.clients, config.partitioning, config.alpha, config.seed)
    save_partitions(dataset.X_train, dataset.y_train, parts, out_dir / "partitions")
    if not dataset.is_regression:
        counts = label_counts(dataset.y_train, parts, dataset.classes)
        plot_label_distribution(counts, dataset.classes, out_dir / "partitions.png")
    checkpoints = out_dir / "checkpoints"
    start, log = None, RoundLog()
    if resume:
        done, params, log, input_range = load_checkpoint(checkpoints)
        problem = dataclasses.replace(problem, input_range=input_range)
        if done >= config.rounds:
            return problem, params, [log.rows[r] for r in sorted(log.rows)]
        start = (done, params)
    elif checkpoints.exists():
        shutil.rmtree(checkpoints)
    outcome = Outcome()
    main = make_server_main(config, problem, dataset.X_test, dataset.y_test, checkpoints, log, outcome, start, on_round)
    simulate(config, main, out_dir / "partitions", verbose)
    if outcome.params is None or outcome.problem is None:
        raise RuntimeError("the Flower simulation ended without a model")
    return outcome.problem, outcome.params, [log.rows[r] for r in sorted(log.rows)]


def plot_rounds(metrics: dict[str, Any], path: Path) -> None:
    """Score and loss per round: global (server test set), each client, and the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = metrics["rounds"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, name in zip(axes, ("score", "loss"), metrics["score_names"]):
        xs = [row["round"] for row in rounds]
        ax.plot(xs, [row["global"][key] for row in rounds], "o-", color="black", label="global (test set)", zorder=3)
        per_client: dict[int, list[tuple[int, float]]] = {}
        for row in rounds:
            for c in row.get("clients", []):
                per_client.setdefault(c["client"], []).append((row["round"], c[key]))
        for i, (_, points) in enumerate(sorted(per_client.items())):
            ax.plot(*zip(*points), "-", alpha=0.35, lw=1, label="clients (local data)" if i == 0 else None)
        if "centralized" in metrics:
            ax.axhline(metrics["centralized"][key], ls="--", color="tab:red", label="centralized baseline")
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    fig.suptitle("Federated training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
