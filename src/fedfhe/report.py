"""The run's summary: report.json for machines, report.md for people, a confusion matrix plot."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedfhe import decision, leakage, quality, table
from fedfhe.artifacts import n_bits_label
from fedfhe.fhe import CompiledModel
from fedfhe.rundir import RunDir, md_cell

SCORES = ("accuracy", "r2", "mse")


def build(
    compiled: CompiledModel,
    evaluation: dict[str, Any],
    fhe_samples: int,
    data: str | None = None,
    positive_class: str | None = None,
) -> dict[str, Any]:
    """Gather training metadata, compilation facts and evaluation results into one record.

    `data` is the labelled file evaluated on, if not the run's test split; `positive_class` (a name or
    number, default the class the model names) is what sensitivity, PPV and AUC are about for two classes.
    """
    model = compiled.source
    meta = model.metadata
    training = meta.get("training", {})
    metrics = meta.get("metrics", {})
    # training scored the float model by accuracy (or R2: "score") and, for regressors, MSE ("loss"), on the
    # run's test split: beside a file's figures they would read as that file's, so a file's report leaves them out
    trained = (
        {"centralized": metrics.get("centralized", {}), "federated": metrics.get("final", {})} if data is None else {}
    )
    if decision.point_of(model) is not None and trained:  # training scored the most probable class: not comparable
        trained = {"federated": {"score": evaluation["accuracy"]["sklearn"]}}  # the float model at the operating point
    groups = {"accuracy": "score"} if "accuracy" in evaluation else {"r2": "score", "mse": "loss"}
    scores = {}
    for name, key in groups.items():
        scores[name] = {
            **{stage: values.get(key) for stage, values in trained.items()},
            **{k: v for k, v in evaluation[name].items() if k != "sklearn"},
        }
    return {
        "dataset": meta.get("dataset"),
        "evaluated_on": data or "test split",
        "model": compiled.source.kind.name,
        "classes": [int(c) for c in compiled.source.classes],
        "class_names": compiled.source.class_names,
        "n_train": meta.get("n_train"),
        "n_test": len(evaluation["predictions"]["y_true"]),
        "clients": training.get("clients"),
        "rounds": training.get("rounds") if training.get("clients", 1) > 1 else 0,
        "fhe_samples": fhe_samples,
        "n_bits": compiled.n_bits,
        "outputs": compiled.outputs,
        "calibration": compiled.calibration,
        "model_sha256": compiled.source.sha256,
        **scores,
        "metrics": _quality(model, evaluation["predictions"], positive_class, data or "test split"),
        "agreement": evaluation["agreement"],
        "timing_s": {
            **({"train": metrics.get("train_seconds")} if data is None else {}),
            "compile": compiled.compile_seconds,
            **{k: v for k, v in evaluation["timing_s"].items() if not k.endswith("_bytes")},
        },
        "bytes": {k: v for k, v in evaluation["timing_s"].items() if k.endswith("_bytes")},
        "circuit": {"max_bit_width": compiled.max_bit_width, "bootstraps": compiled.bootstraps},
        "privacy": metrics.get("privacy"),
        "training": training,
        **({"filled": meta["filled"], "missing": table.missing_rules(meta["schema"])} if "filled" in meta else {}),
        **({"leakage": meta["leakage"]} if "leakage" in meta and data is None else {}),  # about the run's own rows
    }


def _quality(model: Any, predictions: dict[str, Any], positive_class: str | None, rows: str) -> dict[str, Any]:
    """The figures with intervals, on the FHE outputs (simulated: equal to the decrypted ones, see agreement).

    They are at the model's operating point; when it was chosen on these very `rows`, they say so.
    """
    y, pred = np.array(predictions["y_true"]), np.array(predictions["fhe_simulate"])
    if model.is_regression:
        return quality.regressor(y, pred)
    classes = [int(c) for c in model.classes]
    named = model.metadata.get("positive_class")
    positive = quality.positive_index(positive_class, classes, model.class_names, named) if len(classes) == 2 else 0
    proba = np.array(predictions["fhe_simulate_proba"]) if "fhe_simulate_proba" in predictions else None
    rule = decision.describe(model, rows)
    logistic = model.kind.name == "logistic"
    return quality.classifier(y, pred, proba, classes, model.class_names, positive, logistic, rule)


def write(run: RunDir, report: dict[str, Any], evaluation: dict[str, Any]) -> None:
    """Write report.json, report.md, evaluation.json and the confusion matrix (or prediction plot)."""
    run.evaluation_file.write_text(json.dumps(evaluation, indent=2))
    run.report_json.write_text(json.dumps(report, indent=2))
    run.report_md.write_text(markdown(report))
    preds = evaluation["predictions"]
    y_true, y_pred = np.array(preds["y_true"]), np.array(preds["fhe_simulate"])
    if "accuracy" in evaluation:
        plot_confusion(y_true, y_pred, run.confusion_plot, dict(zip(report["classes"], report["class_names"])))
        if "auc" in report["metrics"]:
            positive = report["class_names"].index(report["metrics"]["positive_class"])
            hit = y_true == report["classes"][positive]
            plot_roc(hit, np.array(preds["fhe_simulate_proba"])[:, positive], report["metrics"], run.roc_plot)
    else:
        plot_predictions(y_true, y_pred, run.predictions_plot)
        plot_residuals(y_true, y_pred, run.residuals_plot)


def _fmt(value: Any, percent: bool = False) -> str:
    """Percentages with two decimals, seconds with three significant digits, n/a for missing."""
    if value is None:
        return "n/a"
    if percent:
        return f"{100 * value:.2f}%"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    agree, timing = report["agreement"], report["timing_s"]
    scores = []
    for group in SCORES:
        if group in report:
            scores += [f"| {group} | value |", "|---|---|"]
            scores += [
                f"| {score_label(name, report['fhe_samples'])} | {_fmt(v, percent=group == 'accuracy')} |"
                for name, v in report[group].items()
            ]
            scores.append("")
    shared = report["training"].get("input_ranges") == "clients"
    ranges = "the owners' shared (rounded) min/max" if shared else "the declared schema"
    evaluated = (
        f"{report['n_test']} test samples"
        if report.get("evaluated_on", "test split") == "test split"
        else f"evaluated on {report['evaluated_on']} ({report['n_test']} rows)"
    )
    warning = report.get("metrics", {}).get("warning")
    lines = [
        f"# {title(report)}",
        "",
        *([f"**Warning:** {warning}.", ""] if warning else []),
        *_figures(report.get("metrics", {})),
        "",
        (
            f"{report['n_train']} training samples, {evaluated}, {report['clients']} client(s), "
            f"{report['rounds']} round(s), input ranges from {ranges}, n_bits {n_bits_label(report['n_bits'])}, "
            f"compiled on {report['calibration']}, largest circuit integer {report['circuit']['max_bit_width']} bits, "
            + (
                "label outputs: the circuit returns the class only, so a client never sees the scores."
                if report.get("outputs") == "label"
                else "scores outputs: a client decrypts the model's scores."
            )
        ),
        "",
        *scores,
        "| agreement | value |",
        "|---|---|",
        *(f"| {name} | {_fmt(agree[name], percent=True)} |" for name in agree),
        "",
        "| time (s) | value |",
        "|---|---|",
        *(f"| {name} | {_fmt(timing[name])} |" for name in timing),
        "",
        "| size (bytes) | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in report["bytes"].items()),
        "",
        f"FHE execute ran on the first {report['fhe_samples']} test samples; simulate on all of them.",
        "",
    ]
    training, privacy = report["training"], report["privacy"]
    lines.append(
        f"Training: strategy {training.get('strategy', 'fedavg')}, secure aggregation "
        f"{'on (SecAgg+)' if training.get('secagg') else 'off'}, differential privacy "
        + (
            f"on: epsilon {privacy['epsilon']:.3g} at delta {privacy['delta']:g} (noise multiplier "
            f"{privacy['noise_multiplier']:.3g}, {privacy.get('clipping', 'fixed')} clipping norm "
            f"{privacy['clipping_norm']:.3g} at the end, per client; sampling: {privacy.get('sampling', 'fixed-size')})."
            if privacy
            else "off."
        )
    )
    if "leakage" in report:
        found = leakage.describe(report["leakage"])
        lines += ["", f"Leakage check by row hashes (sha256 of each encoded row with its label): {found}."]
    lines.append("")
    if "filled" in report:
        rules = "; ".join(report["missing"]) or "every missing cell is refused"
        filled = table.filled_line(report["filled"])
        lines += [f"Missing cells in training, filled as the schema declares: {filled} ({rules}).", ""]
    return "\n".join(lines)


def score_label(name: str, fhe_samples: int) -> str:
    """A score's row in a table: real FHE and its clear twin say which rows they were measured on."""
    return {
        "fhe_execute": f"fhe_execute, on the first {fhe_samples} rows",
        "fhe_clear_on_execute_rows": f"fhe_clear, on the same {fhe_samples} rows",
    }.get(name, name)


