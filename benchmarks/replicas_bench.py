"""One `fedfhe serve` replica against two, behind nginx (deploy/nginx.conf), each with --workers 1 --threads 1;
writes results/replicas.json.

Both replicas share one key store. Measured per setting, --repeats times (min/median/max):
- server throughput: pre-encrypted MNIST rows, one per request, from 4 concurrent clients;
- end to end: EncryptedClient.predict of --rows rows through nginx (--jobs 2), encryption included.
Client, nginx and replicas share this machine's cores, as in predict_bench.py.

Usage: .venv/bin/python benchmarks/replicas_bench.py [--run DIR] [--rows 150] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_bench import OCTET, bench_run, free_port, over_http, process, repeated, spread


@contextmanager
def nginx(upstreams: list[str], prefix: str) -> Iterator[str]:
    """deploy/nginx.conf with its placeholders filled, in the foreground; its URL."""
    port = free_port()
    conf = (HERE.parent / "deploy" / "nginx.conf").read_text().replace("{{LISTEN}}", f"127.0.0.1:{port}")
    conf = conf.replace("{{UPSTREAMS}}", "\n".join(f"server {u.removeprefix('http://')};" for u in upstreams))
    conf = ("user root;\n" if os.geteuid() == 0 else "") + conf.replace("{{PREFIX}}", prefix)
    Path(prefix, "nginx.conf").write_text(conf)
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([binary, "-c", f"{prefix}/nginx.conf", "-p", prefix, "-g", "daemon off;"])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    """Encrypt rows once, then time 1 and 2 replicas on the same ciphertexts and rows."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=HERE.parent / "runs" / "serve-bench")
    parser.add_argument("--rows", type=int, default=150)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "replicas.json")
    args = parser.parse_args()
    _, X, _, inputs = bench_run(args.run, args.rows)

    from concrete.ml.deployment import FHEModelClient

    from fedfhe.service.client import EncryptedClient

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="replicas-bench-") as tmp:
        client = FHEModelClient(str(args.run / "fhe"), key_dir=f"{tmp}/raw")
        client.generate_private_and_evaluation_keys()
        keys = client.get_serialized_evaluation_keys()
        ciphertexts = [client.quantize_encrypt_serialize(row[None, :]) for row in inputs[: args.requests]]
        for replicas in (1, 2):
            with ExitStack() as stack:
                urls = []
                for i in range(replicas):
                    port = free_port()
                    serve = ["-m", "fedfhe", "serve", "--run", str(args.run), "--port", str(port)]
                    serve += ["--workers", "1", "--threads", "1", "--key-store", f"{tmp}/store{replicas}"]
                    urls.append(stack.enter_context(process(serve, port))[0])
                Path(f"{tmp}/nginx{replicas}").mkdir()
                url = stack.enter_context(nginx(urls, f"{tmp}/nginx{replicas}"))
                key_id = httpx.post(f"{url}/v1/keys", content=keys, headers=OCTET).json()["key_id"]
                server = repeated(ciphertexts, 4, over_http(url, key_id), args.repeats)
                server.pop("outputs")
                rates = []
                with EncryptedClient(url, f"{tmp}/client{replicas}") as encrypted:
                    for _ in range(args.repeats):
                        encrypted.predict(X[:33], jobs=2)  # warm: keys, encrypting workers
                        start = time.perf_counter()
                        encrypted.predict(X, jobs=2)
                        rates.append(len(X) / (time.perf_counter() - start))
                results[f"{replicas}_replica{'s' if replicas > 1 else ''}"] = {
                    "server_throughput_per_s": server["throughput_per_s"],
                    "server_p50_ms_median": server["p50_ms_median"],
                    "end_to_end_rows_per_s": spread(rates),
                }
                print(replicas, results, flush=True)
    one, two = results["1_replica"], results["2_replicas"]
    result = {
        "run": str(args.run),
        "rows": len(X),
        "requests": args.requests,
        "repeats": args.repeats,
        "workers_per_replica": 1,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        **results,
        "server_speedup_median": two["server_throughput_per_s"]["median"] / one["server_throughput_per_s"]["median"],
        "end_to_end_speedup_median": two["end_to_end_rows_per_s"]["median"] / one["end_to_end_rows_per_s"]["median"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
