"""`fedfhe serve` as an attacker and a careless operator meet it: slow clients, junk, hang-ups, kill -9, TLS, tokens."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from conftest import ENV, FEDFHE, Served, cli, copy_of, fedfhe, fhe_client, key_id, serving, wait_for

from fedfhe.errors import FedfheError
from fedfhe.federated.certificates import make_certificates
from fedfhe.service.access import token_label
from fedfhe.service.client import EncryptedClient
from fedfhe.service.processing import read_quantizers

pytestmark = [pytest.mark.server, pytest.mark.xdist_group("exposure")]  # one `guarded` server

OCTET = {"content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def rows(digits) -> np.ndarray:
    return digits.X_test[:4]


@pytest.fixture(scope="module")
def guarded(served_run, tmp_path_factory) -> Iterator[Served]:
    """One worker, a 3 s read deadline, at most 2 stored keys and 1 MiB of them, 20 MiB of bodies at once."""
    tmp = tmp_path_factory.mktemp("guarded")
    options = ("--workers", "1", "--read-timeout", "3", "--max-keys", "2", "--max-key-store-mb", "1")
    options += ("--max-inflight-mb", "20")
    with serving(served_run, tmp / "keys", tmp / "server.log", *options) as served:
        yield served


def log_lines(served: Served) -> list[str]:
    return served.log.read_text().splitlines()


def worker_pids(pid: int) -> list[int]:
    """The server's FHE worker processes."""
    return [c.pid for c in psutil.Process(pid).children() if "spawn_main" in " ".join(c.cmdline())]