def title(report: dict[str, Any]) -> str:
    """What a report is about: the run on its test split, or a file and the very model (by hash) that scored it."""
    if report.get("evaluated_on", "test split") == "test split":
        return f"fedfhe run: {report['model']} on {report['dataset']}"
    model = f"{report['model']} model {report['model_sha256'][:12]}, n_bits {n_bits_label(report['n_bits'])}"
    return f"fedfhe evaluation of {Path(report['evaluated_on']).name}: {model} (trained on {report['dataset']})"


def _figures(metrics: dict[str, Any]) -> list[str]:
    """The figures with intervals as a Markdown table: value, 95% interval, counts (k/n, or rows)."""
    if not metrics:
        return []

    def row(name: str, f: dict[str, Any]) -> str:
        shown = [("n/a" if f[k] is None else f"{f[k]:.4g}") for k in ("value", "low", "high")]
        return f"| {md_cell(name)} | {shown[0]} | {shown[1]} to {shown[2]} | {quality.counts(f)} |"

    lines = ["| figure (FHE outputs) | value | 95% interval | counts |", "|---|---|---|---|"]
    lines += [row(name, f) for name, f in quality.entries(metrics)]
    decision = metrics.get("decision")
    notes = (
        "Intervals: exact (Clopper-Pearson) for proportions, shown with their counts k/n (recall: of the class's "
        "rows; precision: of the rows predicted as it); bootstrap percentiles over the evaluated rows (1,000 "
        "resamples, seed 0) for balanced accuracy, AUC, PR-AUC and Brier."
        + (f" Decision: {decision}." if decision else "")
    )
    return [*lines, "", notes, ""]


