"""Time `fedfhe tune` on the demo run and compare its recommended point with n_bits 8.

Usage: .venv/bin/python benchmarks/tune_bench.py [runs/demo]  -> results/tune.json (needs `make demo` first)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    """One timed tune, then the ratios between the recommended point and 8 bits, from its own table."""
    run = Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parent / "runs" / "demo")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedfhe", "tune", "--run", str(run)], check=True, env=env)
    wall = time.perf_counter() - start
    tuned = json.loads((run / "tune.json").read_text())
    chosen = tuned["recommended"]
    eight = next(p for p in tuned["points"] if p["n_bits"] == 8)
    result = {
        "run": str(run),
        "wall_s": wall,
        "points": tuned["points"],
        "recommended_n_bits": chosen["n_bits"],
        "server_ms_ratio_vs_8_bits": chosen["server_ms"] / eight["server_ms"],
        "accuracy_delta_vs_8_bits": chosen["accuracy"] - eight["accuracy"],
        "output_bytes_ratio_vs_8_bits": chosen["output_bytes"] / eight["output_bytes"],
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "tune.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "points"}, indent=2))


if __name__ == "__main__":
    main()
