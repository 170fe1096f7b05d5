"""The encrypted inference service over real HTTP: `fedfhe serve` subprocesses and EncryptedClient."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import (
    ENV,
    HEAVY,
    Served,
    answers_equal_concretes,
    cli,
    fedfhe,
    fhe_client,
    free_port,
    key_id,
    serving,
    wait_for,
)

from fedfhe.errors import FedfheError
from fedfhe.service.client import EncryptedClient, image_row
from fedfhe.service.crypto import CircuitKeys
from fedfhe.service.keystore import KeyStore, UnknownKey
from fedfhe.service.protocol import BatchTooLarge, decode_frames, encode_frames

pytestmark = [pytest.mark.xdist_group("service")]  # the module's server and client, built once

OCTET = {"content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def run_dir(served_run) -> Path:
    """The compiled digits run every server of this module serves."""
    return served_run


@pytest.fixture(scope="module")
def rows(digits) -> np.ndarray:
    """Raw digits rows; the circuit itself takes them divided by 16 (each feature's range mapped to [0, 1])."""
    return digits.X_test[:8]


@pytest.fixture(scope="module")
def inputs(run_dir, rows) -> np.ndarray:
    """The rows as the circuit takes them: scaled to [0, 1] (digits: / 16), the features no output weighs left out."""
    from fedfhe.model import LinearModel

    model = LinearModel.load(run_dir / "model.npz")
    assert len(model.used_features) < model.n_features  # digits' always-blank pixels leave the circuit
    return model.scale(rows)[:, model.used_features]


@pytest.fixture(scope="module")
def truth(run_dir, rows) -> np.ndarray:
    """What the compiled circuit predicts locally, in simulation."""
    from fedfhe.fhe import load_compiled
    from fedfhe.model import LinearModel

    compiled = load_compiled(run_dir, LinearModel.load(run_dir / "model.npz"))
    return compiled.predict(rows, fhe="simulate")


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory) -> Iterator[Served]:
    """One server for the module: 2 workers, 1 MiB bodies, 16 ciphertexts per request."""
    tmp = tmp_path_factory.mktemp("server")
    options = ("--workers", "2", "--max-body-mb", "1", "--max-key-mb", "1", "--max-batch", "16")
    with serving(run_dir, tmp / "keys", tmp / "server.log", *options) as served:
        yield served


@pytest.fixture(scope="module")
def alice(server, rows, tmp_path_factory) -> Iterator[EncryptedClient]:
    """A client that has already made its keys and uploaded them."""
    client = EncryptedClient(server.url, tmp_path_factory.mktemp("alice") / "keys")
    client.predict(rows[:1])
    yield client
    client.close()


def post_predict(url: str, key: str, body: bytes, headers: dict[str, str] = OCTET) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", params={"key_id": key}, content=body, headers=headers, timeout=60)