@contextlib.contextmanager
def _saved(path: Path, **layout: Any) -> Iterator[Any]:
    """Axes of a new headless matplotlib figure, laid out and saved to `path` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**layout)
    try:
        yield axes
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def plot_roc(hit: np.ndarray, score: np.ndarray, metrics: dict[str, Any], path: Path) -> None:
    """ROC curve of the positive class's decrypted score, and how its probabilities match the observed rates."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_curve

    with _saved(path, ncols=2, figsize=(11, 4.8)) as (roc, calibration):
        fpr, tpr, _ = roc_curve(hit, score)
        auc = metrics["auc"]
        roc.plot(fpr, tpr, color="tab:blue", label=f"AUC {quality.shown(auc)}")
        roc.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        roc.set_xlabel("1 - specificity")
        roc.set_ylabel("sensitivity")
        roc.set_title(f"ROC, positive class {metrics['positive_class']} ({auc['rows']} rows)")
        roc.legend(loc="lower right")
        observed, predicted = calibration_curve(hit, score, n_bins=10, strategy="quantile")
        brier = (
            f", Brier {quality.shown(metrics['brier'])}" if "brier" in metrics else " (SVM scores: not probabilities)"
        )
        calibration.plot(predicted, observed, "o-", color="tab:orange")
        calibration.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        calibration.set_xlabel(f"predicted probability of {metrics['positive_class']}")
        calibration.set_ylabel("observed rate")
        calibration.set_title(f"Calibration{brier}", fontsize="medium")
        for ax in (roc, calibration):
            ax.grid(alpha=0.3)


def plot_residuals(y_true: np.ndarray, y_pred: np.ndarray, path: Path) -> None:
    """A regressor's errors against its predictions: a pattern here is what the linear model misses."""
    with _saved(path, figsize=(6, 4.5)) as ax:
        ax.scatter(y_pred, y_true - y_pred, s=12, alpha=0.6)
        ax.axhline(0, ls="--", color="grey", lw=1)
        ax.set_xlabel("FHE prediction")
        ax.set_ylabel("true - predicted")
        ax.set_title(f"Residuals ({len(y_true)} rows)")
        ax.grid(alpha=0.3)


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, path: Path, names: dict[int, str] | None = None) -> None:
    """Confusion matrix of the FHE predictions, its classes named (e.g. malignant, benign) when known."""
    from sklearn.metrics import ConfusionMatrixDisplay

    with _saved(path, figsize=(6, 5.5)) as ax:
        shown = np.unique(np.concatenate([y_true, y_pred]))
        labels = [names.get(int(c), str(c)) for c in shown] if names else None
        ConfusionMatrixDisplay.from_predictions(
            y_true, y_pred, ax=ax, colorbar=False, cmap="Blues", labels=shown, display_labels=labels
        )
        ax.set_title(f"FHE predictions (accuracy {np.mean(y_true == y_pred):.1%})")


def plot_predictions(y_true: np.ndarray, y_pred: np.ndarray, path: Path) -> None:
    """A regressor's FHE predictions against the true values, with the identity line."""
    from sklearn.metrics import r2_score

    with _saved(path, figsize=(5.5, 5)) as ax:
        ax.scatter(y_true, y_pred, s=12, alpha=0.6)
        low, high = min(y_true.min(), y_pred.min()), max(y_true.max(), y_pred.max())
        ax.plot([low, high], [low, high], "--", color="grey", lw=1)
        ax.set_xlabel("true value")
        ax.set_ylabel("FHE prediction")
        ax.set_title(f"FHE predictions (R2 {r2_score(y_true, y_pred):.3f})")
        ax.grid(alpha=0.3)