def test_slow_clients_cannot_stop_the_service(served_run, rows, tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1300:
        pytest.skip(f"this test opens 1,100 sockets; the descriptor limit here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
    with serving(served_run, tmp_path / "keys", tmp_path / "log", "--workers", "1", nofile=1024) as served:
        port = int(served.url.rsplit(":", 1)[1])
        attackers = []
        upload = socket.create_connection(("127.0.0.1", port), timeout=30)  # an honest upload, under way
        body = os.urandom(4 << 20)
        upload.sendall(b"POST /v1/keys HTTP/1.1\r\nHost: x\r\ncontent-type: application/octet-stream\r\n")
        upload.sendall(f"content-length: {len(body)}\r\n\r\n".encode() + body[: 1 << 20])
        try:
            for _ in range(1100):  # never finish their headers
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
                attackers.append(s)
            start = time.monotonic()
            assert httpx.get(f"{served.url}/v1/health", timeout=2).status_code == 200
            assert time.monotonic() - start < 2
            with EncryptedClient(served.url, tmp_path / "client") as client:
                assert len(client.predict(rows).predicted) == len(rows)
            upload.sendall(body[1 << 20 :])  # its body was arriving: the idle connections went first
            assert upload.recv(4096).startswith(b"HTTP/1.1 400")  # junk keys, answered, not cut
        finally:
            for s in [*attackers, upload]:
                s.close()
    assert '"event": "connections-full"' in served.log.read_text()


def test_https_connections_count_from_the_tcp_accept(served_run, tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1300:
        pytest.skip(f"this test opens 1,100 sockets; the descriptor limit here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
    certs = make_certificates(tmp_path / "certs", ("127.0.0.1",))
    tls = ("--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"))
    ca = str(certs / "ca.crt")
    with serving(
        served_run, tmp_path / "keys", tmp_path / "log", "--workers", "1", *tls, verify=ca, nofile=1024
    ) as served:
        port = int(served.url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(1100)]  # no ClientHello
        try:
            start = time.monotonic()
            assert httpx.get(f"{served.url}/v1/health", timeout=2, verify=ca).status_code == 200
            assert time.monotonic() - start < 2
            assert idle[0].recv(1) == b""  # the oldest silent connection was closed to make room
        finally:
            for s in idle:
                s.close()
    assert '"event": "connections-full"' in served.log.read_text()


def test_a_request_must_arrive_whole_within_the_read_timeout(guarded):
    port = int(guarded.url.rsplit(":", 1)[1])
    slow = []
    for _ in range(20):  # a body announced, then never sent
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /v1/keys HTTP/1.1\r\nHost: x\r\ncontent-type: application/octet-stream\r\n")
        s.sendall(b"content-length: 100000\r\n\r\n" + b"x" * 10)
        slow.append(s)
    start = time.monotonic()
    for s in slow:
        assert s.recv(1024) == b""  # closed by the server, 3 s after the request began
        s.close()
    assert 2 < time.monotonic() - start < 8
    assert httpx.get(f"{guarded.url}/v1/health").status_code == 200


def test_a_client_hanging_up_mid_body_is_one_log_line_not_a_500(guarded):
    port = int(guarded.url.rsplit(":", 1)[1])
    before = len(log_lines(guarded))
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/keys HTTP/1.1\r\nHost: x\r\ncontent-type: application/octet-stream\r\n")
            s.sendall(b"content-length: 100000\r\n\r\n" + b"x" * 100)
    wait_for(lambda: sum('"status": 499' in line for line in log_lines(guarded)[before:]) == 200, 30, "200 log lines")
    new = log_lines(guarded)[before:]
    assert not any("Traceback" in line or '"status": 500' in line for line in new)
    assert 'status="500"' not in httpx.get(f"{guarded.url}/metrics").text


def test_bodies_in_flight_share_one_budget(guarded):
    port = int(guarded.url.rsplit(":", 1)[1])
    first = socket.create_connection(("127.0.0.1", port), timeout=10)  # 12 MiB announced, 1 MiB sent so far
    first.sendall(b"POST /v1/keys HTTP/1.1\r\nHost: x\r\ncontent-type: application/octet-stream\r\n")
    first.sendall(f"content-length: {12 << 20}\r\n\r\n".encode() + b"x" * (1 << 20))
    try:
        refused = httpx.post(f"{guarded.url}/v1/keys", content=b"y" * (10 << 20), headers=OCTET, timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "holds 12582912 bytes of request bodies, the most it takes is 20971520" in refused.json()["detail"]
        first.sendall(b"x" * (11 << 20))
        assert first.recv(4096).startswith(b"HTTP/1.1 400")  # read whole and answered: its bytes are free again
    finally:
        first.close()
    again = httpx.post(f"{guarded.url}/v1/keys", content=b"y" * (10 << 20), headers=OCTET, timeout=30)
    assert again.status_code == 400


def test_evaluation_keys_must_be_the_keys_alone(guarded, rows, tmp_path):
    with EncryptedClient(guarded.url, tmp_path / "a") as client:
        client.predict(rows[:1])
    keys = fhe_client(tmp_path / "a").get_serialized_evaluation_keys()
    stored = httpx.get(f"{guarded.url}/v1/health").json()["keys"]
    response = httpx.post(f"{guarded.url}/v1/keys", content=keys + os.urandom(15 << 20), headers=OCTET, timeout=60)
    assert response.status_code == 400 and "not Concrete evaluation keys alone" in response.json()["detail"]
    assert httpx.get(f"{guarded.url}/v1/health").json()["keys"] == stored


def test_max_keys_and_max_key_store_mb_bound_the_store(guarded, rows, tmp_path):
    def stale(name: str, size: int, mtime: int) -> None:
        """A key some earlier client left, last used at `mtime`."""
        path = guarded.store / f"{name * 64}.key"
        path.write_bytes(b"k" * size)
        os.utime(path, (mtime, mtime))

    with EncryptedClient(guarded.url, tmp_path / "client") as client:
        client.predict(rows[:1])
        own = guarded.store / f"{key_id(tmp_path / 'client')}.key"
        stale("c", 10, 0)
        stale("d", 10, 1)
        own.unlink()  # evicted meanwhile: the client uploads it again, and the store makes room by count
        client.predict(rows[:1])
        assert sorted(p.name[0] for p in guarded.store.glob("*.key")) == sorted(["d", own.name[0]])
        stale("e", 2 << 20, 2)
        own.unlink()  # again; now 2 MiB of keys are over --max-key-store-mb 1
        client.predict(rows[:1])
        assert [p.name for p in guarded.store.glob("*.key")] == [own.name]


@pytest.mark.parametrize("given", ["0" * 10_000, "a" * 64 + ".key", "../" * 30, "A" * 64, "", "%00" * 64])
def test_a_bad_key_id_is_always_422_without_its_echo(guarded, given):
    response = httpx.post(f"{guarded.url}/v1/predict", params={"key_id": given}, content=b"x", headers=OCTET)
    assert response.status_code == 422
    assert response.json() == {"detail": "key_id must be 64 lowercase hex digits"}
    no_id = httpx.post(f"{guarded.url}/v1/predict", content=b"x", headers=OCTET)
    assert no_id.status_code == 422


def test_health_counts_live_workers_and_a_dead_one_is_replaced_warm(guarded, rows, tmp_path):
    (first,) = worker_pids(guarded.pid)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: httpx.get(f"{guarded.url}/v1/health").json()["workers"] == 0, 10, "health to count the death")
    assert httpx.get(f"{guarded.url}/v1/health").status_code == 503
    wait_for(lambda: httpx.get(f"{guarded.url}/v1/health").json()["status"] == "ok", 120, "a warmed replacement")
    (second,) = worker_pids(guarded.pid)
    assert second != first
    with EncryptedClient(guarded.url, tmp_path / "after") as client:
        assert len(client.predict(rows).predicted) == len(rows)


def test_kill_9_of_the_server_takes_its_workers_with_it(served_run, tmp_path):
    with serving(served_run, tmp_path / "keys", tmp_path / "log", "--workers", "2") as served:
        children = [psutil.Process(p) for p in worker_pids(served.pid)]
        tracker = [c for c in psutil.Process(served.pid).children() if "resource_tracker" in " ".join(c.cmdline())]
        assert len(children) == 2
        os.kill(served.pid, signal.SIGKILL)
        wait_for(lambda: all(gone(p) for p in children + tracker), 5, "the workers and the resource tracker to exit")


def gone(process: psutil.Process) -> bool:
    """Exited (a zombie waiting to be reaped counts as gone)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_https_with_a_private_ca_and_bearer_tokens_with_a_rate(served_run, rows, tmp_path):
    certs = make_certificates(tmp_path / "certs", ("127.0.0.1",))
    tokens = [secrets.token_hex(16), secrets.token_hex(16)]
    (tmp_path / "tokens").write_text("# who may call\n" + "\n".join(tokens) + "\n")
    options = ("--workers", "1", "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"))
    options += ("--tokens", str(tmp_path / "tokens"), "--rate", "30")
    ca = str(certs / "ca.crt")
    with serving(served_run, tmp_path / "keys", tmp_path / "log", *options, verify=ca) as served:
        assert httpx.get(f"{served.url}/v1/health", verify=ca).status_code == 200  # health needs no token
        refused = httpx.get(f"{served.url}/v1/model", verify=ca)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        wrong = {"authorization": f"Bearer {secrets.token_hex(16)}"}
        assert httpx.get(f"{served.url}/v1/model", headers=wrong, verify=ca).status_code == 401
        with pytest.raises(httpx.HTTPError):
            httpx.get(served.url.replace("https", "http") + "/v1/health")
        for path in ("/docs", "/redoc", "/openapi.json"):  # the API's description is for token holders
            assert httpx.get(f"{served.url}{path}", verify=ca).status_code in (401, 404), path
        first = {"authorization": f"Bearer {tokens[0]}"}
        assert "/v1/predict" in httpx.get(f"{served.url}/openapi.json", headers=first, verify=ca).json()["paths"]
        with EncryptedClient(served.url, tmp_path / "c", token=tokens[0], ca_cert=ca) as client:
            assert len(client.predict(rows).predicted) == len(rows)
        with pytest.raises(FedfheError, match="CERTIFICATE_VERIFY_FAILED"):
            _ = EncryptedClient(served.url, tmp_path / "d", token=tokens[0]).model
        with pytest.raises(FedfheError, match="needs a valid token"):
            _ = EncryptedClient(served.url, tmp_path / "e", ca_cert=ca).model
        second = {"authorization": f"Bearer {tokens[1]}"}
        answers = [httpx.get(f"{served.url}/v1/model", headers=second, verify=ca) for _ in range(31)]
        assert [a.status_code for a in answers[:30]] == [200] * 30
        assert answers[30].status_code == 429 and int(answers[30].headers["retry-after"]) == 2
        metrics = httpx.get(f"{served.url}/metrics", headers=second, verify=ca)
        assert metrics.status_code == 429  # the rate counts every route
        limited, deadline = 2, time.monotonic() + 10
        while (metrics := httpx.get(f"{served.url}/metrics", headers=second, verify=ca)).status_code == 429:
            limited += 1  # refused requests take nothing from the bucket: it refills (one request every 2 s)
            assert time.monotonic() < deadline, "the token's rate never let a request through again"
            time.sleep(0.05)
        assert f'fedfhe_token_requests_total{{token="{token_label(tokens[1])}",status="429"}} {limited}' in metrics.text
        assert f'token="{token_label(tokens[0])}",status="200"' in metrics.text
        args = ["--server", served.url, "--ca-cert", ca, "--key-dir", str(tmp_path / "cli"), "--json"]
        done = fedfhe_with_token(tokens[0], "predict", *args, rows_file(rows, tmp_path))
        assert done.returncode == 0, done.stderr
        log = served.log.read_text()
        assert all(token not in log for token in tokens)


def rows_file(rows: np.ndarray, folder: Path) -> str:
    path = folder / "rows.npy"
    np.save(path, rows)
    return str(path)


def fedfhe_with_token(token: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI with the token in FEDFHE_TOKEN, as a user would export it."""
    env = {**ENV, "FEDFHE_TOKEN": token}
    return subprocess.run([*FEDFHE, *args], capture_output=True, text=True, env=env, timeout=120, check=False)


def weakened(spec: Path) -> None:
    """Rewrite a client.zip as a malicious server would: LWE dimension 1, no seed, ciphertexts readable by anyone."""
    with zipfile.ZipFile(spec) as original:
        files = {name: original.read(name) for name in original.namelist()}
    specs = json.loads(files["client.specs.json"])
    for key in specs["keyset"]["lweSecretKeys"]:
        key["params"]["lweDimension"] = 1
    for value in specs["circuits"][0]["inputs"]:
        info = value["typeInfo"]["lweCiphertext"]
        info["encryption"]["lweDimension"], info["compression"] = 1, "none"
        info["concreteShape"]["dimensions"][-1] = 2
    files["client.specs.json"] = json.dumps(specs).encode()
    with zipfile.ZipFile(spec, "w") as rewritten:
        for name, data in files.items():
            rewritten.writestr(name, data)


def test_a_server_serving_weak_crypto_parameters_gets_no_key_and_no_row(served_run, rows, tmp_path):
    run = copy_of(served_run, tmp_path)
    honest = hashlib.sha256((run / "fhe" / "client.zip").read_bytes()).hexdigest()
    assert cli("card", "--run", str(run)).returncode == 0
    pin = json.loads((run / "card.json").read_text())["pin"]  # the model and the honest circuit
    weakened(run / "fhe" / "client.zip")
    with serving(run, tmp_path / "store", tmp_path / "server.log", "--workers", "1") as served:
        facts = httpx.get(f"{served.url}/v1/model").json()  # the real model's facts: --expect-model is satisfied
        args = ["predict", rows_file(rows, tmp_path), "--server", served.url, "--expect-model", facts["model_sha256"]]
        done = cli(*args, "--key-dir", str(tmp_path / "a"))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert "refused, secret key 0 has dimension 1, under 450; no key was made" in lines[0]
        assert not (tmp_path / "a" / "keys").exists() and httpx.get(f"{served.url}/v1/health").json()["keys"] == 0
        done = cli(*args, "--key-dir", str(tmp_path / "b"), "--expect-spec", honest)
        assert done.returncode == 2 and f"not the expected {honest[:12]}: no key was made" in done.stderr
        pinned = ["predict", rows_file(rows, tmp_path), "--server", served.url, "--expect-model", pin]
        done = cli(*pinned, "--key-dir", str(tmp_path / "c"))  # the card alone: same model, another circuit
        assert done.returncode == 2 and f"(another circuit), not the expected {honest[:12]}" in done.stderr
        assert not (tmp_path / "c" / "keys").exists()
    assert hashlib.sha256((run / "fhe" / "client.zip").read_bytes()).hexdigest() == facts["client_spec_sha256"]


def test_the_client_reads_quantizers_as_numbers_and_never_decodes_a_type(served_run, guarded, rows, tmp_path):
    from concrete.ml.deployment import FHEModelClient

    run = copy_of(served_run, tmp_path)
    spec = run / "fhe" / "client.zip"
    reference = FHEModelClient(str(run / "fhe")).model  # Concrete ML's own reading (skops), of the honest file
    ours = read_quantizers(spec.read_bytes(), "here")
    rng = np.random.default_rng(0)
    X = rng.uniform(-0.2, 1.2, (64, rows.shape[1]))
    assert np.array_equal(ours.quantize(X), reference.quantize_input(X))
    outputs = rng.integers(-3000, 3000, (64, 10))
    expected = reference.post_processing(reference.dequantize_output(outputs))
    assert np.allclose(np.vstack([ours.scores(row, classifier=True) for row in outputs]), expected)
    with zipfile.ZipFile(spec) as original:
        files = {name: original.read(name) for name in original.namelist()}
    processing = json.loads(files["serialized_processing.json"])
    processing["model_type"]["serialized_value"] = "ff" * 64  # what Concrete ML would hand to skops: junk
    files["serialized_processing.json"] = json.dumps(processing).encode()
    with zipfile.ZipFile(spec, "w") as rewritten:
        for name, data in files.items():
            rewritten.writestr(name, data)
    with pytest.raises(zipfile.BadZipFile):  # Concrete ML's client hands that value to skops, as a zip
        FHEModelClient(str(run / "fhe"))
    with EncryptedClient(guarded.url, tmp_path / "honest") as client:
        honest = client.predict(rows)
    with (
        serving(run, tmp_path / "store", tmp_path / "server.log", "--workers", "1") as served,
        EncryptedClient(served.url, tmp_path / "k") as client,
    ):
        served_junk = client.predict(rows)
    assert served_junk.predicted.tolist() == honest.predicted.tolist()
    assert served_junk.scores is not None and honest.scores is not None
    assert np.allclose(served_junk.scores, honest.scores) and np.allclose(served_junk.scores.sum(axis=1), 1)


def test_careless_predict_options_are_one_line(guarded, rows, tmp_path):
    np.save(tmp_path / "rows.npy", np.repeat(rows, 8, axis=0))  # 32 rows: 16 KiB
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "big.png").write_bytes(b"\x89PNG" + b"\x00" * (2 << 20))
    cases = [
        (["--key-dir", str(tmp_path / "a-file"), str(tmp_path / "rows.npy")], "cannot be a key directory"),
        (["--max-input-mb", "0.01", str(tmp_path / "rows.npy")], "MiB on disk, more than the 0.0099"),
        (["--max-input-mb", "1", str(tmp_path / "big.png")], "more than the 1 MiB allowed"),
        (["--max-input-mb", "0", str(tmp_path / "rows.npy")], "--max-input-mb must be > 0"),
    ]
    for options, message in cases:
        done = cli("predict", "--server", guarded.url, *options)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], (options, done.stderr)
    remote = "http://203.0.113.7:8000"  # a documentation address: nothing is sent before the pin is refused
    done = cli("predict", "--server", remote, "--expect-spec", "nope", str(tmp_path / "rows.npy"))
    warning, error = done.stderr.strip().splitlines()
    assert done.returncode == 2 and warning.startswith(f"warning: {remote}: plain http to another host")
    assert "--expect-spec must be a client spec's sha256, 64 hex digits (got 'nope')" in error


def test_bad_serve_options_are_one_line_and_start_nothing(served_run, tmp_path, monkeypatch):
    from fedfhe.service.evaluator import Evaluator

    def started(self: Evaluator) -> None:
        raise AssertionError("FHE workers were started")  # what every refusal below must come before

    monkeypatch.setattr(Evaluator, "start", started)
    garbage = tmp_path / "garbage-run"
    shutil.copytree(served_run, garbage, ignore=shutil.ignore_patterns("keys"))
    (garbage / "fhe" / "server.zip").write_bytes(b"PK\x03\x04 not a circuit")
    (tmp_path / "empty").write_text("# nobody\n")
    (tmp_path / "short").write_text("abc\n")
    (tmp_path / "junk.pem").write_text("not a certificate")
    run = str(served_run)
    cases = [
        (["--port", "70000"], "--port must be between 1 and 65535"),
        (["--port", "0"], "--port must be between 1 and 65535"),
        (["--tls-cert", str(tmp_path / "junk.pem")], "--tls-cert and --tls-key go together"),
        (["--tls-cert", str(tmp_path / "junk.pem"), "--tls-key", str(tmp_path / "junk.pem")], "cannot be used"),
        (["--rate", "10"], "--rate limits each token: give --tokens too"),
        (["--tokens", str(tmp_path / "empty")], "the token list is empty"),
        (["--tokens", str(tmp_path / "short")], "shorter than 16 characters"),
        (["--tokens", str(tmp_path / "none")], "cannot read the token file"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--read-timeout", "0"], "--read-timeout must be > 0"),
        (["--max-keys", "0"], "--max-keys at least 1"),
    ]
    for options, message in cases:
        done = cli("serve", "--run", run, *options)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], (options, done.stderr)
    done = cli("serve", "--run", str(garbage), "--port", "0")
    assert done.returncode == 2 and "--port" in done.stderr  # options are checked before any worker starts
    done = fedfhe("serve", "--run", str(garbage), "--workers", "1", timeout=120)  # a real worker fails to load
    lines = [line for line in done.stderr.strip().splitlines() if not re.search(r"CUDA", line)]
    assert done.returncode == 2 and len(lines) == 1 and "server.zip: cannot be loaded" in lines[0], done.stderr


class Hostile(http.server.BaseHTTPRequestHandler):
    """A server that answers /v1/model as the test says: too much, too slowly, or with bad facts."""

    answer: tuple[str, bytes] = ("whole", b"{}")

    def do_GET(self) -> None:
        how, body = self.answer
        if how == "gzip":  # a bomb: 64 MiB of blanks in 64 KB, over the 1 MiB cap once unpacked
            body = gzip.compress(b" " * (64 << 20), compresslevel=1)
        encoding = "content-encoding: gzip\r\n" if how == "gzip" else ""
        head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{encoding}content-length: {len(body)}\r\n\r\n"
        try:  # MSG_NOSIGNAL: a client that hung up is an error here, never a SIGPIPE for the test's process
            pace = 0.5 if how == "trickle-head" else 0.0  # the status line and headers a byte at a time
            for part in list(head) if pace else [head]:
                self.connection.sendall(part.encode(), socket.MSG_NOSIGNAL)
                time.sleep(pace)
            if how == "trickle":
                for byte in body:
                    self.connection.sendall(bytes([byte]), socket.MSG_NOSIGNAL)
                    time.sleep(0.5)
            else:
                self.connection.sendall(body, socket.MSG_NOSIGNAL)
        except OSError:
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hostile() -> Iterator[tuple[str, type[Hostile]]]:
    """A real HTTP server on a free loopback port, answering as Hostile.answer says."""
    handler = type("Answering", (Hostile,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True  # a trickling answer ends when the client hangs up, not before shutdown
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


FACTS = {"n_features": 2, "classes": [0, 1], "input_low": [0, 0], "input_high": [1, 1], "client_spec_sha256": "a" * 64}


@pytest.mark.parametrize(
    "how, body, problem",
    [
        ("whole", b" " * (2 << 20), "an answer over 1048576 bytes; refused"),
        ("gzip", b"", "a compressed answer, which the client did not ask for; refused"),
        ("trickle", json.dumps({**FACTS, "max_batch": 8}).encode(), "no whole answer within 5 s"),
        ("trickle-head", json.dumps({**FACTS, "max_batch": 8}).encode(), "no whole answer within 5 s"),
        ("whole", json.dumps({**FACTS, "max_batch": 0}).encode(), "/v1/model: max_batch 0"),
        (
            "whole",
            json.dumps({**FACTS, "max_batch": 8, "inputs_used": [5]}).encode(),
            "inputs_used is not increasing feature indices below 2",
        ),
        ("whole", json.dumps({**FACTS, "max_batch": 8, "input_low": [0]}).encode(), "input_low is not 2 numbers"),
    ],
)
def test_a_hostile_server_cannot_flood_stall_or_mislead_the_client(hostile, tmp_path, how, body, problem):
    url, handler = hostile
    handler.answer = (how, body)
    start = time.monotonic()
    with (
        pytest.raises(FedfheError, match=re.escape(problem)) as refused,
        EncryptedClient(url, tmp_path / "k", timeout=5) as c,
    ):
        _ = c.model
    # A trickle is cut at 5 s; 10 leaves a loaded machine room for the other answers.
    assert "\n" not in str(refused.value) and time.monotonic() - start < 10
