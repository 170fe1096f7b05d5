"""Load and soak: concurrent Locust clients against `fedfhe serve` for minutes; errors, latency, memory.

`fedfhe serve` (2 workers, bearer tokens) serves the mnist-5k model at n_bits 8. Locust users
(benchmarks/soak_locustfile.py) replay real ciphertexts without pause. Measured: requests, failures,
p50/p99 per route, throughput, 5xx and tracebacks in the server log, server + worker RSS sampled
every 5 s (start = after warm-up, end = last sample), and afterwards every replayed ciphertext is
decrypted and checked against local FHE simulation.

With --tls the server answers HTTPS only (a private CA made for the run; Locust and every check verify
against it): the same soak through the TLS layer that counts connections from the TCP accept.

Usage: .venv/bin/pip install -c constraints.txt -e ".[bench]"
       .venv/bin/python benchmarks/soak_bench.py [--users 8] [--minutes 5] [--tls]  -> results/soak[_https].json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
RUN_COMMAND = ["run", "--dataset", "mnist-5k", "--clients", "1", "--n-bits", "8", "--fhe-samples", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (the server and its FHE workers)."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def main() -> None:
    """Serve, prepare ciphertexts, soak with Locust, then check memory, logs and decryptions."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=HERE.parent / "runs" / "soak")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a private CA")
    parser.add_argument("--out", type=Path, default=None, help="default results/soak.json (--tls: soak_https.json)")
    args = parser.parse_args()
    args.out = args.out or HERE / "results" / ("soak_https.json" if args.tls else "soak.json")
    if not (args.run / "fhe" / "server.zip").is_file():
        subprocess.run([sys.executable, "-m", "fedfhe", *RUN_COMMAND, "--out", str(args.run)], check=True, env=ENV)

    from concrete.ml.deployment import FHEModelClient

    from fedfhe.data import load_dataset
    from fedfhe.federated.certificates import make_certificates
    from fedfhe.fhe import load_compiled
    from fedfhe.model import LinearModel
    from fedfhe.service.protocol import decode_frames, encode_frames

    model = LinearModel.load(args.run / "model.npz")
    rows = load_dataset("mnist-5k", seed=0).X_test[:32]
    compiled = load_compiled(args.run, model)
    expected = compiled.predict(rows, fhe="simulate")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        soak = Path(tmp)
        token = secrets.token_hex(16)
        (soak / "tokens").write_text(token + "\n")
        (soak / "token").write_text(token)
        port = free_port()
        url = f"{'https' if args.tls else 'http'}://127.0.0.1:{port}"
        serve = [sys.executable, "-m", "fedfhe", "serve", "--run", str(args.run), "--port", str(port)]
        serve += ["--workers", str(args.workers), "--key-store", str(soak / "store"), "--tokens", str(soak / "tokens")]
        verify: str | bool = True
        if args.tls:
            certs = make_certificates(soak / "certs", ("127.0.0.1",))
            serve += ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")]
            verify = str(certs / "ca.crt")
        http = httpx.Client(verify=verify, timeout=60)
        log = soak / "server.log"
        with open(log, "wb") as err:
            server = subprocess.Popen(serve, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"fedfhe serve did not start: {log.read_text()[-2000:]}")
                try:
                    if http.get(f"{url}/v1/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            auth = {"authorization": f"Bearer {token}"}
            client = FHEModelClient(str(args.run / "fhe"), key_dir=str(soak / "keys"))
            client.generate_private_and_evaluation_keys()
            keys = client.get_serialized_evaluation_keys()
            octet = {**auth, "content-type": "application/octet-stream"}
            key_id = http.post(f"{url}/v1/keys", content=keys, headers=octet).json()["key_id"]
            (soak / "key_id").write_text(key_id)
            frames = []
            for i, row in enumerate(compiled.inputs(rows)):
                frames.append(encode_frames([client.quantize_encrypt_serialize(row[None, :])]))
                (soak / f"frame-{i:03d}.bin").write_bytes(frames[-1])
            for frame in frames[:4]:  # warm-up: every worker has run the circuit before the first sample
                http.post(f"{url}/v1/predict", params={"key_id": key_id}, content=frame, headers=octet)

            samples: list[tuple[float, int]] = []
            stop = threading.Event()

            def sample() -> None:
                start = time.monotonic()
                while not stop.is_set():
                    samples.append((time.monotonic() - start, tree_rss(server.pid)))
                    stop.wait(5)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            locust = [str(Path(sys.executable).parent / "locust"), "-f", str(HERE / "soak_locustfile.py")]
            locust += ["--headless", "-u", str(args.users), "-r", str(args.users), "-t", f"{int(args.minutes * 60)}s"]
            locust += ["--host", url, "--csv", str(soak / "locust"), "--only-summary", "--loglevel", "WARNING"]
            started = time.perf_counter()
            locust_env = {**ENV, "SOAK_DIR": str(soak), "SOAK_CA": verify if isinstance(verify, str) else ""}
            subprocess.run(locust, env=locust_env, check=False, capture_output=True)
            wall = time.perf_counter() - started
            stop.set()
            sampler.join()

            agree = []
            for frame, want in zip(frames, expected):
                answer = http.post(f"{url}/v1/predict", params={"key_id": key_id}, content=frame, headers=octet)
                (out,) = decode_frames(answer.content, 1)
                agree.append(int(np.argmax(client.deserialize_decrypt_dequantize(out))) == int(want))
        finally:
            http.close()
            server.terminate()
            server.wait(timeout=60)
        with open(soak / "locust_stats.csv") as f:
            stats = {row["Name"]: row for row in csv.DictReader(f)}
        lines = log.read_text().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        server_5xx = sum(1 for r in records if r.get("event") == "request" and r.get("status", 0) >= 500)
        tracebacks = sum("Traceback" in line for line in lines)

    def route(name: str) -> dict:
        row = stats[name]
        return {
            "requests": int(row["Request Count"]),
            "failures": int(row["Failure Count"]),
            "p50_ms": float(row["50%"]),
            "p99_ms": float(row["99%"]),
            "per_s": float(row["Requests/s"]),
        }

    first = [rss for t, rss in samples if t <= 60] or [samples[0][1]]
    last = [rss for t, rss in samples if t >= samples[-1][0] - 60]
    result = {
        "setup": {
            "users": args.users,
            "minutes": args.minutes,
            "workers": args.workers,
            "model": "mnist-5k logistic, n_bits 8",
            "auth": "bearer token",
            "transport": "https (private CA, verified)" if args.tls else "http",
        },
        "wall_s": wall,
        "routes": {name: route(name) for name in ("/v1/predict", "/v1/model", "/v1/health", "Aggregated")},
        "server_5xx": server_5xx,
        "tracebacks": tracebacks,
        "rss_mb": {
            "start": samples[0][1] / 2**20,
            "end": samples[-1][1] / 2**20,
            "first_minute_median": statistics.median(first) / 2**20,
            "last_minute_median": statistics.median(last) / 2**20,
            "max": max(rss for _, rss in samples) / 2**20,
        },
        "rss_growth": statistics.median(last) / statistics.median(first) - 1,
        "decrypted_equal_simulation": float(np.mean(agree)),
        "samples": [(round(t, 1), round(rss / 2**20, 1)) for t, rss in samples],
    }
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
