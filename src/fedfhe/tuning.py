"""Trade accuracy against FHE latency: sweep quantization bits (and a regularisation strength), pick one."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import ParameterGrid

from fedfhe import fhe
from fedfhe.artifacts import N_BITS_RANGE, NBits, bit_pair, n_bits_label, n_bits_of
from fedfhe.data import check_features
from fedfhe.errors import FedfheError
from fedfhe.model import LinearModel
from fedfhe.rundir import RunDir

DEFAULT_GRID = {"n_bits": [2, 3, 4, 5, 6, 7, 8]}
TOLERANCE = 0.005  # "within half a point of the best accuracy"


def measure(
    model: LinearModel, n_bits: NBits, X: np.ndarray, y: np.ndarray, latency_samples: int, outputs: str = "scores"
) -> dict[str, Any]:
    """One grid point: simulated accuracy (or R2) on all rows, real FHE latency and sizes on a few."""
    compiled = fhe.compile_model(model, n_bits, outputs=outputs)
    predicted = compiled.predict(X, fhe="simulate")
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = fhe.export(compiled, Path(tmp))
        _, timings = fhe.execute(artifacts, compiled, X[:latency_samples])
    return {
        "n_bits": n_bits,
        "outputs": outputs,
        model.kind.score_names[0]: model.kind.score(y, predicted),
        "max_bit_width": compiled.max_bit_width,
        "server_ms": 1000 * timings["server_run_per_sample"],
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
) -> list[dict[str, Any]]:
    """Measure every point of the grid (scikit-learn's ParameterGrid) on the given labelled rows.

    Besides n_bits the grid may hold one estimator parameter (e.g. C); `retrain(name, value)` then
    gives the model trained with that value, once per value; `on_point(n)` follows the n-th point.
    """
    X = check_features(X, model.n_features, model.input_range, "tuning data")
    if not 1 <= latency_samples <= len(X):
        raise FedfheError(f"--latency-samples must be between 1 and the {len(X)} rows")
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
        point = measure(current, params["n_bits"], X, y, latency_samples, outputs)
        points.append({**point, "param": retrained})
        if on_point is not None:
            on_point(len(points))
    return points


def recommend(points: list[dict[str, Any]], key: str = "accuracy", tolerance: float = TOLERANCE) -> dict[str, Any]:
    """The fastest point whose score (accuracy or R2) is within `tolerance` of the best."""
    best = max(p[key] for p in points)
    return min((p for p in points if p[key] >= best - tolerance), key=lambda p: p["server_ms"])


def neighbours(points: list[dict[str, Any]], chosen: dict[str, Any]) -> list[NBits]:
    """The n_bits one step from the chosen point's input and weight widths that its model has not been measured at."""
    low, high = N_BITS_RANGE
    inputs, weights = bit_pair(chosen["n_bits"])
    seen = {bit_pair(p["n_bits"]) for p in points if p["param"] == chosen["param"]}
    around = [(i, w) for i in (inputs - 1, inputs, inputs + 1) for w in (weights - 1, weights, weights + 1)]
    return [n_bits_of(i, w) for i, w in around if (i, w) not in seen and low <= min(i, w) and max(i, w) <= high]


def label(point: dict[str, Any]) -> str:
    """A point's settings: its n_bits (INPUTS/WEIGHTS when they differ), and the retrained parameter if any."""
    return " ".join(
        [f"{n_bits_label(point['n_bits'])} bits", *(f"{k}={v:g}" for k, v in point.get("param", {}).items())]
    )


def legend(points: list[dict[str, Any]]) -> str | None:
    """What I/W means, for tables with points whose inputs and weights differ."""
    return (
        "I/W bits: inputs quantized to I bits, weights to W."
        if any(isinstance(p["n_bits"], dict) for p in points)
        else None
    )


def shown(point: dict[str, Any], key: str) -> str:
    """A point's score as people read it: accuracy in percent, R2 with four decimals."""
    return f"{100 * point[key]:.2f}%" if key == "accuracy" else f"{point[key]:.4f}"


def write(run: RunDir, points: list[dict[str, Any]], chosen: dict[str, Any], key: str = "accuracy") -> None:
    """tune.json, tune.md and the score-latency plot (pareto.png)."""
    run.tune_json.write_text(json.dumps({"points": points, "recommended": chosen}, indent=2))
    lines = [
        f"| point | {key} | server ms/sample | circuit bits | input bytes | output bytes |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        mark = " **(recommended)**" if p is chosen else ""
        lines.append(
            f"| {label(p)}{mark} | {shown(p, key)} | {p['server_ms']:.1f} | {p['max_bit_width']} "
            f"| {p['input_bytes']} | {p['output_bytes']} |"
        )
    if note := legend(points):
        lines += ["", note]
    run.tune_md.write_text("\n".join(lines) + "\n")
    plot(points, chosen, run.pareto_plot, key)


def plot(points: list[dict[str, Any]], chosen: dict[str, Any], path: Path, key: str = "accuracy") -> None:
    """Score against server latency, each point labelled with its n_bits, the choice circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factor = 100 if key == "accuracy" else 1
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([p["server_ms"] for p in points], [factor * p[key] for p in points], color="tab:blue")
    for p in points:
        ax.annotate(
            f"{n_bits_label(p['n_bits'])} bits",
            (p["server_ms"], factor * p[key]),
            textcoords="offset points",
            xytext=(5, 4),
        )
    ax.scatter(
        [chosen["server_ms"]],
        [factor * chosen[key]],
        s=250,
        facecolors="none",
        edgecolors="tab:red",
        label="recommended",
    )
    ax.set_xlabel("FHE server time per sample (ms)")
    ax.set_ylabel("accuracy, FHE simulation (%)" if key == "accuracy" else "R2, FHE simulation")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
