"""Every linear model end to end with `fedfhe run`: federated (10 clients, 5 rounds) and in FHE.

Also trains each model centrally the Concrete ML way (`--engine concrete`) for comparison.
Usage: .venv/bin/python benchmarks/models_bench.py [--fhe-samples 50]  -> results/models.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = [
    ("mnist-5k", "logistic"),
    ("mnist-5k", "svm"),
    ("breast-cancer", "logistic"),
    ("breast-cancer", "svm"),
    ("diabetes", "linear"),
    ("diabetes", "ridge"),
    ("diabetes", "lasso"),
    ("diabetes", "elasticnet"),
]


def fedfhe(*args: str) -> float:
    """Run the CLI, fail loudly, return the wall time."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedfhe", *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"fedfhe {' '.join(args)} failed:\n{done.stderr}")
    return time.perf_counter() - start


def raw_feature_circuit(run: Path) -> dict[str, float]:
    """The same model compiled on raw (unscaled) features, corners of the raw box: what scaling avoids."""
    import numpy as np

    from fedfhe.data import load_dataset
    from fedfhe.fhe import compile_model, concrete_class, quiet
    from fedfhe.model import LinearModel

    model = LinearModel.load(run / "model.npz")
    data = load_dataset(model.metadata["dataset"], seed=model.metadata["training"]["seed"])
    low, high = model.input_range
    corners = np.unique(np.array([low, high, *[np.where(w > 0, high, low) for w in model.coef],
                                  *[np.where(w > 0, low, high) for w in model.coef]]), axis=0)  # fmt: skip
    with quiet():
        raw = concrete_class(model.kind).from_sklearn_model(model.to_sklearn(), X=corners, n_bits=8)
    sklearn = model.to_sklearn().predict(data.X_test)
    scaled = compile_model(model, 8).predict(data.X_test, "disable")
    raw_pred = raw.predict(data.X_test, fhe="disable")
    return {
        "raw_features_vs_sklearn": float(np.mean(raw_pred == sklearn)),
        "raw_features_accuracy": float(np.mean(raw_pred == data.y_test)),
        "scaled_features_vs_sklearn": float(np.mean(scaled == sklearn)),
        "scaled_features_accuracy": float(np.mean(scaled == data.y_test)),
    }


def main() -> None:
    """One federated run and one Concrete-engine training per case; figures from their own reports."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--fhe-samples", type=int, default=50)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="models-bench-") as tmp:
        for dataset, model in CASES:
            out = Path(tmp) / f"{dataset}-{model}"
            wall = fedfhe(
                "run", "--dataset", dataset, "--model", model, "--clients", "10", "--rounds", "5",
                "--fhe-samples", str(args.fhe_samples), "--out", str(out),
            )  # fmt: skip
            report = json.loads((out / "report.json").read_text())
            metric = "r2" if dataset == "diabetes" else "accuracy"
            concrete = Path(tmp) / f"{dataset}-{model}-concrete"
            fedfhe("train", "--dataset", dataset, "--model", model, "--clients", "1", "--engine", "concrete",
                   "--out", str(concrete))  # fmt: skip
            metrics = json.loads((concrete / "metrics.json").read_text())
            row = {
                "dataset": dataset,
                "model": model,
                "metric": metric,
                "centralized": report[metric]["centralized"],
                "federated": report[metric]["federated"],
                "fhe_simulate": report[metric]["fhe_simulate"],
                "fhe_execute": report[metric]["fhe_execute"],
                "mse_fhe_simulate": report["mse"]["fhe_simulate"] if metric == "r2" else None,
                "agreement": report["agreement"],
                "max_bit_width": report["circuit"]["max_bit_width"],
                "server_ms": 1000 * report["timing_s"]["server_run_per_sample"],
                "input_bytes": report["bytes"]["input_ciphertext_bytes"],
                "output_bytes": report["bytes"]["output_ciphertext_bytes"],
                "concrete_engine": {"float": metrics["final"]["score"], "quantized": metrics["concrete_quantized"]},
                "wall_s": wall,
            }
            if (dataset, model) == ("breast-cancer", "logistic"):
                scaling = raw_feature_circuit(out)
            rows.append(row)
            print(json.dumps(row))
    result = {
        "fhe_samples": args.fhe_samples,
        "clients": 10,
        "rounds": 5,
        "n_bits": 8,
        "cases": rows,
        "breast_cancer_logistic_input_scaling": scaling,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "models.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
