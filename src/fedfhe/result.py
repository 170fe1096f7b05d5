"""The end of every training, whichever engine ran it: final score, model file, metrics and their plot."""

from __future__ import annotations

import dataclasses
from typing import Any

from fedfhe.config import TrainConfig
from fedfhe.data import Dataset, bundled_names, bundled_positive
from fedfhe.kinds import Params
from fedfhe.model import LinearModel
from fedfhe.objective import evaluate
from fedfhe.problem import Problem
from fedfhe.rundir import RunDir
from fedfhe.table import Schema

MAX_NAMED = 10_000  # features whose names the model file keeps (MNIST's 784 pixels: 12 KB)
KEPT = ("centralized", "final", "score_names", "concrete_quantized", "train_seconds", "privacy")  # in model.npz


def save(
    run: RunDir, dataset: Dataset, problem: Problem, config: TrainConfig, params: Params, metrics: dict[str, Any]
) -> LinearModel:
    """Score the final weights on the test split, then write metrics.json, training.png and model.npz."""
    score, loss = evaluate(problem, params, problem.scale(dataset.X_test), dataset.y_test)
    metrics["final"] = {"score": score, "loss": loss}
    metrics["score_names"] = list(problem.kind.score_names)
    run.write_metrics(metrics)
    if metrics.get("rounds"):
        plot_rounds(metrics, run)
    coef, intercept = problem.unscale(params)
    model = LinearModel(
        coef,
        intercept,
        classes=dataset.classes,
        input_range=problem.input_range,
        kind=problem.kind,
        metadata={
            "dataset": dataset.name,
            "n_train": len(dataset.y_train) or _examples(metrics),
            "n_test": len(dataset.y_test),
            "training": dataclasses.asdict(config),
            "local_fit": problem.kind.local_fit if config.clients > 1 else "centralized",
            "metrics": {k: metrics[k] for k in KEPT if k in metrics},
            **({"schema": dataset.schema} if dataset.schema is not None else {}),
            **({"observed_range": metrics["observed_range"]} if "observed_range" in metrics else {}),
            **({"filled": {**metrics.get("filled", {}), **dataset.filled}} if dataset.filled is not None else {}),
            **({"leakage": dataset.leakage} if dataset.leakage is not None else {}),
            **names(dataset),
        },
    )
    run.save_model(model)
    return model


def names(dataset: Dataset) -> dict[str, Any]:
    """Feature names (unless there are too many to keep in the model file), class names and the positive class."""
    if dataset.schema is not None:
        schema = Schema.from_dict(dataset.schema)
        features, classes = schema.encoded_names, [schema.class_names[int(c)] for c in dataset.classes]
        positive = schema.positive_name
    else:
        features, classes = bundled_names(dataset.name, dataset.n_features, dataset.classes)
        positive = bundled_positive(dataset.name)
    named: dict[str, Any] = {"feature_names": features} if len(features) <= MAX_NAMED else {}
    return {**named, "class_names": classes, **({"positive_class": positive} if positive is not None else {})}


def _examples(metrics: dict[str, Any]) -> int:
    """The training rows the clients reported in the last round: what a deployed server knows of them."""
    rounds = metrics.get("rounds") or [{}]
    return sum(int(c.get("examples", 0)) for c in rounds[-1].get("clients", []))


def plot_rounds(metrics: dict[str, Any], run: RunDir) -> None:
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
    fig.savefig(run.training_plot, dpi=100)
    plt.close(fig)
