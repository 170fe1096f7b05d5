"""Bootstrap intervals on many rows: time and peak memory of fedfhe.quality against the row count.

The resamples are row weights in chunks of quality.CELLS, so memory should stay flat from a
thousand to a million rows; each size runs in a fresh process so its peak is its own.
Usage: .venv/bin/python benchmarks/quality_bench.py  -> results/quality.json
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedfhe import quality

HERE = Path(__file__).resolve().parent
SIZES = (1_000, 100_000, 1_000_000)


def measure(n: int) -> dict[str, float]:
    """Two-class figures (AUC and Brier included) and regressor figures on n synthetic rows."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.25 + 0.5 * y + rng.normal(0, 0.2, n), 0, 1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    quality.classifier(y, (p1 > 0.5).astype(int), np.column_stack([1 - p1, p1]), [0, 1], ["a", "b"], 1, True)
    classifier = time.perf_counter() - start
    start = time.perf_counter()
    quality.regressor(p1, p1 + rng.normal(0, 0.1, n))
    regressor = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rows": n, "classifier_s": classifier, "regressor_s": regressor, "peak_extra_mib": (peak - before) / 1024}


def main() -> None:
    """Each size in its own process; write the table."""
    if len(sys.argv) > 1:
        print(json.dumps(measure(int(sys.argv[1]))))
        return
    rows = []
    for n in SIZES:
        done = subprocess.run([sys.executable, __file__, str(n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout))
        print(rows[-1])
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "quality.json").write_text(json.dumps({"resamples": quality.RESAMPLES, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