def request_count(url: str, route: str) -> int:
    """Requests to a route so far, from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    return sum(
        int(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(f'fedfhe_requests_total{{route="{route}"')
    )


@pytest.mark.server
@pytest.mark.fhe
def test_predictions_equal_local_simulation(alice, rows, truth):
    result = alice.predict(rows)
    np.testing.assert_array_equal(result.predicted, truth)
    assert result.scores.shape == (len(rows), 10)
    assert alice.observed is None  # digits, not a user's table: no observed ranges in its client spec
    assert (alice.key_dir.stat().st_mode & 0o777) == 0o700
    written = [p for p in alice.key_dir.rglob("*") if p.is_file()]
    assert written and all((p.stat().st_mode & 0o777) == 0o600 for p in written)


@pytest.mark.server
@pytest.mark.fhe
def test_two_clients_at_the_same_time_each_get_their_own_results(server, rows, truth, tmp_path):
    def classify(name: str) -> np.ndarray:
        with EncryptedClient(server.url, tmp_path / name) as client:
            return client.predict(rows).predicted

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(classify, ["a", "b"]))
    for classes in results:
        np.testing.assert_array_equal(classes, truth)
    secrets = [(tmp_path / name / "keys").rglob("secretKey*") for name in ("a", "b")]
    first, second = ([p.read_bytes() for p in found] for found in secrets)
    assert first and first != second


@pytest.mark.server
@pytest.mark.fhe
def test_results_for_one_client_do_not_decrypt_with_another_clients_key(server, alice, rows, inputs, truth, tmp_path):
    with EncryptedClient(server.url, tmp_path / "bob") as bob:
        bob.predict(rows[:1])
    a, b = fhe_client(alice.key_dir), fhe_client(tmp_path / "bob")
    body = encode_frames([a.quantize_encrypt_serialize(row[None, :]) for row in inputs])
    response = post_predict(server.url, key_id(alice.key_dir), body)
    assert response.status_code == 200
    outputs = decode_frames(response.content, len(rows))
    own = np.vstack([a.deserialize_decrypt_dequantize(o) for o in outputs])
    other = np.vstack([b.deserialize_decrypt_dequantize(o) for o in outputs])
    np.testing.assert_array_equal(own.argmax(axis=1), truth)
    assert not np.allclose(own, other, atol=1e-3)
    assert (other.argmax(axis=1) == truth).mean() < 0.5


@pytest.mark.server
@pytest.mark.fhe
def test_the_client_on_concretes_compiler_answers_as_concretes_own_client(server, alice, rows, inputs):
    uploads = request_count(server.url, "/v1/keys")
    answers_equal_concretes(server.url, alice.key_dir, rows[:3])  # a new client over the same key directory
    assert request_count(server.url, "/v1/keys") == uploads  # its keys are the ones already uploaded
    thin = CircuitKeys((alice.key_dir / "client.zip").read_bytes(), alice.key_dir / "keys")
    width = inputs.shape[1]
    fits = f"does not fit the circuit's input: shape (1, {width}), integers in [{thin.low}, {thin.high}]"
    for row in (np.full(width, thin.high + 1), np.zeros(width - 1, dtype=np.int64)):
        with pytest.raises(FedfheError, match=re.escape(fits)):
            thin.encrypt(row)


@pytest.mark.server
@pytest.mark.fhe
def test_predict_loads_concretes_compiler_alone(server, alice, rows, tmp_path):
    np.save(tmp_path / "row.npy", rows[:1])
    code = (
        "import sys\nfrom fedfhe.cli import main\ntry:\n    main()\nfinally:\n"
        f"    print('loaded', sorted(m for m in {HEAVY + ('concrete.compiler',)} if m in sys.modules), file=sys.stderr)"
    )
    args = ["predict", str(tmp_path / "row.npy"), "--server", server.url, "--key-dir", str(alice.key_dir), "--json"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "loaded ['concrete.compiler']"  # and none of HEAVY
    assert len(json.loads(done.stdout)) == 1


@pytest.mark.server
@pytest.mark.fhe
def test_unknown_or_malformed_key_id(server, alice, inputs):
    body = encode_frames([fhe_client(alice.key_dir).quantize_encrypt_serialize(inputs[:1])])
    response = post_predict(server.url, "0" * 64, body)
    assert response.status_code == 404 and "unknown key id" in response.json()["detail"]
    assert post_predict(server.url, "../../etc/passwd", body).status_code == 422


@pytest.mark.server
@pytest.mark.fhe
def test_bad_ciphertexts_are_400_and_the_next_request_works(server, alice, rows, inputs, truth):
    url, key = server.url, key_id(alice.key_dir)
    good = fhe_client(alice.key_dir).quantize_encrypt_serialize(inputs[:1])
    for body in (
        encode_frames([b"not a ciphertext" * 10]),
        encode_frames([good[: len(good) // 2]]),
        encode_frames([good])[:-10],
        encode_frames([good]) + b"trailing",
        b"\x00\x00",
    ):
        response = post_predict(url, key, body)
        assert response.status_code == 400, response.text
        assert response.json()["detail"]
    np.testing.assert_array_equal(alice.predict(rows).predicted, truth)


@pytest.mark.server
def test_garbage_key_upload_is_400(server):
    response = httpx.post(f"{server.url}/v1/keys", content=b"\x00garbage" * 8, headers=OCTET)
    assert response.status_code == 400
    assert "not Concrete evaluation keys" in response.json()["detail"]


@pytest.mark.server
@pytest.mark.fhe
def test_uploading_the_same_keys_twice_gives_the_same_id(server, alice):
    keys = fhe_client(alice.key_dir).get_serialized_evaluation_keys()
    ids = {httpx.post(f"{server.url}/v1/keys", content=keys, headers=OCTET).json()["key_id"] for _ in range(2)}
    assert ids == {hashlib.sha256(keys).hexdigest()}


@pytest.mark.server
@pytest.mark.fhe
def test_too_large_bodies_and_batches_are_413(server, alice, inputs):
    url, key = server.url, key_id(alice.key_dir)
    big = b"\x00" * (1 << 20 | 1)
    assert post_predict(url, key, big).status_code == 413
    response = httpx.post(
        f"{url}/v1/predict", params={"key_id": key}, content=iter([big[:1000], big[1000:]]), headers=OCTET
    )
    assert response.status_code == 413  # streamed without Content-Length: the actual length counts
    assert httpx.post(f"{url}/v1/keys", content=big, headers=OCTET).status_code == 413
    good = fhe_client(alice.key_dir).quantize_encrypt_serialize(inputs[:1])
    response = post_predict(url, key, encode_frames([good] * 17))
    assert response.status_code == 413 and "over the limit of 16" in response.json()["detail"]


@pytest.mark.server
@pytest.mark.fhe
def test_wrong_content_type_is_415(server, alice):
    response = post_predict(server.url, key_id(alice.key_dir), b"{}", {"content-type": "application/json"})
    assert response.status_code == 415
    assert httpx.post(f"{server.url}/v1/keys", content=b"x", headers={"content-type": "text/plain"}).status_code == 415


@pytest.mark.server
@pytest.mark.fhe
def test_bad_inputs_fail_before_anything_is_sent(server, rows, tmp_path):
    url = server.url
    before = request_count(url, "/v1/keys"), request_count(url, "/v1/predict")
    nan = rows[:2].copy()
    nan[1, 3] = np.nan
    with EncryptedClient(url, tmp_path / "keys") as client:
        with pytest.raises(FedfheError, match=r"shape \(2, 63\); expected \(n_samples, 64\)"):
            client.predict(rows[:2, :63])
        with pytest.raises(FedfheError, match="NaN"):
            client.predict(nan)
        with pytest.raises(FedfheError, match="outside the model's input range"):
            client.predict(rows[:1] + 100)
        assert client.predict(rows[:0]).scores.shape == (0, 10)
    assert not (tmp_path / "keys").exists()
    assert (request_count(url, "/v1/keys"), request_count(url, "/v1/predict")) == before


@pytest.mark.server
@pytest.mark.fhe
def test_client_refuses_a_server_whose_artifacts_differ(server, alice, rows, tmp_path):
    stale = tmp_path / "stale"
    shutil.copytree(alice.key_dir, stale)
    with open(stale / "client.zip", "ab") as f:
        f.write(b"\x00")  # the spec these keys were made for is no longer the one served
    with EncryptedClient(server.url, stale) as client, pytest.raises(FedfheError, match="holds keys for"):
        client.predict(rows[:1])


@pytest.mark.server
def test_model_and_client_spec(server, run_dir):
    from fedfhe.model import LinearModel

    model = httpx.get(f"{server.url}/v1/model").json()
    assert (model["dataset"], model["n_features"], model["classes"]) == ("digits", 64, list(range(10)))
    assert (model["input_low"], model["input_high"]) == ([0.0] * 64, [16.0] * 64)
    assert (model["kind"], model["n_bits"], model["max_batch"]) == ("logistic", 6, 16)
    assert model["inputs_used"] == LinearModel.load(run_dir / "model.npz").used_features.tolist()
    assert len(model["inputs_used"]) < 64  # digits' always-blank pixels are never encrypted
    spec = httpx.get(f"{server.url}/v1/client-spec")
    assert spec.headers["content-type"] == "application/zip"
    assert spec.content == (run_dir / "fhe" / "client.zip").read_bytes()
    assert hashlib.sha256(spec.content).hexdigest() == model["client_spec_sha256"]


@pytest.mark.server
def test_request_ids_json_logs_and_metrics(server):
    url, log = server.url, server.log
    response = httpx.get(f"{url}/v1/health", headers={"X-Request-ID": "test-123"})
    assert response.headers["x-request-id"] == "test-123"
    replaced = httpx.get(f"{url}/v1/health", headers={"X-Request-ID": "bad id/" + "x" * 80})
    assert len(replaced.headers["x-request-id"]) == 32
    metrics = httpx.get(f"{url}/metrics").text
    assert 'fedfhe_requests_total{route="/v1/health",method="GET",status="200"}' in metrics
    assert 'fedfhe_request_seconds_count{route="/v1/predict"}' in metrics
    assert "fedfhe_request_errors_total" in metrics

    def mine() -> list[dict]:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("request_id") == "test-123"]

    wait_for(lambda: bool(mine()), 10, "the request's log line")
    assert mine()[0]["path"] == "/v1/health" and mine()[0]["status"] == 200


@pytest.mark.server
@pytest.mark.fhe
def test_cli_predict_prints_json(server, rows, truth, tmp_path):
    np.save(tmp_path / "rows.npy", rows)
    args = [
        "predict",
        "--server",
        server.url,
        "--key-dir",
        str(tmp_path / "keys"),
        "--json",
        str(tmp_path / "rows.npy"),
    ]
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    assert [row["class"] for row in json.loads(done.stdout)] == truth.tolist()
    nobody = f"http://127.0.0.1:{free_port()}"
    refused = cli("predict", "--server", nobody, "--wait", "0.3", str(tmp_path / "rows.npy"))
    waiting, error = refused.stderr.strip().splitlines()  # the one line that it waits, then the usual error
    assert waiting == f"waiting up to 0.3 s for {nobody} to accept connections"
    assert refused.returncode == 2 and "refused" in error.lower()
    missing = cli("predict", "--server", server.url, "nope.npy")
    assert missing.returncode == 2 and "nope.npy: file not found" in missing.stderr


@pytest.fixture(scope="module")
def many(digits, run_dir) -> tuple[np.ndarray, np.ndarray]:
    """40 test rows and what the circuit predicts for them: the first row alone, then requests of 8."""
    from fedfhe.fhe import load_compiled
    from fedfhe.model import LinearModel

    X = digits.X_test[:40]
    return X, load_compiled(run_dir, LinearModel.load(run_dir / "model.npz")).predict(X, fhe="simulate")


@pytest.mark.server
@pytest.mark.fhe
def test_pipelined_prediction_in_worker_processes_equals_simulation(server, many, tmp_path, monkeypatch):
    import psutil

    from fedfhe.service import client as client_module

    monkeypatch.setattr(client_module, "SPAWN_SECONDS", 0.0)  # worth starting workers even for 40 small rows
    X, expected = many
    with EncryptedClient(server.url, tmp_path / "keys") as client:
        batches = list(client.predict_batches(X, jobs=2))
        assert [len(b.predicted) for b in batches] == [1, 8, 8, 8, 8, 7]
        np.testing.assert_array_equal(np.concatenate([b.predicted for b in batches]), expected)
        assert np.concatenate([b.rows for b in batches]).tolist() == list(range(1, 41))  # each batch its own rows
        workers = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2
        np.testing.assert_array_equal(client.predict(X, jobs=1).predicted, expected)  # in this process
        with pytest.raises(FedfheError, match="--jobs must be at least 1"):
            client.predict(X, jobs=0)
    psutil.wait_procs(workers, timeout=30)
    assert not any(p.is_running() for p in workers)


@pytest.mark.server
@pytest.mark.fhe
def test_encryption_workers_refuse_keys_other_than_the_uploaded_ones(alice):
    from fedfhe.service.encryptor import Encryptor, KeysDiffer

    encryptor = Encryptor(alice.key_dir / "client.zip", alice.key_dir / "keys", "0" * 64, 1)
    try:
        with pytest.raises(KeysDiffer, match="other keys than the ones uploaded"):
            encryptor.encrypt(np.zeros((1, 64), dtype=np.int64))
    finally:
        encryptor.close()


@pytest.mark.server
@pytest.mark.fhe
def test_cli_predict_writes_results_as_they_arrive(server, many, tmp_path):
    X, expected = many
    np.save(tmp_path / "rows.npy", X)
    common = ["predict", "--server", server.url, "--key-dir", str(tmp_path / "keys")]
    done = cli(*common, "--jobs", "1", "--out", str(tmp_path / "p.csv"), str(tmp_path / "rows.npy"))
    assert done.returncode == 0, done.stderr
    assert "40 row(s) written to" in done.stderr
    with open(tmp_path / "p.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["class"]) for r in table] == expected.tolist()
    assert list(table[0]) == ["row", "class", "name", *(f"score_{c}" for c in range(10))]
    done = cli(*common, "--out", str(tmp_path / "p.jsonl"), str(tmp_path / "rows.npy"))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["row"] for r in lines] == list(range(1, 41)) and [r["class"] for r in lines] == expected.tolist()
    np.save(tmp_path / "narrow.npy", X[:, :63])
    for args, message in [
        (["--out", str(tmp_path / "p.txt"), "rows.npy"], "write results to a .csv or a .jsonl file"),
        (["--json", "--out", str(tmp_path / "q.csv"), "rows.npy"], "choose one"),
        (["--jobs", "0", "rows.npy"], "--jobs must be at least 1"),
        (["--out", str(tmp_path / "n.csv"), "narrow.npy"], "expected (n_samples, 64)"),
    ]:
        refused = cli(*common, *args[:-1], str(tmp_path / args[-1]))
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("n.csv*")) and not list(tmp_path.glob("q.csv*"))


def test_a_results_file_keeps_the_finished_rows_when_a_run_fails(tmp_path):
    from fedfhe.service.client import ResultsFile

    path = tmp_path / "preds.jsonl"
    path.write_text("from an earlier run\n")
    kept = r"server gone \(2 row\(s\) done are in .*preds\.jsonl\.part\)"
    with pytest.raises(FedfheError, match=kept), ResultsFile(path) as results:
        results.write([{"row": 1, "value": 1.5}, {"row": 2, "value": 2.5}])
        raise FedfheError("server gone")
    assert path.read_text() == "from an earlier run\n"
    assert [json.loads(line)["value"] for line in (tmp_path / "preds.jsonl.part").read_text().splitlines()] == [
        1.5,
        2.5,
    ]


def test_names_that_look_like_formulas_reach_a_csv_as_text(tmp_path):
    from fedfhe.service.client import ResultsFile

    with ResultsFile(tmp_path / "preds.csv") as results:  # class names come from the server or a schema
        results.write([{"row": 1, "class": 1, "name": '=HYPERLINK("http://x")', "scores": {"@SUM(A1)": -0.5}}])
    header, row = (tmp_path / "preds.csv").read_text().splitlines()
    assert header == "row,class,name,score_@SUM(A1)" and row == '1,1,"\'=HYPERLINK(""http://x"")",-0.5'


@contextmanager
def behind_nginx(replicas: list[Served], prefix: Path) -> Iterator[str]:
    """deploy/nginx.conf as shipped, its placeholders filled, balancing the replicas; its URL."""
    port = free_port()
    conf = (Path(__file__).parents[1] / "deploy" / "nginx.conf").read_text()
    upstreams = "\n".join(f"server {r.url.removeprefix('http://')};" for r in replicas)
    conf = conf.replace("{{LISTEN}}", f"127.0.0.1:{port}").replace("{{UPSTREAMS}}", upstreams)
    conf = conf.replace("{{PREFIX}}", str(prefix))
    if os.geteuid() == 0:  # nginx's workers would otherwise drop to nobody, who cannot write `prefix`
        conf = "user root;\n" + conf
    (prefix / "nginx.conf").write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).is_file(), "nginx is missing: deploy/install-nginx.sh installs it (make test runs it)"
    proc = subprocess.Popen([nginx, "-c", str(prefix / "nginx.conf"), "-p", str(prefix), "-g", "daemon off;"])
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/v1/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(lambda: proc.poll() is not None or healthy(), 30, "nginx to answer")
        assert proc.poll() is None, f"nginx exited: {(prefix / 'error.log').read_text()[-500:]}"
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.server
@pytest.mark.fhe
def test_two_replicas_behind_nginx_share_one_key_store(run_dir, many, tmp_path):
    X, expected = many
    store, options = tmp_path / "store", ("--workers", "1", "--threads", "1")  # two replicas on one machine
    with (
        serving(run_dir, store, tmp_path / "a.log", *options) as a,
        serving(run_dir, store, tmp_path / "b.log", *options) as b,
        behind_nginx([a, b], tmp_path) as url,
        EncryptedClient(url, tmp_path / "keys") as client,
    ):
        np.testing.assert_array_equal(client.predict(X, jobs=1).predicted, expected)
        predicts = [request_count(r.url, "/v1/predict") for r in (a, b)]
        uploads = [request_count(r.url, "/v1/keys") for r in (a, b)]
    assert sum(predicts) == 6 and min(predicts) >= 2  # the first row alone, then 5 requests of 8: on both
    assert sum(uploads) == 1  # uploaded to one replica, found by the other in the shared store


@pytest.mark.server
@pytest.mark.fhe
def test_a_run_compiled_before_inputs_used_is_served_on_every_feature(run_dir, rows, tmp_path):
    from fedfhe import fhe
    from fedfhe.model import LinearModel

    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    model = LinearModel.load(old / "model.npz")
    every = np.arange(model.n_features)  # as fedfhe compiled before features no output weighs left the circuit
    fhe.export(fhe._compile(model, 6, fhe.bound_inputs(model), "input-range bounds", "scores", every), old)
    info = json.loads((old / "fhe" / "fhe.json").read_text())
    del info["inputs_used"]
    (old / "fhe" / "fhe.json").write_text(json.dumps(info))
    expected = fhe.load_compiled(old, model).predict(rows, fhe="simulate")
    with serving(old, tmp_path / "store", tmp_path / "s.log", "--workers", "1") as served:
        assert httpx.get(f"{served.url}/v1/model").json()["inputs_used"] == every.tolist()
        with EncryptedClient(served.url, tmp_path / "keys") as client:
            np.testing.assert_array_equal(client.predict(rows).predicted, expected)
    (old / "fhe" / "fhe.json").write_text(json.dumps({**info, "inputs_used": [5, 2]}))
    done = fedfhe("serve", "--run", str(old), "--port", str(free_port()))
    assert done.returncode == 2 and "inputs_used must be increasing feature indices below 64" in done.stderr


@pytest.mark.server
@pytest.mark.fhe
def test_keys_survive_a_server_restart(run_dir, rows, inputs, truth, tmp_path, monkeypatch):
    store, log = tmp_path / "store", tmp_path / "server.log"
    monkeypatch.setitem(ENV, "TMPDIR", str(tmp_path / "tmp"))  # the servers' temporary folders (Concrete's)
    (tmp_path / "tmp").mkdir()
    with serving(run_dir, store, log, "--workers", "1") as first, EncryptedClient(first.url, tmp_path / "c") as client:
        np.testing.assert_array_equal(client.predict(rows[:2]).predicted, truth[:2])
    assert list((tmp_path / "tmp").iterdir()) == []  # stopped by SIGTERM: nothing left behind
    with serving(run_dir, store, log, "--workers", "1", "--timeout", "0.001") as second:
        assert "leaked semaphore" not in log.read_text()  # the first server's resource tracker has spoken by now
        body = encode_frames([fhe_client(tmp_path / "c").quantize_encrypt_serialize(inputs[:1])])
        response = post_predict(second.url, key_id(tmp_path / "c"), body)
        assert response.status_code == 504  # so the key was found; 1 ms is too short for any FHE work
        assert request_count(second.url, "/v1/keys") == 0


@pytest.mark.server
@pytest.mark.fhe
def test_an_evicted_key_is_uploaded_again_transparently(server, alice, rows, truth):
    uploads = request_count(server.url, "/v1/keys")
    (server.store / f"{key_id(alice.key_dir)}.key").unlink()
    np.testing.assert_array_equal(alice.predict(rows[:2]).predicted, truth[:2])
    assert request_count(server.url, "/v1/keys") == uploads + 1


@pytest.mark.server
@pytest.mark.fhe
def test_a_dead_worker_is_replaced(server, alice, rows, truth):
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    pids = [int(p) for p in children if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    # The pool marks itself broken before it reaps its dead worker: once the pid is gone, it has noticed.
    wait_for(lambda: not Path(f"/proc/{pids[0]}").exists(), 30, "the pool to reap its killed worker")
    np.testing.assert_array_equal(alice.predict(rows).predicted, truth)


@pytest.mark.server
@pytest.mark.fhe
def test_cli_predict_reads_an_image(server, run_dir, digits, tmp_path):
    from PIL import Image

    from fedfhe.model import LinearModel

    # A real test digit the model classifies confidently, saved as a 32x32 grayscale PNG (light on dark).
    scores = LinearModel.load(run_dir / "model.npz").to_sklearn().decision_function(digits.X_test)
    right = np.flatnonzero(scores.argmax(axis=1) == digits.y_test)
    i = int(right[np.argmax(np.sort(scores[right], axis=1)[:, -1] - np.sort(scores[right], axis=1)[:, -2])])
    pixels = np.round(digits.X_test[i].reshape(8, 8) / 16 * 255).astype(np.uint8)
    Image.fromarray(np.kron(pixels, np.ones((4, 4), dtype=np.uint8))).save(tmp_path / "digit.png")
    done = cli(
        "predict", "--server", server.url, "--key-dir", str(tmp_path / "keys"), "--json", str(tmp_path / "digit.png")
    )
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert row["class"] == digits.y_test[i] and abs(sum(row["scores"].values()) - 1) < 0.05


def test_serve_refuses_a_run_without_artifacts(tmp_path):
    done = fedfhe("serve", "--run", str(tmp_path))
    assert done.returncode == 2 and "model file not found" in done.stderr


def test_image_row_is_light_on_dark_in_the_input_range(tmp_path):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (100, 100), "white")
    ImageDraw.Draw(image).line([(50, 10), (50, 90)], fill="black", width=12)
    image.save(tmp_path / "digit.png")
    row = image_row(tmp_path / "digit.png", 784, (0.0, 255.0))
    assert row.shape == (1, 784) and row.min() >= 0 and row.max() <= 255
    square = row.reshape(28, 28)
    assert square[0, 0] < 10 and square[14, 14] > 200
    with pytest.raises(FedfheError, match="not a square image"):
        image_row(tmp_path / "digit.png", 10, (0.0, 1.0))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(FedfheError, match="not a readable image"):
        image_row(tmp_path / "bad.png", 64, (0.0, 16.0))


def test_key_store_is_idempotent_bounded_and_least_recently_used(tmp_path):
    store = KeyStore(tmp_path / "keys", max_keys=2, max_bytes=1000)
    first, second = store.put(b"a" * 100), store.put(b"b" * 100)
    assert store.put(b"a" * 100) == first == hashlib.sha256(b"a" * 100).hexdigest()
    os.utime(store.root / f"{second}.key", (0, 0))
    store.get(first)  # used now, so `second` is the least recently used
    third = store.put(b"c" * 100)
    assert len(store) == 2 and store.get(third) == b"c" * 100
    with pytest.raises(UnknownKey):
        store.get(second)
    store.put(b"d" * 901)  # over the byte limit: only the newest stays
    assert len(store) == 1
    for bad in ("../" * 10, "A" * 64, first + "0"):
        with pytest.raises(UnknownKey, match="malformed"):
            store.get(bad)
    assert not list(store.root.glob("*.tmp"))


def test_processes_sharing_a_key_store_keep_its_limits(tmp_path):
    """Replicas share one directory: 2 processes store 40 keys each at once into a store of at most 5."""
    code = (
        "import sys; from pathlib import Path; from fedfhe.service.keystore import KeyStore\n"
        "store = KeyStore(Path(sys.argv[1]), max_keys=5)\n"
        "print(' '.join(store.put(f'{sys.argv[2]}-{i}'.encode() * 1000) for i in range(40)))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "keys"), name], stdout=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    stored = [p.communicate(timeout=60)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    kept = {path.stem for path in (tmp_path / "keys").glob("*.key")}
    assert len(kept) == 5 and len(KeyStore(tmp_path / "keys", max_keys=5)) == 5
    assert kept <= set(stored[0][-5:] + stored[1][-5:])  # older keys had 5 newer ones: least recently used
    assert not list((tmp_path / "keys").glob("*.tmp"))


def test_framing_round_trip_and_refusals():
    frames = [b"", b"x", b"y" * 70_000]
    assert decode_frames(encode_frames(frames), 3) == frames
    with pytest.raises(BatchTooLarge):
        decode_frames(encode_frames(frames), 2)
    for body in (b"", struct.pack(">I", 0), encode_frames(frames)[:-1], encode_frames(frames) + b"\x00"):
        with pytest.raises(FedfheError):
            decode_frames(body, 3)


@pytest.mark.server
@pytest.mark.fhe
def test_a_regressor_with_per_feature_ranges_is_served(tmp_path):
    from fedfhe.data import load_dataset
    from fedfhe.fhe import load_compiled
    from fedfhe.model import LinearModel

    run = tmp_path / "run"
    args = ["run", "--dataset", "diabetes", "--model", "ridge", "--clients", "1", "--fhe-samples", "0"]
    done = cli(*args, "--out", str(run))
    assert done.returncode == 0, done.stderr
    rows = load_dataset("diabetes", seed=0).X_test[:4]
    expected = load_compiled(run, LinearModel.load(run / "model.npz")).predict(rows, fhe="simulate")
    np.save(tmp_path / "rows.npy", rows)
    with serving(run, tmp_path / "store", tmp_path / "server.log", "--workers", "1") as served:
        assert httpx.get(f"{served.url}/v1/model").json()["kind"] == "ridge"
        predict = ["predict", "--server", served.url, "--key-dir", str(tmp_path / "keys"), "--json"]
        done = cli(*predict, str(tmp_path / "rows.npy"))
        assert done.returncode == 0, done.stderr
        np.testing.assert_allclose([row["value"] for row in json.loads(done.stdout)], expected, rtol=1e-9)
        too_high = rows[:1].copy()
        too_high[0, 9] = 400.0  # glucose above the declared 150
        np.save(tmp_path / "bad.npy", too_high)
        done = cli(*predict, str(tmp_path / "bad.npy"))
        assert done.returncode == 2 and "column 9 has values in [400, 400]" in done.stderr
