"""Latency and throughput of encrypted inference (issue #3); writes results/serve.json.

Three ways to evaluate the same ciphertexts with 1, 2 and 4 concurrent clients, each setting repeated
(--repeats, min/median/max of throughput):
- in_process: FHEModelServer.run called directly (threads), the floor without HTTP;
- reference_async: a FastAPI server evaluating inside its async handler, as Concrete ML's example does;
- fedfhe_serve: `fedfhe serve`, evaluating in a process pool.
Each request carries one ciphertext. Encryption and decryption are client costs, timed apart.
For `fedfhe serve`, each repeat also records how busy each FHE worker was (CPU seconds over wall
seconds) and how busy the whole machine was, so a slow repeat says whether a worker sat idle.

Usage: .venv/bin/python benchmarks/serve_bench.py [--run DIR] [--requests 40] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from fastapi import FastAPI, Request, Response

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
RUN_COMMAND = ["run", "--dataset", "mnist-5k", "--clients", "1", "--fhe-samples", "0"]
CONCURRENCY = (1, 2, 4)
OCTET = {"content-type": "application/octet-stream"}


def reference_app(fhe_dir: str, key_file: str) -> FastAPI:
    """The pattern to compare against: the circuit runs inside the async handler, blocking the event loop."""
    from concrete.ml.deployment import FHEModelServer

    from fedfhe.service.protocol import decode_frames, encode_frames

    server, key = FHEModelServer(fhe_dir), Path(key_file).read_bytes()
    app = FastAPI()

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        frames = decode_frames(await request.body(), 1 << 16)
        return Response(encode_frames([server.run(c, key) for c in frames]), media_type="application/octet-stream")

    return app


def bench_run(run: Path, rows: int) -> tuple:
    """The benchmarks' served model, trained and compiled on first use, its first test rows and labels, and
    those rows as its circuit takes them (scaled, only the features it was compiled on)."""
    if not (run / "fhe" / "server.zip").is_file():
        subprocess.run([sys.executable, "-m", "fedfhe", *RUN_COMMAND, "--out", str(run)], check=True, env=ENV)
    from fedfhe.artifacts import read_artifacts
    from fedfhe.data import load_dataset
    from fedfhe.model import LinearModel
    from fedfhe.rundir import RunDir

    model = LinearModel.load(run / "model.npz")
    data = load_dataset(model.metadata["dataset"], seed=model.metadata["training"]["seed"])
    X = data.X_test[:rows]
    return model, X, data.y_test[:rows], model.scale(X)[:, read_artifacts(RunDir(run), model).inputs_used]


def spread(values: list[float]) -> dict[str, float]:
    """min, median and max of repeated measurements."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process(args: list[str], port: int) -> Iterator[tuple[str, int]]:
    """A server subprocess, healthy before use and terminated after: its URL and pid."""
    proc = subprocess.Popen([sys.executable, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server {args} did not start")
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def load(jobs: list[bytes], concurrency: int, call: Callable[[bytes], bytes]) -> dict:
    """Send every job through `call` from `concurrency` threads; latency percentiles and throughput."""
    latencies: list[float] = []
    outputs: list[bytes] = [b""] * len(jobs)
    lock = threading.Lock()

    def one(i: int) -> None:
        start = time.perf_counter()
        outputs[i] = call(jobs[i])
        with lock:
            latencies.append(time.perf_counter() - start)

    call(jobs[0])  # warm-up, not timed
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(len(jobs))))
    wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p95_ms": 1000 * float(np.percentile(latencies, 95)),
        "throughput_per_s": len(jobs) / wall,
        "outputs": outputs,
    }


def repeated(jobs: list[bytes], concurrency: int, call: Callable[[bytes], bytes], repeats: int, pid: int = 0) -> dict:
    """`load` repeated: throughput min/median/max, median latencies; with a server pid, its workers' busy share."""
    import psutil

    runs = []
    for _ in range(repeats):
        workers = [p for p in psutil.Process(pid).children() if "spawn_main" in " ".join(p.cmdline())] if pid else []
        before = [sum(w.cpu_times()[:2]) for w in workers]
        machine = psutil.cpu_times()
        start = time.perf_counter()
        run = load(jobs, concurrency, call)
        wall = time.perf_counter() - start
        after = psutil.cpu_times()
        busy = sum(after[:3]) - sum(machine[:3])  # user, nice, system
        run["machine_busy"] = busy / (wall * (os.cpu_count() or 1))
        if workers:
            run["worker_busy"] = [(sum(w.cpu_times()[:2]) - b) / wall for w, b in zip(workers, before)]
        runs.append(run)
    throughput = [r["throughput_per_s"] for r in runs]
    summary = {
        "concurrency": concurrency,
        "throughput_per_s": spread(throughput),
        "p50_ms_median": statistics.median(r["p50_ms"] for r in runs),
        "p95_ms_median": statistics.median(r["p95_ms"] for r in runs),
        "machine_busy": [round(r["machine_busy"], 3) for r in runs],
        "outputs": runs[-1]["outputs"],
    }
    if pid:
        summary["worker_busy"] = [[round(b, 3) for b in r["worker_busy"]] for r in runs]
    return summary


