"""Rows per second of encrypted batch prediction (issue #14); writes results/predict.json.

Compares, on the same machine and rows:
- sequential: Concrete ML's plain chain in one process, row by row (FHEModelClient encrypt,
  FHEModelServer.run, decrypt), with no HTTP at all;
- pipelined: EncryptedClient.predict against `fedfhe serve` on this machine, for each --jobs and
  --workers, the client warmed (keys uploaded, encrypting workers started) before the clock starts;
- cli: `fedfhe predict rows.npy --out preds.csv` end to end, process start and key loading included.

Usage: .venv/bin/python benchmarks/predict_bench.py [--run DIR] [--rows 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_bench import ENV, bench_run, free_port, process, spread

SETTINGS = ((1, 1), (1, 2), (2, 1), (2, 2))  # (client --jobs, server --workers)


def sequential(fhe_dir: Path, X: np.ndarray, key_dir: str) -> tuple[float, np.ndarray]:
    """Rows per second of the plain chain, and its predicted classes."""
    from concrete.ml.deployment import FHEModelClient, FHEModelServer

    client = FHEModelClient(str(fhe_dir), key_dir=key_dir)
    client.generate_private_and_evaluation_keys()
    keys, server = client.get_serialized_evaluation_keys(), FHEModelServer(str(fhe_dir))
    server.run(client.quantize_encrypt_serialize(X[:1]), keys)  # warm-up, not timed
    start, classes = time.perf_counter(), []
    for row in X:
        out = server.run(client.quantize_encrypt_serialize(row[None, :]), keys)
        classes.append(int(np.argmax(client.deserialize_decrypt_dequantize(out))))
    return len(X) / (time.perf_counter() - start), np.array(classes)


def main() -> None:
    """Build or reuse a run, then time the sequential chain and every pipelined setting on the same rows."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=HERE.parent / "runs" / "serve-bench")
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "predict.json")
    args = parser.parse_args()
    model, X, _, inputs = bench_run(args.run, args.rows)

    from fedfhe.service.client import EncryptedClient

    results: dict = {"sequential": [], "pipelined": {}}
    with tempfile.TemporaryDirectory(prefix="predict-bench-") as tmp:
        for i in range(args.repeats):
            rate, reference = sequential(args.run / "fhe", inputs, f"{tmp}/seq{i}")
            results["sequential"].append(rate)
            print(f"sequential: {rate:.2f} rows/s", flush=True)
        agree = True
        for workers in sorted({w for _, w in SETTINGS}):
            port = free_port()
            serve = ["-m", "fedfhe", "serve", "--run", str(args.run), "--port", str(port), "--workers", str(workers)]
            with process([*serve, "--key-store", f"{tmp}/store{workers}"], port) as (url, _):
                for jobs in sorted(j for j, w in SETTINGS if w == workers):
                    rates = []
                    with EncryptedClient(url, f"{tmp}/client{workers}-{jobs}") as client:
                        for _ in range(args.repeats):
                            client.predict(X[: 16 * jobs + 1], jobs=jobs)  # warm: keys, workers, caches
                            start = time.perf_counter()
                            predicted = client.predict(X, jobs=jobs).predicted
                            rates.append(len(X) / (time.perf_counter() - start))
                            agree &= bool(np.array_equal(predicted, model.classes[reference]))
                    results["pipelined"][f"jobs={jobs},workers={workers}"] = spread(rates)
                    print(f"jobs {jobs} workers {workers}: {spread(rates)}", flush=True)
                if workers == max(w for _, w in SETTINGS):
                    np.save(f"{tmp}/rows.npy", X)
                    cli = [sys.executable, "-m", "fedfhe", "predict", f"{tmp}/rows.npy", "--server", url]
                    cli += ["--key-dir", f"{tmp}/cli", "--out", f"{tmp}/preds.csv"]
                    start = time.perf_counter()
                    subprocess.run(cli, check=True, env=ENV, capture_output=True)
                    results["cli_end_to_end_s"] = time.perf_counter() - start
    sequential_median = statistics.median(results["sequential"])
    best = results["pipelined"][f"jobs={max(j for j, _ in SETTINGS)},workers={max(w for _, w in SETTINGS)}"]
    result = {
        "run": str(args.run),
        "dataset": model.metadata["dataset"],
        "n_features": model.n_features,
        "rows": len(X),
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "rows_per_s": {"sequential": spread(results["sequential"]), **results["pipelined"]},
        "speedup_median": best["median"] / sequential_median,
        "cli_end_to_end_s": results["cli_end_to_end_s"],
        "all_settings_agree_with_sequential": agree,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
