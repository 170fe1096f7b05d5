"""The partner's install (issue 32): its size and install time, one row's start-up, 300 rows run cold, and its
answers against the full install's; writes results/client.json.

1. A fresh venv made only by the documented client install (requirements-client.txt, then fedfhe --no-deps),
   timed and sized; `import torch` must fail in it.
2. Three served runs: mnist-5k with scores outputs, the same model compiled for label outputs, and a table trained
   from three hospitals' raw exports. Each is predicted by the client venv's `fedfhe predict --json` and by the full
   venv's: the records (scores bit for bit, classes) must be equal.
3. Start-up: `fedfhe predict` of one row, keys already made and uploaded (median of --repeats).
4. Throughput, in the same run: Concrete ML's plain sequential chain (FHEModelClient, FHEModelServer, one process,
   no HTTP) against the client venv's `fedfhe predict ROWS.npy --out` started cold as a user starts it (a new
   process; its keys made and uploaded by an earlier call), both on the same --rows mnist-5k rows.

Usage: .venv/bin/python benchmarks/client_bench.py [--rows 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
from predict_bench import sequential
from serve_bench import ENV, bench_run, free_port, process, spread


def install(venv: Path) -> dict:
    """Make the client venv as the README says; its install seconds, size and whether torch imports."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"]
    subprocess.run([*pip, "-r", str(REPO / "requirements-client.txt")], check=True)
    subprocess.run([*pip, "--no-build-isolation", "-e", str(REPO)], check=True, cwd=REPO)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    python = str(venv / "bin" / "python")
    torch = subprocess.run([python, "-c", "import torch"], check=False, capture_output=True).returncode == 0
    return {"install_s": seconds, "size_mb": size / 1e6, "torch_imports": torch}


def predict(fedfhe: str, rows: Path, url: str, keys: Path, *options: str) -> list[dict]:
    """`fedfhe predict ROWS --json` with this install's fedfhe: its records."""
    done = subprocess.run(
        [fedfhe, "predict", str(rows), "--server", url, "--key-dir", str(keys), "--json", *options],
        check=True, env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def timed(command: list[str]) -> float:
    """Seconds a command takes, start to end."""
    start = time.perf_counter()
    subprocess.run(command, check=True, env=ENV, capture_output=True)
    return time.perf_counter() - start


def table_run(folder: Path) -> tuple[Path, Path]:
    """A run trained on three hospitals' raw exports (the README's own-data walkthrough), and a lab file."""
    from test_exports import SCHEMA, admissions, export_a, export_b, export_c

    owners = folder / "hospitals"
    owners.mkdir()
    export_a(owners / "a.csv"), export_b(owners / "b.csv", sep_line=True), export_c(owners / "c.parquet")
    admissions(150, 7).to_csv(folder / "test.csv", index=False)
    admissions(30, 11).drop(columns=["readmitted_30d"]).to_csv(folder / "lab.csv", index=False)
    (folder / "schema.json").write_text(json.dumps(SCHEMA))  # the README's agreed schema
    run = folder / "table-run"
    command = ["run", "--owners", str(owners), "--test", str(folder / "test.csv"), "--schema"]
    command += [str(folder / "schema.json"), "--fhe-samples", "0", "--out", str(run)]
    subprocess.run([sys.executable, "-m", "fedfhe", *command], check=True, env=ENV, capture_output=True)
    return run, folder / "lab.csv"


def main() -> None:
    """Install, compare, time; write the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "serve-bench")
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "client.json")
    args = parser.parse_args()
    _, X, _, inputs = bench_run(args.run, args.rows)
    full = str(Path(sys.executable).parent / "fedfhe")
    with tempfile.TemporaryDirectory(prefix="client-bench-") as name:
        tmp = Path(name)
        installed = install(tmp / "venv-client")
        print(f"client install: {installed}", flush=True)
        thin = str(tmp / "venv-client" / "bin" / "fedfhe")
        label_run = tmp / "label-run"
        shutil.copytree(args.run, label_run)
        compile_label = [sys.executable, "-m", "fedfhe", "compile", "--run", str(label_run), "--outputs", "label"]
        subprocess.run(compile_label, check=True, env=ENV, capture_output=True)
        table, lab = table_run(tmp)
        np.save(tmp / "rows.npy", X)
        np.save(tmp / "few.npy", X[:20])
        np.save(tmp / "one.npy", X[:1])
        same, started, cold, first = {}, [], [], 0.0
        for served, rows in ((args.run, tmp / "few.npy"), (label_run, tmp / "few.npy"), (table, lab)):
            port = free_port()
            serve = ["-m", "fedfhe", "serve", "--run", str(served), "--port", str(port), "--workers", "2"]
            with process([*serve, "--key-store", str(tmp / f"store-{served.name}")], port) as (url, _):
                records = [predict(f, rows, url, tmp / f"keys-{i}-{served.name}") for i, f in enumerate((thin, full))]
                same[served.name] = records[0] == records[1]
                print(f"{served.name}: the client install answers as the full one: {same[served.name]}", flush=True)
                if served == args.run:
                    keys = tmp / f"keys-0-{served.name}"  # the client install's, made and uploaded above
                    one = [thin, "predict", str(tmp / "one.npy"), "--server", url, "--key-dir", str(keys), "--json"]
                    started = [timed(one) for _ in range(args.repeats)]
                    many = [thin, "predict", str(tmp / "rows.npy"), "--server", url, "--key-dir", str(keys)]
                    many += ["--out", str(tmp / "preds.csv")]
                    fresh = [thin, "predict", str(tmp / "rows.npy"), "--server", url, "--key-dir", str(tmp / "new")]
                    first = timed([*fresh, "--out", str(tmp / "first.csv")])  # keys made and uploaded too
                    for _ in range(args.repeats):
                        (tmp / "preds.csv").unlink(missing_ok=True)
                        cold.append(len(X) / timed(many))
        chain = [sequential(args.run / "fhe", inputs, str(tmp / f"seq{i}"))[0] for i in range(args.repeats)]
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "client_install": installed,
        "answers_equal_the_full_install": same,
        "one_row_start_s": spread(started),
        "rows": len(X),
        "rows_per_s": {
            "sequential_chain": spread(chain),
            "client_install_cli_cold": spread(cold),
            "client_install_cli_first_run_with_keygen": len(X) / first,
        },
        "cold_cli_over_chain_median": statistics.median(cold) / statistics.median(chain),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
