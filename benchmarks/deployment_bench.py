"""Simulation engine vs Deployment Engine (loopback, TLS, node auth): wall time and SuperNode memory.

mnist-5k, 10 clients, 5 rounds, 20 local iterations, both measured in this one run; memory is the
peak resident set of each SuperNode process with its children (the ClientApp processes).
Usage: .venv/bin/python benchmarks/deployment_bench.py  -> results/deployment.json
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from fedfhe import TrainConfig, train
from fedfhe.data import load_dataset
from fedfhe.federated import deployment
from fedfhe.model import LinearModel

HERE = Path(__file__).resolve().parent
CLIENTS, ROUNDS, ITERS = 10, 5, 20


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def main() -> None:
    """Time both engines on the same data and config, sample SuperNode memory meanwhile."""
    data = load_dataset("mnist-5k", seed=0)
    peaks: dict[str, int] = {}
    stop = threading.Event()

    def sample(procs: deployment.Processes) -> None:
        def loop() -> None:
            while not stop.is_set():
                for name, proc in list(procs.procs.items()):
                    if name.startswith("supernode"):
                        peaks[name] = max(peaks.get(name, 0), tree_rss(proc.pid))
                time.sleep(0.5)

        threading.Thread(target=loop, daemon=True).start()

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        config = TrainConfig(clients=CLIENTS, rounds=ROUNDS, local_iters=ITERS)
        simulated = train(data, config, Path(tmp) / "sim")
        simulation_s = time.perf_counter() - start
        start = time.perf_counter()
        path = deployment.up(data, config, Path(tmp) / "dep", on_started=sample)
        deployment_s = time.perf_counter() - start
        stop.set()
        deployed = LinearModel.load(path)
    result = {
        "setup": {"dataset": "mnist-5k", "clients": CLIENTS, "rounds": ROUNDS, "local_iters": ITERS, "tls": True},
        "simulation_s": simulation_s,
        "deployment_s": deployment_s,
        "ratio": deployment_s / simulation_s,
        "max_abs_weight_difference": float(np.abs(deployed.coef - simulated.coef).max()),
        "prediction_agreement": float(
            np.mean(deployed.to_sklearn().predict(data.X_test) == simulated.to_sklearn().predict(data.X_test))
        ),
        "accuracy": {
            "deployment": deployed.metadata["metrics"]["final"]["score"],
            "simulation": simulated.metadata["metrics"]["final"]["score"],
        },
        "supernode_peak_rss_mb": {
            "median": statistics.median(peaks.values()) / 2**20,
            "max": max(peaks.values()) / 2**20,
        },
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "deployment.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
