"""Trade a score against FHE cost: sweep quantization bits (and a regularisation strength), pick one.

Points are scored by one metric on the same test rows in FHE simulation. Among the points within the
metric's tolerance of the best, the cheapest circuit wins: fewest programmable bootstraps per row, then
the narrowest circuit, then the fewest input bits, then weight bits; only then the fastest server run
(the minimum of --latency-samples real FHE runs), never one noisy measurement.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    mean_absolute_error,
    r2_score,
    roc_auc_score,
    roc_curve,
)
from sklearn.model_selection import ParameterGrid

from fedfhe import fhe, quality
from fedfhe.artifacts import N_BITS_RANGE, NBits, bit_pair, n_bits_label, n_bits_of
from fedfhe.data import check_features
from fedfhe.errors import FedfheError, unknown
from fedfhe.model import LinearModel
from fedfhe.rundir import RunDir

DEFAULT_GRID = {"n_bits": [2, 3, 4, 5, 6, 7, 8]}
TOLERANCE = 0.005  # as good: within half a point of the best, for every metric on a 0-1 scale
RELATIVE_TOLERANCE = 0.01  # an error in the target's units (MAE): within 1% of the best
SENSITIVITY = "sensitivity@specificity="
NAMES = ("auc", "pr-auc", "balanced-accuracy", f"{SENSITIVITY}S", "accuracy", "r2", "mae")
EXACT = 1e-12  # a score exactly at the tolerance's edge counts as within it, whatever the float rounding
# How the as-good points are ranked, in order: their cost whatever the machine (see `cost`), then their timing.
RANKS = (
    "fewest bootstraps ({})",
    "narrowest circuit ({} bits)",
    "fewest input bits ({})",
    "fewest weight bits ({})",
    "fastest server run ({:.2f} ms)",
)


@dataclass(frozen=True)
class Metric:
    """A tuning score: how it is computed from a circuit's outputs, which way is better, what counts as as good.

    `statistic` takes the truth and the predictions, or for a `scored` metric whether each row is of
    the positive class and that class's probability.
    """

    name: str  # as --metric takes it: auc, sensitivity@specificity=0.9
    title: str  # as tables show it: AUC, sensitivity at specificity 0.9
    statistic: Callable[[np.ndarray, np.ndarray], float]
    tolerance: float = TOLERANCE  # absolute; relative to the best where lower is better (an error)
    higher: bool = True
    scored: bool = False  # needs the positive class's score: two classes, scores outputs
    regression: bool = False
    positive: str | None = None  # the positive class's name, once bound to a model (scored metrics)

    @property
    def named(self) -> str:
        """The title with the class it is about: AUC of malignant."""
        return self.title if self.positive is None else f"{self.title} of {self.positive}"

    @property
    def margin(self) -> str:
        """The tolerance as people read it: 0.005, or 1% of the best."""
        return f"{self.tolerance:g}" if self.higher else f"{self.tolerance:.0%}"

    def as_good(self, value: float, best: float) -> bool:
        """Whether a score counts as good as the best one: within the tolerance of it."""
        if self.higher:
            return value >= best - self.tolerance - EXACT
        return value <= best * (1 + self.tolerance) + EXACT

    def score(self, compiled: fhe.CompiledModel, X: np.ndarray, y: np.ndarray) -> float:
        """The metric of the circuit's simulated FHE outputs on these rows."""
        model = compiled.source
        if model.is_regression:
            return self.statistic(y, compiled.predict(X, fhe="simulate"))
        predicted, proba = compiled.classify(X, fhe="simulate")
        if self.positive is None:
            return self.statistic(y, predicted)
        assert proba is not None  # scored metrics are refused for label outputs (metric_for)
        index = model.class_names.index(self.positive)
        return self.statistic(y == model.classes[index], proba[:, index])

    def record(self) -> dict[str, Any]:
        """What tune.json says about the metric."""
        return {
            "name": self.name,
            "title": self.title,
            "higher_is_better": self.higher,
            "tolerance": self.tolerance,
            "tolerance_is": "absolute" if self.higher else "relative to the best",
            "positive_class": self.positive,
        }


