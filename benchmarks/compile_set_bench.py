"""Why fedfhe compiles on input-range bounds: FHE-vs-clear agreement for three compile sets.

Compiles the same model (a run directory's model.npz) on (a) random pixels, as the reference demo
does, (b) fedfhe's input-range bounds, (c) a real calibration sample (the training set), and counts
on the whole test split how often FHE simulation disagrees with the clear quantized model.
Usage: .venv/bin/python benchmarks/compile_set_bench.py runs/demo  -> results/compile_set.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fedfhe import fhe
from fedfhe.data import load_dataset
from fedfhe.model import LinearModel

HERE = Path(__file__).resolve().parent


def agreement(model: LinearModel, inputs: np.ndarray | None, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Compile on `inputs` (None: bounds) and compare simulate with the clear quantized model."""
    compiled = fhe.compile_model(model, 8, inputs)
    clear = compiled.predict(X, fhe="disable")
    simulate = compiled.predict(X, fhe="simulate")
    return {
        "fhe_vs_clear": float(np.mean(simulate == clear)),
        "fhe_accuracy": float(np.mean(simulate == y)),
        "clear_accuracy": float(np.mean(clear == y)),
        "max_bit_width": compiled.max_bit_width,
    }


def main() -> None:
    """Measure the three compile sets on one model."""
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    model = LinearModel.load(run / "model.npz")
    data = load_dataset(model.metadata["dataset"], seed=model.metadata["training"]["seed"])
    low, high = model.input_range[0].min(), model.input_range[1].max()
    results = {
        f"random pixels (seed {seed})": agreement(
            model,
            np.random.default_rng(seed).uniform(low, high, size=(100, model.n_features)),
            data.X_test,
            data.y_test,
        )
        for seed in range(3)
    }
    results["input-range bounds (fedfhe default)"] = agreement(model, None, data.X_test, data.y_test)
    results["training set as calibration"] = agreement(model, data.X_train, data.X_test, data.y_test)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "compile_set.json").write_text(json.dumps({"run": str(run), "results": results}, indent=2))
    for name, row in results.items():
        print(
            f"{name:40s} agree {row['fhe_vs_clear']:.3f}  fhe acc {row['fhe_accuracy']:.3f}  bits {row['max_bit_width']}"
        )


if __name__ == "__main__":
    main()
