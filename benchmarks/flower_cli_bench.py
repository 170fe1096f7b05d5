"""What Flower's own CLI costs on fedfhe's app: `fedfhe flower start`, `flwr run .` the first time and later.

The README's commands (digits, 3 clients, 2 rounds) from a checkout-like folder with its own FLWR_HOME
and ports, next to `fedfhe train` with the same settings, all in this one run; and the idle SuperLink's
memory (its process and children, resident).
Usage: .venv/bin/python benchmarks/flower_cli_bench.py  -> results/flower_cli.json
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
BIN = Path(os.environ.get("VIRTUAL_ENV", HERE.parent / ".venv")) / "bin"
SETTINGS = "clients=3 num-server-rounds=2 dataset='digits'"
RUNS = 3


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Wall seconds of one command, which must succeed."""
    started = time.perf_counter()
    subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - started


def main() -> None:
    """Start, three runs, the idle memory, stop; then `fedfhe train` with the same settings."""
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        (project / "pyproject.toml").write_bytes((HERE.parent / "pyproject.toml").read_bytes())
        env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "FLWR_HOME": str(Path(tmp) / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        }
        start = timed([str(BIN / "fedfhe"), "flower", "start", "--supernodes", "3"], project, env)
        try:
            runs = [
                timed(
                    [str(BIN / "flwr"), "run", ".", "--stream", "--run-config", f"{SETTINGS} out-dir='runs/r{i}'"],
                    project,
                    env,
                )
                for i in range(RUNS)
            ]
            link = next(
                c.pid for c in psutil.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])
            )  # fmt: skip
            family = [psutil.Process(link), *psutil.Process(link).children(recursive=True)]
            idle_mb = sum(p.memory_info().rss for p in family) / 2**20
        finally:
            stop = timed([str(BIN / "fedfhe"), "flower", "stop"], project, env)
        train = timed(
            [str(BIN / "fedfhe"), "train", "--dataset", "digits", "--clients", "3", "--rounds", "2", "--out", "runs/t"],
            project,
            env,
        )
    result = {
        "settings": SETTINGS,
        "fedfhe_flower_start_s": start,
        "flwr_run_s": runs,
        "flwr_run_first_s": runs[0],
        "flwr_run_later_median_s": statistics.median(runs[1:]),
        "fedfhe_train_s": train,
        "idle_superlink_rss_mb": idle_mb,
        "fedfhe_flower_stop_s": stop,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "flower_cli.json").write_text(json.dumps(result, indent=2))
    print(
        f"start {start:.1f} s; flwr run . first {runs[0]:.1f} s, later {result['flwr_run_later_median_s']:.1f} s; "
        f"fedfhe train {train:.1f} s; idle SuperLink {idle_mb:.0f} MB; stop {stop:.1f} s"
    )


if __name__ == "__main__":
    main()