def over_http(url: str, key_id: str) -> Callable[[bytes], bytes]:
    """One framed ciphertext per POST, a connection per thread."""
    from fedfhe.service.protocol import decode_frames, encode_frames

    local = threading.local()

    def call(ciphertext: bytes) -> bytes:
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=300)
        response = local.http.post(
            f"{url}/v1/predict", params={"key_id": key_id}, content=encode_frames([ciphertext]), headers=OCTET
        )
        response.raise_for_status()
        return decode_frames(response.content, 1)[0]

    return call


def main() -> None:
    """Build or reuse a run, encrypt test rows once, then time each way of serving them."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=HERE.parent / "runs" / "serve-bench")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve.json")
    args = parser.parse_args()
    model, _, y, inputs = bench_run(args.run, args.requests)

    from concrete.ml.deployment import FHEModelClient, FHEModelServer

    from fedfhe.service.protocol import encode_frames

    fhe_dir = args.run / "fhe"
    results: dict = {"in_process": [], "reference_async": [], "fedfhe_serve": []}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        client = FHEModelClient(str(fhe_dir), key_dir=f"{tmp}/client")
        client.generate_private_and_evaluation_keys()
        keys = client.get_serialized_evaluation_keys()
        Path(f"{tmp}/eval.key").write_bytes(keys)
        encrypt, jobs = [], []
        for row in inputs:
            start = time.perf_counter()
            jobs.append(client.quantize_encrypt_serialize(row[None, :]))
            encrypt.append(time.perf_counter() - start)

        server = FHEModelServer(str(fhe_dir))
        for c in CONCURRENCY:
            results["in_process"].append(repeated(jobs, c, lambda ct: server.run(ct, keys), args.repeats))

        port = free_port()
        code = f"import sys, uvicorn; sys.path.insert(0, {str(HERE)!r}); from serve_bench import reference_app; "
        code += f"uvicorn.run(reference_app({str(fhe_dir)!r}, {tmp + '/eval.key'!r}), port={port}, log_level='error')"
        with process(["-c", code], port) as (url, _):
            for c in CONCURRENCY:
                results["reference_async"].append(repeated(jobs, c, over_http(url, "unused"), args.repeats))

        port = free_port()
        serve = ["-m", "fedfhe", "serve", "--run", str(args.run), "--port", str(port)]
        serve += ["--workers", str(args.workers), "--key-store", f"{tmp}/store"]
        with process(serve, port) as (url, pid):
            key_id = httpx.post(f"{url}/v1/keys", content=keys, headers=OCTET).json()["key_id"]
            for c in CONCURRENCY:
                results["fedfhe_serve"].append(repeated(jobs, c, over_http(url, key_id), args.repeats, pid))
            spec_bytes = len(httpx.get(f"{url}/v1/client-spec").content)

        reference = results["in_process"][0]["outputs"]
        expected = [int(np.argmax(client.deserialize_decrypt_dequantize(o))) for o in reference]
        decrypt, agree = [], []
        for settings in results.values():
            for setting in settings:
                outputs = setting.pop("outputs")
                start = time.perf_counter()
                classes = [int(np.argmax(client.deserialize_decrypt_dequantize(o))) for o in outputs]
                decrypt.append((time.perf_counter() - start) / len(outputs))
                agree.append(classes == expected)
    result = {
        "run": str(args.run),
        "dataset": model.metadata["dataset"],
        "n_features": model.n_features,
        "requests_per_setting": len(jobs),
        "repeats": args.repeats,
        "workers": args.workers,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "latency_and_throughput": results,
        "client_ms": {"encrypt_median": 1000 * statistics.median(encrypt), "decrypt_median": 1000 * min(decrypt)},
        "bytes_per_prediction": {
            "request": len(encode_frames(jobs[:1])),
            "response": len(encode_frames([reference[0]])),
        },
        "bytes_once_per_client": {"evaluation_keys": len(keys), "client_spec": spec_bytes},
        "all_settings_agree_with_in_process": all(agree),
        "accuracy": float(np.mean(model.classes[expected] == y)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
