"""Many clients: default options from 10 to 1,000 clients, server optimizers, DP epsilon against accuracy, scale.

mnist-5k (4,000 train / 1,000 test), 20 rounds, every run a real Flower simulation on this machine,
one after another. Peak memory is the resident set of the whole process tree (fedfhe, the simulation
process that also runs the ServerApp, Ray and its workers), sampled every 0.2 s; the server's own is
the simulation process alone. The DP model at 1,000 clients is compiled to FHE and checked against
the clear model. Usage: .venv/bin/python benchmarks/clients_bench.py [part ...]  -> results/clients.json
(parts: defaults, optimizers, dp, secagg; all by default).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import psutil

from fedfhe import TrainConfig, fhe, train
from fedfhe.data import load_dataset
from fedfhe.errors import FedfheError

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "clients.json"
ROUNDS = 20
FRACTION = {10: 1.0, 100: 1.0, 1000: 0.1}  # clients per round: 10, 100, 100
DP_FRACTION = {100: 0.3, 1000: 0.1}
EPSILONS = (2.0, 4.0, 8.0)
SEEDS = (0, 1, 2)


class PeakMemory:
    """Peak resident memory of this process's tree and of its largest child (the simulation process)."""

    def __init__(self) -> None:
        self.tree = self.server = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self.done.wait(0.2):
            procs = [me, *me.children(recursive=True)]
            rss = {}
            for p in procs:
                try:
                    rss[p.pid] = p.memory_info().rss
                except psutil.Error:
                    continue
            self.tree = max(self.tree, sum(rss.values()))
            children = [p for p in me.children() if p.pid in rss]
            self.server = max([self.server, *(rss[p.pid] for p in children)])

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.thread.join()


def run(data: Any, config: TrainConfig, folder: Path, name: str) -> dict[str, Any]:
    """Train once; accuracy, wall time, peak memory and (DP) epsilon."""
    start, out = time.perf_counter(), folder / name.replace(" ", "_").replace(",", "")
    with PeakMemory() as memory:
        model = train(data, config, out)
    metrics = json.loads((out / "metrics.json").read_text())
    row = {
        "accuracy": metrics["final"]["score"],
        "centralized": metrics["centralized"]["score"],
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": memory.tree / 2**20,
        "server_rss_mb": memory.server / 2**20,
        "epsilon": metrics.get("privacy", {}).get("epsilon"),
        "noise_multiplier": metrics.get("privacy", {}).get("noise_multiplier"),
        "mean_sampled": sum(r.get("sampled", 0) for r in metrics["rounds"]) / config.rounds,
    }
    print(f"{name:40s} " + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if v is not None), flush=True)
    return {**row, "model": model}


def defaults(data: Any, folder: Path) -> dict[str, Any]:
    """Default options at 10, 100 and 1,000 clients, IID and Dirichlet 0.5; and 100 IID with the old defaults."""
    rows = {}
    for clients, fraction in FRACTION.items():
        for scheme in ("iid", "dirichlet"):
            config = TrainConfig(clients=clients, rounds=ROUNDS, fraction=fraction, partitioning=scheme)
            try:
                rows[f"{clients} {scheme}"] = run(data, config, folder, f"{clients} {scheme}")
            except FedfheError as exc:  # a split fedfhe refuses is a result too
                rows[f"{clients} {scheme}"] = {"error": str(exc)}
                print(f"{clients} {scheme}: {exc}", flush=True)
    old = TrainConfig(clients=100, rounds=ROUNDS, local_iters=20)
    rows["100 iid, before (20 local iterations)"] = run(data, old, folder, "100 iid old")
    return rows


def optimizers(data: Any, folder: Path) -> dict[str, Any]:
    """Each server optimizer at its default learning rate, 100 IID clients; the two best at 1,000 (default: defaults)."""
    cases: dict[str, dict[str, Any]] = {
        "sgd (FedAvg, default)": {},
        "sgd momentum 0.5": {"server_momentum": 0.5},
        "sgd momentum 0.9": {"server_momentum": 0.9},
        "adam": {"server_optimizer": "adam"},
        "yogi": {"server_optimizer": "yogi"},
    }
    rows = {}
    for clients, names in ((100, list(cases)), (1000, ["sgd momentum 0.5", "adam"])):
        for name in names:
            config = TrainConfig(clients=clients, rounds=ROUNDS, fraction=FRACTION[clients], **cases[name])
            rows[f"{clients} {name}"] = run(data, config, folder, f"{clients} {name}")
    return rows


def private(data: Any, folder: Path) -> dict[str, Any]:
    """Epsilon against accuracy at 100 and 1,000 clients (Poisson sampling, adaptive clipping), seeds 0-2 each.

    DP noise is drawn fresh on every run, so each setting runs three times (seeds 0, 1, 2: the split,
    the sampling); the median, min and max accuracy are reported. One DP model is compiled to FHE.
    """
    rows: dict[str, Any] = {}
    for clients, fraction in DP_FRACTION.items():
        for target in (None, *EPSILONS):
            name = f"{clients} " + ("non-private" if target is None else f"dp eps {target:g}")
            dp = {} if target is None else {"dp": True, "target_epsilon": target}
            runs = [
                run(
                    data,
                    TrainConfig(clients=clients, rounds=ROUNDS, fraction=fraction, seed=seed, **dp),
                    folder,
                    f"{name} seed {seed}",
                )
                for seed in SEEDS
            ]
            accuracy = sorted(r["accuracy"] for r in runs)
            rows[name] = {
                **{k: v for k, v in runs[0].items() if k not in ("accuracy", "model")},
                "accuracy": statistics.median(accuracy),
                "accuracy_min": accuracy[0],
                "accuracy_max": accuracy[-1],
                "wall_s": statistics.median(r["wall_s"] for r in runs),
                "model": runs[0]["model"],
            }
    model = rows[f"1000 dp eps {max(EPSILONS):g}"]["model"]
    compiled = fhe.compile_model(model, n_bits=8)
    clear = compiled.predict(data.X_test, fhe="disable")
    simulated = compiled.predict(data.X_test, fhe="simulate")
    rows["fhe"] = {
        "model": "1000 dp eps 8 seed 0",
        "fhe_vs_clear": float((clear == simulated).mean()),
        "rows": len(clear),
    }
    print(rows["fhe"], flush=True)
    return rows


def secagg(data: Any, folder: Path) -> dict[str, Any]:
    """SecAgg+ with 100 clients per round (2 rounds): time and memory, against the same rounds without it."""
    base = {"clients": 100, "rounds": 2}
    return {
        "plain": run(data, TrainConfig(**base), folder, "100 clients 2 rounds plain"),
        "secagg+": run(data, TrainConfig(**base, secagg=True), folder, "100 clients 2 rounds secagg+"),
    }


PARTS = {"defaults": defaults, "optimizers": optimizers, "dp": private, "secagg": secagg}


def main() -> None:
    """Run the parts asked for and merge their rows into results/clients.json."""
    data = load_dataset("mnist-5k", seed=0)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results["machine"] = {"cpus": psutil.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        for part in sys.argv[1:] or list(PARTS):
            rows = PARTS[part](data, Path(tmp))
            results[part] = {name: {k: v for k, v in row.items() if k != "model"} for name, row in rows.items()}
            OUT.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
