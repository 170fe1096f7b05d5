"""Train a model, federated or centrally, and save it with its metrics and plots in a run directory."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from fedfhe.data import Dataset
from fedfhe.federated import task
from fedfhe.errors import FedfheError
from fedfhe.federated.server_app import RoundCallback, RoundLog, load_checkpoint, make_server_main
from fedfhe.federated.task import TrainConfig
from fedfhe.model import MODEL_FILE, LinearModel
from fedfhe.partition import label_counts, partition, plot_label_distribution, save_partitions

CONFIG_FILE = "train_config.json"
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
    on_round: RoundCallback | None = None,
    verbose: bool = False,
    resume: bool = False,
) -> LinearModel:
    """Train (federated when clients > 1), write metrics.json, plots and model.npz into out_dir.

    Federated runs checkpoint after every round; resume=True continues from the last one.
    """
    config.check(len(dataset.y_train))
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out_dir / CONFIG_FILE).write_text(
            json.dumps({"dataset": dataset.name, "training": dataclasses.asdict(config)})
        )
    X_test = task.scale(dataset.X_test, dataset.input_range)
    start = time.perf_counter()
    central = centralized_params(dataset, config.C)
    central_acc, central_loss = task.evaluate(central, X_test, dataset.y_test, dataset.classes)
    metrics: dict[str, Any] = {"centralized": {"accuracy": central_acc, "loss": central_loss}, "rounds": []}
    if config.clients == 1:
        params = central
    else:
        params, metrics["rounds"] = _federate(dataset, config, out_dir, on_round, verbose, resume)
        metrics["failures"] = sum(row.get("failures", 0) for row in metrics["rounds"])
    metrics["train_seconds"] = time.perf_counter() - start
    return save_model(dataset, config, out_dir, params, metrics)


def save_model(
    dataset: Dataset, config: TrainConfig, out_dir: Path, params: task.Params, metrics: dict[str, Any]
) -> LinearModel:
    """Score the final weights, then write metrics.json, training.png and model.npz."""
    accuracy, loss = task.evaluate(
        params, task.scale(dataset.X_test, dataset.input_range), dataset.y_test, dataset.classes
    )
    metrics["final"] = {"accuracy": accuracy, "loss": loss}
    if config.dp:
        metrics["privacy"] = privacy_spent(config)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if metrics.get("rounds"):
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
            "metrics": {k: metrics[k] for k in ("centralized", "final", "train_seconds", "privacy") if k in metrics},
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
    config: TrainConfig,
    out_dir: Path,
    on_round: RoundCallback | None,
    verbose: bool,
    resume: bool,
) -> tuple[task.Params, list[dict[str, Any]]]:
    """Partition, run the Flower simulation (from the last checkpoint when resuming), collect metrics."""
    from fedfhe.federated.simulation import simulate

    parts = partition(dataset.y_train, config.clients, config.partitioning, config.alpha, config.seed)
    save_partitions(dataset.X_train, dataset.y_train, parts, out_dir / "partitions")
    counts = label_counts(dataset.y_train, parts, dataset.classes)
    plot_label_distribution(counts, dataset.classes, out_dir / "partitions.png")
    checkpoints = out_dir / "checkpoints"
    start, log = None, RoundLog()
    if resume:
        done, params, log = load_checkpoint(checkpoints)
        if done >= config.rounds:
            return params, [log.rows[r] for r in sorted(log.rows)]
        start = (done, params)
    elif checkpoints.exists():
        shutil.rmtree(checkpoints)
    final: list[task.Params] = []
    main = make_server_main(
        config,
        dataset.X_test,
        dataset.y_test,
        dataset.classes,
        dataset.input_range,
        checkpoints,
        log,
        final,
        start,
        on_round,
    )
    simulate(config, main, out_dir / "partitions", verbose)
    if not final:
        raise RuntimeError("the Flower simulation ended without a model")
    return final[0], [log.rows[r] for r in sorted(log.rows)]


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
        if "centralized" in metrics:
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