def _auc(hit: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of the positive class's score (ties count half, as in the report)."""
    return float(roc_auc_score(hit, score))


def _pr_auc(hit: np.ndarray, score: np.ndarray) -> float:
    """Average precision of the positive class's score (the report's PR-AUC)."""
    return float(average_precision_score(hit, score))


def _sensitivity_at(specificity: float) -> Callable[[np.ndarray, np.ndarray], float]:
    """The best sensitivity of a threshold on the positive class's score whose specificity is at least `specificity`."""

    def statistic(hit: np.ndarray, score: np.ndarray) -> float:
        false, true, _ = roc_curve(hit, score, drop_intermediate=False)
        return float(true[1 - false >= specificity - EXACT].max())

    return statistic


def _balanced_accuracy(y: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes: a rare class counts as much as a common one."""
    return float(balanced_accuracy_score(y, predicted))


def _accuracy(y: np.ndarray, predicted: np.ndarray) -> float:
    """Share of rows whose class is right."""
    return float(accuracy_score(y, predicted))


def _r2(y: np.ndarray, predicted: np.ndarray) -> float:
    """Share of the target's variance the predictions explain."""
    return float(r2_score(y, predicted))


def _mae(y: np.ndarray, predicted: np.ndarray) -> float:
    """Mean absolute error, in the target's units."""
    return float(mean_absolute_error(y, predicted))


METRICS = {
    metric.name: metric
    for metric in (
        Metric("auc", "AUC", _auc, scored=True),
        Metric("pr-auc", "PR-AUC", _pr_auc, scored=True),
        Metric("balanced-accuracy", "balanced accuracy", _balanced_accuracy),
        Metric("accuracy", "accuracy", _accuracy),
        Metric("r2", "R2", _r2, regression=True),
        Metric("mae", "MAE", _mae, RELATIVE_TOLERANCE, higher=False, regression=True),
    )
}


def parse_metric(text: str) -> Metric:
    """--metric (in any case): one of NAMES, sensitivity@specificity=S for any fraction S in (0, 1)."""
    text = text.lower()
    if text.startswith(SENSITIVITY):
        try:
            specificity = float(text.removeprefix(SENSITIVITY))
        except ValueError:
            specificity = float("nan")
        if not 0 < specificity < 1:
            raise FedfheError(f"--metric {SENSITIVITY}S takes a fraction S between 0 and 1 (got {text!r})")
        title = f"sensitivity at specificity {specificity:g}"
        return Metric(f"{SENSITIVITY}{specificity:g}", title, _sensitivity_at(specificity), scored=True)
    if text not in METRICS:
        raise unknown("metric", text, NAMES)
    return METRICS[text]


def metric_for(text: str | None, model: LinearModel, outputs: str, positive_class: str | None = None) -> Metric:
    """--metric checked against the model, or its default: AUC for two classes, balanced accuracy for more
    (and for label outputs, which send no score), R2 for a regressor; bound to the positive class it is about."""
    two = len(model.classes) == 2
    if text is None:
        text = "r2" if model.is_regression else "auc" if two and outputs == "scores" else "balanced-accuracy"
    metric = parse_metric(text)
    if metric.regression != model.is_regression:
        takes = [n for n in NAMES if (n in METRICS and METRICS[n].regression) == model.is_regression]
        task = "regressors" if metric.regression else "classifiers"
        raise FedfheError(f"--metric {metric.name} applies to {task}; this model takes: {', '.join(takes)}")
    if not metric.scored:
        return metric
    instead = "use balanced-accuracy or accuracy"
    if not two:
        raise FedfheError(
            f"--metric {metric.name} applies to two classes; this model has {len(model.classes)}: {instead}"
        )
    if outputs == "label":
        raise FedfheError(f"--metric {metric.name} needs scores; label outputs send the class only: {instead}")
    named = model.metadata.get("positive_class")
    if positive_class is None and named is None:
        raise FedfheError(
            f"--metric {metric.name} is about a positive class and the model names none: give --positive-class "
            f"({' or '.join(model.class_names)}), or {instead}"
        )
    index = quality.positive_index(positive_class, [int(c) for c in model.classes], model.class_names, named)
    return dataclasses.replace(metric, positive=model.class_names[index])


def measure(
    model: LinearModel,
    n_bits: NBits,
    X: np.ndarray,
    y: np.ndarray,
    latency_samples: int,
    metric: Metric,
    outputs: str = "scores",
) -> dict[str, Any]:
    """One grid point: the metric in FHE simulation on all rows; real FHE latency and sizes on a few."""
    compiled = fhe.compile_model(model, n_bits, outputs=outputs)
    score = metric.score(compiled, X, y)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = fhe.export(compiled, Path(tmp))
        _, timings = fhe.execute(artifacts, compiled, X[:latency_samples])
    return {
        "n_bits": n_bits,
        "outputs": outputs,
        "score": score,
        "rows": len(y),
        "bootstraps": compiled.bootstraps,
        "max_bit_width": compiled.max_bit_width,
        "server_ms": 1000 * timings["server_run_fastest"],
        "server_runs": latency_samples,
        "encrypt_ms": 1000 * timings["encrypt_per_sample"],
        "input_bytes": timings["input_ciphertext_bytes"],
        "output_bytes": timings["output_ciphertext_bytes"],
        "key_bytes": timings["evaluation_key_bytes"],
    }


def tune(
    model: LinearModel,
    X: np.ndarray,
    y: np.ndarray,
    grid: dict[str, list[Any]] = DEFAULT_GRID,
    latency_samples: int = 5,
    on_point: Callable[[int], None] | None = None,
    retrain: Callable[[str, float], LinearModel] | None = None,
    outputs: str = "scores",
    metric: Metric | None = None,
) -> list[dict[str, Any]]:
    """Measure every point of the grid (scikit-learn's ParameterGrid) on the given labelled rows.

    Besides n_bits the grid may hold one estimator parameter (e.g. C); `retrain(name, value)` then
    gives the model trained with that value, once per value; `on_point(n)` follows the n-th point.
    `metric`: by default the model's (see metric_for).
    """
    X = check_features(X, model.n_features, model.input_range, "tuning data")
    metric = metric_for(None, model, outputs) if metric is None else metric
    if not 1 <= latency_samples <= len(X):
        raise FedfheError(f"--latency-samples must be between 1 and the {len(X)} rows")
    if metric.positive is not None and len(np.unique(y == model.classes[model.class_names.index(metric.positive)])) < 2:
        raise FedfheError(f"--metric {metric.name} needs test rows of {metric.positive} and of another class")
    extra = [name for name in grid if name != "n_bits"]
    if len(extra) > 1 or (extra and retrain is None):
        raise FedfheError("a tuning grid holds n_bits and at most one retrained parameter")
    trained: dict[float, LinearModel] = {}
    points = []
    for params in ParameterGrid(grid):
        current, retrained = model, {name: float(params[name]) for name in extra}
        for name, value in retrained.items():
            if value not in trained:
                assert retrain is not None  # refused above otherwise
                trained[value] = retrain(name, value)
            current = trained[value]
        point = measure(current, params["n_bits"], X, y, latency_samples, metric, outputs)
        points.append({**point, "param": retrained})
        if on_point is not None:
            on_point(len(points))
    return points


def cost(point: dict[str, Any]) -> tuple[int, int, int, int]:
    """What a point costs the server whatever the machine: bootstraps per row, circuit width, input and weight bits."""
    return (point["bootstraps"], point["max_bit_width"], *bit_pair(point["n_bits"]))


def recommend(points: list[dict[str, Any]], metric: Metric) -> tuple[dict[str, Any], str]:
    """The cheapest point as good as the best (see the module's docstring), and why it won, in words."""
    best = (max if metric.higher else min)(p["score"] for p in points)
    close = [p for p in points if metric.as_good(p["score"], best)]

    def rank(point: dict[str, Any]) -> tuple[float, ...]:
        return (*cost(point), point["server_ms"])

    chosen = min(close, key=rank)  # the first measured of identical points
    within = f"within {metric.margin} of the best {metric.title} ({best:.4g})"
    rivals, deciding = [p for p in close if p is not chosen], []
    if not rivals:
        return chosen, f"the only point {within}"
    for i, words in enumerate(RANKS):  # the criteria that set the choice apart, until it stands alone
        tied = [p for p in rivals if rank(p)[i] == rank(chosen)[i]]
        if len(tied) < len(rivals):
            deciding.append(words.format(rank(chosen)[i]))
        if not (rivals := tied):
            return chosen, f"{', then '.join(deciding)} among the {len(close)} points {within}"
    return chosen, f"the first measured of {len(rivals) + 1} identical points {within}"


def neighbours(points: list[dict[str, Any]], chosen: dict[str, Any]) -> list[NBits]:
    """The n_bits one step from the chosen point's input and weight widths that its model has not been measured at."""
    low, high = N_BITS_RANGE
    inputs, weights = bit_pair(chosen["n_bits"])
    seen = {bit_pair(p["n_bits"]) for p in points if p["param"] == chosen["param"]}
    around = [(i, w) for i in (inputs - 1, inputs, inputs + 1) for w in (weights - 1, weights, weights + 1)]
    return [n_bits_of(i, w) for i, w in around if (i, w) not in seen and low <= min(i, w) and max(i, w) <= high]


def label(point: dict[str, Any]) -> str:
    """A point's settings: its n_bits (INPUTS/WEIGHTS when they differ), and the retrained parameter if any."""
    return " ".join([f"{n_bits_label(point['n_bits'])} bits", *setting(point.get("param", {}))])


def setting(param: dict[str, float]) -> list[str]:
    """A retrained parameter as the command line writes it: C=0.1 (nothing for the run's own model)."""
    return [f"{k}={v:g}" for k, v in param.items()]


def legend(points: list[dict[str, Any]]) -> str | None:
    """What I/W means, for tables with points whose inputs and weights differ."""
    return (
        "I/W bits: inputs quantized to I bits, weights to W."
        if any(isinstance(p["n_bits"], dict) for p in points)
        else None
    )


def heading(metric: Metric, chosen: dict[str, Any]) -> str:
    """What the scores and timings of a table are: the metric, its rows, its direction and tolerance."""
    direction = "higher" if metric.higher else "lower"
    return (
        f"{metric.named} in FHE simulation on the same {chosen['rows']} test rows ({direction} is better; "
        f"as good: within {metric.margin} of the best); server ms: the fastest of {chosen['server_runs']} real FHE runs"
    )


def find(points: list[dict[str, Any]], metric: Metric, param: dict[str, float], n_bits: NBits | None) -> dict[str, Any]:
    """The measured point --promote names: the model retrained with `param`, at `n_bits` or at its recommended one."""
    same = [p for p in points if p["param"] == param and (n_bits is None or bit_pair(p["n_bits"]) == bit_pair(n_bits))]
    if same:
        return recommend(same, metric)[0]
    widths: dict[str, list[str]] = {}
    for p in points:
        if p["param"]:
            widths.setdefault(" ".join(setting(p["param"])), []).append(n_bits_label(p["n_bits"]))
    wanted = " ".join([*setting(param), *([f"--n-bits {n_bits_label(n_bits)}"] if n_bits is not None else [])])
    measured = "; ".join(f"{value} at n_bits {', '.join(bits)}" for value, bits in widths.items())
    raise FedfheError(f"tune.json has no point {wanted}; its --sweep points: {measured or 'none (tune --sweep first)'}")


def write(run: RunDir, points: list[dict[str, Any]], chosen: dict[str, Any], reason: str, metric: Metric) -> None:
    """tune.json, tune.md and the score-latency plot (pareto.png)."""
    record = {"metric": metric.record(), "points": points, "recommended": chosen, "reason": reason}
    run.tune_json.write_text(json.dumps(record, indent=2))
    lines = [
        f"Points: {heading(metric, chosen)}.",
        "",
        f"Recommended: {label(chosen)}, {reason}.",
        "",
        f"| point | {metric.title} | bootstraps | circuit bits | server ms/sample | input bytes | output bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        mark = " **(recommended)**" if p is chosen else ""
        lines.append(
            f"| {label(p)}{mark} | {p['score']:.4g} | {p['bootstraps']} | {p['max_bit_width']} | {p['server_ms']:.1f} "
            f"| {p['input_bytes']} | {p['output_bytes']} |"
        )
    if note := legend(points):
        lines += ["", note]
    run.tune_md.write_text("\n".join(lines) + "\n")
    plot(points, chosen, run.pareto_plot, metric)


def read(run: RunDir) -> tuple[list[dict[str, Any]], Metric]:
    """tune.json's points and the metric they were scored by, refused in one line unless tune wrote it."""
    try:
        recorded = json.loads(run.tune_json.read_text())
    except OSError:
        raise FedfheError(f"{run.tune_json} not found: fedfhe tune --run {run.path} --sweep NAME=V1,V2 first") from None
    try:
        return list(recorded["points"]), parse_metric(recorded["metric"]["name"])
    except (ValueError, KeyError, TypeError):
        raise FedfheError(f"{run.tune_json}: not what this fedfhe tune writes; tune again") from None


def plot(points: list[dict[str, Any]], chosen: dict[str, Any], path: Path, metric: Metric) -> None:
    """The metric against server latency, better upwards, each point labelled with its settings, the choice circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([p["server_ms"] for p in points], [p["score"] for p in points], color="tab:blue")
    for p in points:
        ax.annotate(label(p), (p["server_ms"], p["score"]), textcoords="offset points", xytext=(5, 4))
    ax.scatter(
        [chosen["server_ms"]], [chosen["score"]], s=250, facecolors="none", edgecolors="tab:red", label="recommended"
    )
    ax.set_xlabel(f"FHE server time per sample, fastest of {chosen['server_runs']} runs (ms)")
    better = "higher is better" if metric.higher else "lower is better, axis reversed"
    ax.set_ylabel(f"{metric.named}, FHE simulation ({better})")
    if not metric.higher:
        ax.invert_yaxis()
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
