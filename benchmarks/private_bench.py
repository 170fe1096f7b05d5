"""Accuracy and wall time of private and robust federated training (issue #4's table).

mnist-5k, 10 clients, 5 rounds, 20 local iterations, one process per configuration run in turn on
the same machine. Also compiles the SecAgg+ model to FHE and checks FHE-vs-clear agreement.
Usage: .venv/bin/python benchmarks/private_bench.py  -> results/private.json
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfhe import TrainConfig, fhe, train
from fedfhe.data import load_dataset

HERE = Path(__file__).resolve().parent
BASE = TrainConfig(clients=10, rounds=5, local_iters=20, seed=0)
DP = {"dp": True, "clipping": "fixed", "clipping_norm": 10.0}
CASES: dict[str, dict[str, Any]] = {
    "FedAvg": {},
    "SecAgg+": {"secagg": True},
    "DP z=0.05": {**DP, "noise_multiplier": 0.05},
    "DP z=0.2": {**DP, "noise_multiplier": 0.2},
    "DP z=1.0": {**DP, "noise_multiplier": 1.0},
    "SecAgg+ & DP z=0.05": {"secagg": True, **DP, "noise_multiplier": 0.05},
    **{
        f"dirichlet {alpha} {name}": {"partitioning": "dirichlet", "alpha": alpha, "strategy": strategy}
        for alpha in (0.1, 0.5, 1.0)
        for name, strategy in (("FedAvg", "fedavg"), ("FedProx", "fedprox"))
    },
}


def main() -> None:
    """Run every case, then check the FHE model built from the SecAgg+ model."""
    data = load_dataset("mnist-5k", seed=0)
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, changes in CASES.items():
            out = Path(tmp) / name.replace(" ", "_")
            start = time.perf_counter()
            model = train(data, dataclasses.replace(BASE, **changes), out)
            wall = time.perf_counter() - start
            metrics = model.metadata["metrics"]
            rows[name] = {
                "accuracy": metrics["final"]["score"],
                "wall_s": wall,
                "epsilon": metrics.get("privacy", {}).get("epsilon"),
                "config": changes,
            }
            print(f"{name:28s} accuracy {rows[name]['accuracy']:.4f}  wall {wall:6.1f} s  eps {rows[name]['epsilon']}")
            if name == "SecAgg+":
                compiled = fhe.compile_model(model, n_bits=8)
                clear = compiled.predict(data.X_test, fhe="disable")
                simulate = compiled.predict(data.X_test, fhe="simulate")
                rows[name]["fhe_vs_clear"] = float((clear == simulate).mean())
                rows[name]["fhe_simulate_accuracy"] = float((simulate == data.y_test).mean())
    result = {
        "setup": {**dataclasses.asdict(BASE), "dataset": "mnist-5k", "delta": BASE.target_delta},
        "cases": rows,
        "secagg_wall_ratio": rows["SecAgg+"]["wall_s"] / rows["FedAvg"]["wall_s"],
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "private.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("secagg_wall_ratio",)}))


if __name__ == "__main__":
    main()
