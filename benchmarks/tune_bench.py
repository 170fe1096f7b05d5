"""Time `fedfhe tune` on the demo run and compare its recommended point with n_bits 8, by tune's own metric.

Usage: .venv/bin/python benchmarks/tune_bench.py [runs/demo] [--sweep C=0.1,1,10]
       -> results/tune.json, or results/tune_sweep.json with --sweep (on a copy of the run)
(needs `make demo` first)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedfhe.tuning import parse_metric, recommend

HERE = Path(__file__).resolve().parent


def main() -> None:
    """One timed tune, then the ratios between the recommended point and 8 bits, from its own table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("run", nargs="?", type=Path, default=HERE.parent / "runs" / "demo")
    parser.add_argument("--sweep", help="also retrain per value of one parameter, e.g. C=0.1,1,10")
    args = parser.parse_args()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    with tempfile.TemporaryDirectory(prefix="tune-bench-") as tmp:
        run = args.run
        command = [sys.executable, "-m", "fedfhe", "tune", "--run"]
        extra = []
        if args.sweep:  # the sweep retrains into RUN/tune/: keep the demo run as it is
            run = Path(shutil.copytree(args.run, Path(tmp) / "run"))
            extra = ["--sweep", args.sweep]
        start = time.perf_counter()
        subprocess.run([*command, str(run), *extra], check=True, env=env)
        wall = time.perf_counter() - start
        tuned = json.loads((run / "tune.json").read_text())
    chosen, metric = tuned["recommended"], parse_metric(tuned["metric"]["name"])
    eight, _ = recommend([p for p in tuned["points"] if p["n_bits"] == 8], metric)
    same, _ = recommend([p for p in tuned["points"] if isinstance(p["n_bits"], int)], metric)  # one width only
    result = {
        "run": str(args.run),
        "sweep": args.sweep,
        "wall_s": wall,
        "metric": tuned["metric"],
        "points": tuned["points"],
        "recommended": {"n_bits": chosen["n_bits"], **chosen["param"]},
        "reason": tuned["reason"],
        "compared_with": {"n_bits": 8, **eight["param"]},
        "server_ms_ratio_vs_8_bits": chosen["server_ms"] / eight["server_ms"],
        "score_delta_vs_8_bits": chosen["score"] - eight["score"],
        "output_bytes_ratio_vs_8_bits": chosen["output_bytes"] / eight["output_bytes"],
        "recommended_with_one_width": {"n_bits": same["n_bits"], **same["param"]},
        "server_ms_ratio_vs_one_width": chosen["server_ms"] / same["server_ms"],
        "score_delta_vs_one_width": chosen["score"] - same["score"],
    }
    (HERE / "results").mkdir(exist_ok=True)
    name = "tune_sweep.json" if args.sweep else "tune.json"
    (HERE / "results" / name).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "points"}, indent=2))


if __name__ == "__main__":
    main()
