"""Simulation engine vs Deployment Engine (loopback, TLS, node auth): wall time, where a round goes, memory.

mnist-5k, 20 local iterations; 3 nodes x 3 rounds and 10 nodes x 5 rounds, each engine measured in
this one run on the same data and config. Per deployed round (metrics.json `timing`): the round's wall
time, a node's ClientApp process before its handler runs (one per message, forked by fedfhe-supernode
from its warm process), local training, aggregation, and the rest: waiting (idle SuperNodes pull every
0.5 s, each SuperExec looks for work every 0.25 s, and on one 2-core machine every process queues for
the CPU). Memory: the peak resident set of each SuperNode with its warm process and ClientApp children.
Usage: .venv/bin/python benchmarks/deployment_bench.py  -> results/deployment.json
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from fedfhe import TrainConfig, train
from fedfhe.data import load_dataset
from fedfhe.federated import deployment
from fedfhe.model import LinearModel

HERE = Path(__file__).resolve().parent
CASES = ((3, 3), (10, 5))  # (nodes, rounds)
ITERS = 20


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def breakdown(run: Path) -> dict[str, Any]:
    """Per-round timing of a deployed run, and the medians across its rounds."""
    rows = [row["timing"] for row in json.loads((run / "metrics.json").read_text())["rounds"] if "timing" in row]
    for t in rows:
        t["waiting_s"] = t["round_s"] - t["client_process_s"] - t["client_train_s"] - t["aggregate_s"]
    return {"rounds": rows, "median": {key: statistics.median(t[key] for t in rows) for key in rows[0]}}


def one_case(data: Any, nodes: int, rounds: int, tmp: Path) -> dict[str, Any]:
    """Both engines on one setting."""
    config = TrainConfig(clients=nodes, rounds=rounds, local_iters=ITERS)
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

    start = time.perf_counter()
    simulated = train(data, config, tmp / f"sim-{nodes}")
    simulation_s = time.perf_counter() - start
    start = time.perf_counter()
    path = deployment.up(data, config, tmp / f"dep-{nodes}", on_started=sample)
    deployment_s = time.perf_counter() - start
    stop.set()
    deployed = LinearModel.load(path)
    return {
        "nodes": nodes,
        "rounds": rounds,
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
        "round_breakdown": breakdown(path.parent),
        "supernode_peak_rss_mb": {
            "median": statistics.median(peaks.values()) / 2**20,
            "max": max(peaks.values()) / 2**20,
        },
    }


def main() -> None:
    """Every case, one after the other."""
    data = load_dataset("mnist-5k", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        cases = [one_case(data, nodes, rounds, Path(tmp)) for nodes, rounds in CASES]
    result = {
        "setup": {
            "dataset": "mnist-5k",
            "local_iters": ITERS,
            "tls": True,
            "node_auth": True,
            "supernode": "fedfhe-supernode (warm ClientApps, --poll-interval 0.5)",
            "superexec_poll_s": float(deployment.POLL),
        },
        "cases": cases,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "deployment.json").write_text(json.dumps(result, indent=2))
    for case in cases:
        median = case["round_breakdown"]["median"]
        print(
            f"{case['nodes']} nodes x {case['rounds']} rounds: simulation {case['simulation_s']:.1f} s, deployment "
            f"{case['deployment_s']:.1f} s ({case['ratio']:.2f}x); per round {median['round_s']:.1f} s = process "
            f"{median['client_process_s']:.1f} + train {median['client_train_s']:.1f} + waiting {median['waiting_s']:.1f}"
        )


if __name__ == "__main__":
    main()
