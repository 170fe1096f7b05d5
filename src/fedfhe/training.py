"""Train a model, federated or centrally, and save it with its metrics and plots in a run directory."""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from fedfhe.data import Dataset
from fedfhe.federated import task
from fedfhe.federated.task import TrainConfig
from fedfhe.model import LinearModel
from fedfhe.partition import label_counts, partition, plot_label_distribution, save_partitions

MODEL_FILE = "model.npz"
CENTRAL_MAX_ITER = 1000


def centralized_params(dataset: Dataset, C: float) -> task.Params:
    """The scikit-learn baseline: one fit on the whole training set, run to convergence."""
    model = LogisticRegression(C=C, max_iter=CENTRAL_MAX_ITER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        model.fit(task.scale(dataset.X_train, dataset.input_range), dataset.y_train)
    return [model.coef_, model.intercept_]


def train(
    dataset: Dataset,
    config: TrainConfig,
    out_dir: Path,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
    verbose: bool = False,
) -> LinearModel:
    """Train (federated when clients > 1), write metrics.json, plots and model.npz into out_dir."""
    config.check(len(dataset.y_train))
    out_dir.mkdir(parents=True, exist_ok=True)
    X_test = task.scale(dataset.X_test, dataset.input_range)
    start = time.perf_counter()
    central = centralized_params(dataset, config.C)
    central_acc, central_loss = task.evaluate(central, X_test, dataset.y_test, dataset.classes)
    metrics: dict[str, Any] = {"centralized": {"accuracy": central_acc, "loss": central_loss}, "rounds": []}
    if config.clients == 1:
        params = central
    else:
        params, metrics["rounds"] = _federate(dataset, config, out_dir, on_round, verbose)
    accuracy, loss = task.evaluate(params, X_test, dataset.y_test, dataset.classes)
    metrics["final"] = {"accuracy": accuracy, "loss": loss}
    metrics["train_seconds"] = time.perf_counter() - start
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if metrics["rounds"]:
        plot_rounds(metrics, out_dir / "training.png")
    model = LinearModel(
        *task.unscale(params[0], params[1], dataset.input_range),
        classes=dataset.classes,
        input_range=dataset.input_range,
        metadata={
            "dataset": dataset.name,
            "n_train": int(len(dataset.y_train)),
            "n_test": int(len(dataset.y_test)),
            "training": dataclasses.asdict(config),
            "metrics": {k: metrics[k] for k in ("centralized", "final", "train_seconds")},
        },
    )
    model.save(out_dir / MODEL_FILE)
    return model


def _federate(
    dataset: Dataset,
    config: TrainConfig,
    out_dir: Path,
    on_round: Callable[[int, dict[str, float]], None] | None,
    verbose: bool,
) -> tuple[task.Params, list[dict[str, Any]]]:
    """Partition, run the Flower simulation, and collect per-round metrics."""
    from fedfhe.federated.simulation import simulate

    parts = partition(dataset.y_train, config.clients, config.partitioning, config.alpha, config.seed)
    save_partitions(dataset.X_train, dataset.y_train, parts, out_dir / "partitions")
    counts = label_counts(dataset.y_train, parts, dataset.classes)
    plot_label_distribution(counts, dataset.classes, out_dir / "partitions.png")
    result = simulate(
        dataset,
        config,
        out_dir / "partitions",
        on_round=None if on_round is None else (lambda r, m: on_round(r, dict(m))),
        verbose=verbose,
    )
    rounds = []
    for r, central in sorted(result.evaluate_metrics_serverapp.items()):
        row: dict[str, Any] = {"round": r, "global": dict(central)}
        if r in result.evaluate_metrics_clientapp:
            clients = result.evaluate_metrics_clientapp[r]
            row["clients_mean"] = {"accuracy": clients["accuracy"], "loss": clients["loss"]}
            row["clients"] = [
                {"client": c, "accuracy": a, "loss": l}
                for c, a, l in zip(clients["clients"], clients["client-accuracy"], clients["client-loss"])
            ]
        if r in result.train_metrics_clientapp:
            row["train"] = dict(result.train_metrics_clientapp[r])
        rounds.append(row)
    return result.arrays.to_numpy_ndarrays(), rounds


def plot_rounds(metrics: dict[str, Any], path: Path) -> None:
    """Accuracy and loss per round: global (server test set), each client, and the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = metrics["rounds"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("accuracy", "loss")):
        xs = [row["round"] for row in rounds]
        ax.plot(xs, [row["global"][key] for row in rounds], "o-", color="black", label="global (test set)", zorder=3)
        per_client: dict[int, list[tuple[int, float]]] = {}
        for row in rounds:
            for c in row.get("clients", []):
                per_client.setdefault(c["client"], []).append((row["round"], c[key]))
        for i, (_, points) in enumerate(sorted(per_client.items())):
            ax.plot(*zip(*points), "-", alpha=0.35, lw=1, label="clients (local data)" if i == 0 else None)
        ax.axhline(metrics["centralized"][key], ls="--", color="tab:red", label="centralized baseline")
        ax.set_xlabel("round")
        ax.set_ylabel(key)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize="small")
    fig.suptitle("Federated training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
