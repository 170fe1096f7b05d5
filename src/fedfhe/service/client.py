"""The encrypting client: keys are made and kept here; the server only gets evaluation keys and ciphertexts.

Key directory layout (0o700, files 0o600): client.zip (the server's client spec, pinned by hash on
first use; its quantizers are read as numbers, never with skops: processing.py), keys/ (Concrete's
keyset cache, private and evaluation keys, made and read with concrete.compiler alone: crypto.py), session.json
(the uploaded key id).
A server that later serves another client spec is refused: keys belong to one circuit. Before any key
is made the spec must be one a client can safely make keys for (spec.py), and, if the client pinned one
(`expect_spec`, the card's client-spec sha256, or the spec half of the card's pin), that very spec.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import re
import ssl
import tempfile
import threading
import time
import warnings
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Self, TextIO

import httpx
import numpy as np

from fedfhe.artifacts import valid_inputs_used
from fedfhe.data import Range, check_features, read_table
from fedfhe.decision import POINT_MEMBER, Point, decide, read_point
from fedfhe.errors import FedfheError
from fedfhe.problem import read_observed
from fedfhe.rundir import CLIENT_SPEC, SPEC_OBSERVED, SPEC_SCHEMA
from fedfhe.service.crypto import CircuitKeys
from fedfhe.service.encryptor import Encryptor
from fedfhe.service.processing import Quantizers, read_quantizers
from fedfhe.service.protocol import API, OCTET_STREAM, SPEC_HASH_HEADER, decode_frames, encode_frames
from fedfhe.service.spec import check_spec, member
from fedfhe.service.workers import usable_cores
from fedfhe.table import Problem, Schema, plain

SESSION_FILE = "session.json"
KEYS_DIR = "keys"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RATE_RETRIES, MAX_RATE_WAIT = 4, 60  # a rate-limited call is tried again this often, if told to wait at most this
MODEL_FIELDS = {"n_features", "classes", "input_low", "input_high", "client_spec_sha256", "max_batch"}
# The most a server's answer may hold, by route: facts, the client spec (a few KiB), a key id, a batch's outputs.
ANSWER_BYTES = {"model": 1 << 20, "client-spec": 16 << 20, "keys": 64 << 10, "predict": 64 << 20}


class PlainHttp(UserWarning):
    """The client talks plain http to another host: anyone on the way can read and change what is exchanged."""


class ServerError(FedfheError):
    """The server answered with an error status; `status` says which."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Refused(FedfheError):
    """The server's host refused the connection: nothing listens on its port (yet)."""


ROWS_PER_REQUEST = 8  # the server starts on the first rows while later ones encrypt; label rows take up to 0.7 s
SPAWN_SECONDS = 0.5  # starting the encrypting processes (0.45 s here, each importing Concrete's compiler bindings)
ON_INVALID = ("refuse", "skip")  # a table's invalid rows: refuse them all at once, or predict the others
RECORD_FIELDS = ("row", "class", "name", "value", "scores", "filled", "outside_observed")  # a result's own
REJECT_FIELDS = ("row", "column", "value", "reason")  # a rejected cell's own


@dataclass(frozen=True)
class Prediction:
    """Decrypted results: per row the predicted class (or a regressor's value), the scores behind it, which row of
    the input it is, and what to know about its inputs."""

    predicted: np.ndarray
    scores: np.ndarray | None  # None from a server with label outputs: it never sends the scores
    rows: np.ndarray  # each one's row in the input, numbered from 1 (a table's first data row, an array's first row)
    index: Any  # each one's label in the DataFrame predicted (an array's rows: their 0-based positions)
    filled: tuple[tuple[str, ...], ...] | None = None  # features filled as the schema declares (None: no schema)
    outside_observed: tuple[tuple[str, ...], ...] | None = None  # number features beyond the owners' observed range
    skipped: tuple[Problem, ...] = ()  # predict(on_invalid="skip"): the problems of the rows left out


@dataclass(frozen=True)
class Inputs:
    """Rows checked and encoded for the model, ready to encrypt, with which rows of the input they are."""

    X: np.ndarray  # in the model's input order
    rows: np.ndarray  # numbered from 1, as Prediction.rows
    index: Any
    filled: tuple[tuple[str, ...], ...] | None = None
    outside_observed: tuple[tuple[str, ...], ...] | None = None
    skipped: tuple[Problem, ...] = ()  # the problems of the rows left out (on_invalid="skip")

    def answered(self, predicted: np.ndarray, scores: np.ndarray | None, part: slice) -> Prediction:
        """The results of the rows `part`, with what is known of those rows."""
        filled, outside = (None if n is None else n[part] for n in (self.filled, self.outside_observed))
        return Prediction(predicted, scores, self.rows[part], self.index[part], filled, outside)


class EncryptedClient:
    """Talks to `fedfhe serve`; encrypts, sends, decrypts. Private keys never leave key_dir. One per thread.

    https is verified against the system's CAs, or `ca_cert` for a private CA; `token` is sent as a
    bearer token (for a server started with --tokens). `expect_model` (a model card's sha256) refuses a
    server that announces any other model, `expect_spec` (the card's client-spec sha256) one that serves any
    other client spec, before any key is made or anything encrypted; the card's pin MODEL:SPEC sets both.
    """

    def __init__(
        self,
        url: str,
        key_dir: str | os.PathLike[str],
        timeout: float = 120.0,
        token: str | None = None,
        ca_cert: str | os.PathLike[str] | None = None,
        expect_model: str | None = None,
        expect_spec: str | None = None,
    ) -> None:
        self.url, self.key_dir, self.timeout = url.rstrip("/"), Path(key_dir), timeout
        parsed = httpx.URL(self.url)
        if parsed.scheme == "http" and not _loopback(parsed.host):
            warnings.warn(
                f"{self.url}: plain http to another host, anyone on the network can read and change the client "
                "spec, keys and results; use https (--ca-cert for a private CA) and --expect-spec",
                PlainHttp,
                stacklevel=2,
            )
        self.expect_model, self.expect_spec = _pins(expect_model, expect_spec)
        verify: ssl.SSLContext | bool = True
        if ca_cert is not None:
            try:
                verify = ssl.create_default_context(cafile=os.fspath(ca_cert))
            except (OSError, ssl.SSLError) as exc:
                raise FedfheError(f"--ca-cert {ca_cert}: cannot be used ({exc})") from None
        headers = {"Accept-Encoding": "identity"}  # a compressed answer could unpack past its size cap at once
        if token is not None:
            headers["Authorization"] = f"Bearer {token.strip()}"
        self._http = httpx.Client(base_url=self.url, timeout=timeout, verify=verify, headers=headers)
        self._model: dict[str, Any] | None = None
        self._fhe: tuple[CircuitKeys, Quantizers] | None = None  # this key directory's keys, the spec's quantizers
        self._schema: tuple[Schema | None] | None = None  # read once: (the schema,) or (None,)
        self._point: tuple[Point | None] | None = None  # likewise
        self._observed: tuple[Range | None] | None = None  # likewise
        self._evaluation_keys = b""
        self._key_id = ""
        self._encryptor: Encryptor | None = None
        self._uploads, self._upload_lock = 0, threading.Lock()  # key uploads so far: one per 404, not per request

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the encrypting workers, close the HTTP connection pool."""
        if self._encryptor is not None:
            self._encryptor.close()
            self._encryptor = None
        self._http.close()

    @property
    def model(self) -> dict[str, Any]:
        """The served model's facts (/v1/model), fetched once."""
        if self._model is None:
            response = self._request("GET", f"{API}/model")  # its FedfheError is a ValueError: keep it out
            try:
                answer = response.json()
            except ValueError:
                answer = None
            if not isinstance(answer, dict) or not MODEL_FIELDS <= answer.keys():
                raise FedfheError(f"{self.url}: not a fedfhe server (unexpected answer to {API}/model)")
            if problem := _model_problem(answer):
                raise FedfheError(f"{self.url}: not a fedfhe server ({API}/model: {problem})")
            served, circuit = str(answer.get("model_sha256", "")), str(answer["client_spec_sha256"])
            if self.expect_model is not None and served != self.expect_model:
                raise FedfheError(
                    f"{self.url} serves model {served[:12] or 'unknown'}, not the expected "
                    f"{self.expect_model[:12]}: nothing was sent"
                )
            if self.expect_spec is not None and circuit != self.expect_spec:
                raise FedfheError(
                    f"{self.url} serves client spec {circuit[:12] or 'unknown'} (another circuit), not the expected "
                    f"{self.expect_spec[:12]}: no key was made and nothing was sent"
                )
            self._model = answer
        return self._model

    @property
    def input_range(self) -> Range:
        """Each feature's (low, high): inputs are checked against it and scaled by it to [0, 1]."""
        return np.asarray(self.model["input_low"], dtype=np.float64), np.asarray(
            self.model["input_high"], dtype=np.float64
        )

    @property
    def schema(self) -> Schema | None:
        """The schema a model trained on a user's table was compiled with, read from the pinned client spec."""
        if self._schema is None:
            raw = self._pinned(SPEC_SCHEMA)  # none: a model trained on numbers
            self._schema = (None if raw is None else Schema.from_json(raw, f"{self.url} client spec"),)
        return self._schema[0]

    @property
    def point(self) -> Point | None:
        """The operating point the pinned client spec names: scores are decided by it (None: the most probable class)."""
        if self._point is None:
            raw = self._pinned(POINT_MEMBER)
            self._point = (None if raw is None else read_point(raw, f"{self.url} client spec"),)
        return self._point[0]

    @property
    def observed(self) -> Range | None:
        """The owners' observed range of each input, from the pinned client spec (None: none): beyond it, extrapolation."""
        if self._observed is None:
            raw = self._pinned(SPEC_OBSERVED)
            where = f"{self.url} client spec"
            self._observed = (None if raw is None else read_observed(raw, self.model["n_features"], where),)
        return self._observed[0]

    def _pinned(self, name: str) -> bytes | None:
        """One of fedfhe's files in the pinned client spec, None if it holds none."""
        try:
            return member(self._spec(), name)
        except KeyError:
            return None
        except (OSError, zipfile.BadZipFile, FedfheError) as exc:
            raise FedfheError(f"{self.url}: unreadable client spec ({exc})") from None

    def connect(self, wait: float = 0.0, waiting: Callable[[], object] = lambda: None) -> dict[str, Any]:
        """The server's model facts, trying again for up to `wait` seconds while it refuses connections
        (`fedfhe serve` listens only once its FHE workers are loaded); `waiting` is called at the first refusal."""
        deadline = time.monotonic() + wait
        told = False
        while True:
            try:
                return self.model
            except Refused:
                if time.monotonic() >= deadline:
                    raise
                if not told:
                    waiting()
                    told = True
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))

    def inputs(self, X: np.ndarray | Any, source: str = "inputs", on_invalid: str = "refuse") -> Inputs:
        """Check every row and encode it for the model, noting what is known of each.

        X is numbers in the model's input order (every row must be valid), or (for a model trained on a table) a
        pandas DataFrame of raw rows: columns by name, text categories, the label column ignored. A table's invalid
        rows are all refused at once (InvalidRows lists them), or with `on_invalid="skip"` left out and listed in
        `skipped`. `source` names the inputs in error messages (e.g. their file).
        """
        if on_invalid not in ON_INVALID:
            raise FedfheError(f"on_invalid must be refuse or skip (got {on_invalid!r})")
        n_features, model_range = self.model["n_features"], self.input_range
        if not hasattr(X, "columns"):
            if on_invalid == "skip":
                raise FedfheError(f"{source}: numbers are checked whole; on_invalid='skip' takes a table's raw rows")
            X = check_features(X, n_features, model_range, source)
            return Inputs(X, np.arange(1, len(X) + 1), np.arange(len(X)))
        if self.schema is None:
            raise FedfheError(f"{self.url} serves a model without a schema: pass numbers, not a table")
        rows = self.schema.rows(X, source, labelled=False, pinned=True)  # as its owners encoded theirs
        if on_invalid == "refuse":
            rows.refuse()
        valid = rows.valid
        encoded = check_features(rows.X[valid], n_features, model_range, source)
        names = [f.name for f in self.schema.features]
        filled = tuple(tuple(n for n, f in zip(names, flags) if f) for flags in rows.filled[valid])
        return Inputs(
            encoded, np.flatnonzero(valid) + 1, rows.index[valid], filled, self._outside(encoded), rows.problems
        )

    def _outside(self, X: np.ndarray) -> tuple[tuple[str, ...], ...] | None:
        """Per row, the number features outside the owners' observed range (None: the spec holds no such range)."""
        if self.observed is None or self.schema is None:
            return None
        numbers = self.schema.number_inputs
        at = list(numbers.values())
        low, high = (bound[at] for bound in self.observed)
        beyond = (X[:, at] < low) | (X[:, at] > high)
        return tuple(tuple(name for name, out in zip(numbers, row) if out) for row in beyond)

    def predict(
        self, X: np.ndarray | Any, source: str = "inputs", jobs: int | None = None, on_invalid: str = "refuse"
    ) -> Prediction:
        """Every row's prediction at once, with the problems of any row skipped; see `inputs` for X and
        `on_invalid`, `predict_batches` for `jobs` and the pipeline."""
        inputs = X if isinstance(X, Inputs) else self.inputs(X, source, on_invalid)
        parts = list(self.predict_batches(inputs, source, jobs))
        if not parts:
            width = max(len(self.model["classes"]), 1)
            empty = inputs.answered(np.empty(0), None if self.outputs == "label" else np.empty((0, width)), slice(0))
            return replace(empty, skipped=inputs.skipped)
        scores = None if parts[0].scores is None else np.vstack([p.scores for p in parts if p.scores is not None])
        whole = inputs.answered(np.concatenate([p.predicted for p in parts]), scores, slice(None))
        return replace(whole, skipped=inputs.skipped)

    def predict_batches(
        self, X: np.ndarray | Any, source: str = "inputs", jobs: int | None = None, on_invalid: str = "refuse"
    ) -> Iterator[Prediction]:
        """Check every row, then encrypt, evaluate and decrypt them in a pipeline, yielding each batch in order.

        X is what `inputs` takes, or what it gave. A model with a schema answers with the schema's class values.
        While the server evaluates one batch, later ones are being encrypted, in `jobs` worker processes
        (default: the usable cores) once that saves more than starting them costs. At most 2 jobs + 2
        batches are in flight, so memory stays bounded whatever the number of rows.
        """
        jobs = usable_cores() if jobs is None else jobs
        if jobs < 1:
            raise FedfheError(f"--jobs must be at least 1 (got {jobs})")
        inputs = X if isinstance(X, Inputs) else self.inputs(X, source, on_invalid)
        X, (low, high) = inputs.X, self.input_range
        if len(X) == 0:
            return
        keys, quantizers = self._session()
        lock = threading.Lock()

        used = self.model.get("inputs_used", list(range(self.model["n_features"])))  # older servers: every one

        def quantized(start: int, stop: int) -> np.ndarray:
            return quantizers.quantize(((X[start:stop] - low) / (high - low))[:, used])

        def encrypt_here(rows: np.ndarray) -> list[bytes]:
            with lock:  # Concrete's encrypt holds the GIL anyway; one thread at a time keeps its RNG to itself
                return [keys.encrypt(row) for row in rows]

        began = time.perf_counter()
        head = encrypt_here(quantized(0, 1))  # the first row, timed: is a pool of encrypting processes worth it?
        per_row = time.perf_counter() - began
        worth = jobs > 1 and per_row * (len(X) - 1) * (1 - 1 / jobs) > SPAWN_SECONDS
        pool = self._encryptor_for(jobs) if worth else None
        size = min(self.model["max_batch"], ROWS_PER_REQUEST)
        bounds = [(0, 1), *((start, min(start + size, len(X))) for start in range(1, len(X), size))]

        def batch(start: int, stop: int) -> list[bytes]:
            if start == 0:
                return self._evaluate(head)
            rows = quantized(start, stop)
            return self._evaluate(encrypt_here(rows) if pool is None else pool.encrypt(rows))

        window = 2 * jobs + 2
        threads = ThreadPoolExecutor(window, thread_name_prefix="fedfhe-predict")
        pending: deque[tuple[slice, Future[list[bytes]]]] = deque()
        todo = iter(bounds)
        try:
            for start, stop in itertools.islice(todo, window):
                pending.append((slice(start, stop), threads.submit(batch, start, stop)))
            while pending:
                part, answer = pending.popleft()
                outputs = answer.result()
                for start, stop in itertools.islice(todo, 1):
                    pending.append((slice(start, stop), threads.submit(batch, start, stop)))
                yield inputs.answered(*self._decrypt(keys, quantizers, outputs), part)
        finally:
            threads.shutdown(wait=False, cancel_futures=True)

    def records(self, result: Prediction, kept: Any = None) -> list[dict[str, Any]]:
        """Results as `predict --json` and `--out` show them: the input's row number, the `kept` columns of that row
        (a DataFrame of the whole input's identifier columns), class, its name (and scores) or value, then the
        features filled and those beyond the observed range (each present when the model can tell)."""
        answers: list[dict[str, Any]]
        if not self.model["classes"]:
            answers = [{"value": float(v)} for v in result.predicted]
        else:
            named = dict(zip(self.classes.tolist(), self.class_names))
            answers = [{"class": c, "name": named[c]} for c in result.predicted.tolist()]
        if result.scores is not None and self.model["classes"]:  # label outputs: the server never sends scores
            answers = [
                {**a, "scores": dict(zip(self.class_names, map(float, s)))} for a, s in zip(answers, result.scores)
            ]
        ids = [{}] * len(answers) if kept is None else kept_values(kept, result.rows)
        notes: list[dict[str, list[str]]] = [{} for _ in answers]
        for key, per_row in (("filled", result.filled), ("outside_observed", result.outside_observed)):
            for note, names in zip(notes, per_row or ()):
                note[key] = list(names)
        return [{"row": int(r), **i, **a, **n} for r, i, a, n in zip(result.rows, ids, answers, notes)]

    def _encryptor_for(self, jobs: int) -> Encryptor:
        """The worker processes encrypting for this client, started on first need and kept until close()."""
        if self._encryptor is not None and self._encryptor.jobs != jobs:
            self._encryptor.close()
            self._encryptor = None
        if self._encryptor is None:
            self._encryptor = Encryptor(self.key_dir / CLIENT_SPEC, self.key_dir / KEYS_DIR, self._key_id, jobs)
        return self._encryptor

    def _decrypt(
        self, keys: CircuitKeys, quantizers: Quantizers, outputs: list[bytes]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One batch's predictions and scores from its encrypted outputs; outputs not this circuit's are one line."""
        try:
            return self._decrypted(keys, quantizers, outputs)
        except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FedfheError(f"{self.url} answered outputs that do not decrypt for this circuit ({first})") from None

    def _decrypted(
        self, keys: CircuitKeys, quantizers: Quantizers, outputs: list[bytes]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One batch's predictions and scores from its encrypted outputs."""
        decrypted = [keys.decrypt(out) for out in outputs]
        if self.outputs == "label":  # each output decrypts to the class index the circuit picked
            picked = [int(np.ravel(out)[0]) for out in decrypted]
            return self.classes[np.array(picked, dtype=np.int64)], None
        classifier = bool(self.model["classes"])
        scores = np.vstack([quantizers.scores(out, classifier) for out in decrypted])
        if not self.model["classes"]:
            return scores[:, 0], scores
        return self.classes[decide(scores, self.point)], scores

    @property
    def outputs(self) -> str:
        """What the server's circuit returns: "scores", or "label" (older servers: scores)."""
        return str(self.model.get("outputs", "scores"))

    @property
    def classes(self) -> np.ndarray:
        """What a classifier answers: the schema's class values, or the model's class numbers (none: a regressor)."""
        numbers = np.asarray(self.model["classes"], dtype=np.int64)
        if self.schema is None or not len(numbers):
            return numbers
        return np.asarray(self.schema.label.classes, dtype=object)[numbers]

    @property
    def class_names(self) -> list[str]:
        """What each of `classes` means, as the server names them (its numbers, from an older server)."""
        names = self.model.get("class_names")
        return [str(n) for n in names] if isinstance(names, list) else [str(c) for c in self.model["classes"]]

    def _spec(self) -> bytes:
        """The client spec (client.zip), fetched once and pinned by the hash the server advertises (or the one
        expected); checked for 128-bit parameters before any key is made from it."""
        expected = str(self.model["client_spec_sha256"])  # as expected, if pinned (checked with the model)
        _private_dir(self.key_dir)
        spec = self.key_dir / CLIENT_SPEC
        if spec.is_file():
            data = spec.read_bytes()
            held = hashlib.sha256(data).hexdigest()
            if held != expected:
                raise FedfheError(
                    f"{self.url} serves client spec {expected[:12]} but {self.key_dir} holds keys for "
                    f"{held[:12]}; the model changed, use a new key directory"
                )
        else:
            data = self._request("GET", f"{API}/client-spec").content
            if hashlib.sha256(data).hexdigest() != expected:
                raise FedfheError(f"{self.url}: the client spec does not match the hash the server advertises")
        check_spec(data, f"{self.url} client spec {expected[:12]}")
        if not spec.is_file():
            _write_private(spec, data)
        return data

    def _session(self) -> tuple[CircuitKeys, Quantizers]:
        """Pin the client spec, make or load the keys, upload the evaluation keys once."""
        if self._fhe is not None:
            return self._fhe
        data = self._spec()
        quantizers = read_quantizers(data, f"{self.url} client spec {self.model['client_spec_sha256'][:12]}")
        _private_dir(self.key_dir / KEYS_DIR)
        keys = CircuitKeys(data, self.key_dir / KEYS_DIR)
        for path in (self.key_dir / KEYS_DIR).rglob("*"):
            path.chmod(0o700 if path.is_dir() else 0o600)
        self._evaluation_keys = keys.evaluation_keys()
        self._key_id = hashlib.sha256(self._evaluation_keys).hexdigest()
        if _read_session(self.key_dir).get("key_id") != self._key_id:
            self._upload_keys()
        self._fhe = keys, quantizers
        return self._fhe

    def _upload_keys(self) -> None:
        """Send the evaluation keys; the server must file them under their sha256, as we computed."""
        answer = self._request(
            "POST", f"{API}/keys", content=self._evaluation_keys, headers={"content-type": OCTET_STREAM}
        ).json()
        if answer.get("key_id") != self._key_id:
            raise FedfheError(f"{self.url} stored the evaluation keys under an unexpected id {answer.get('key_id')!r}")
        _write_private(self.key_dir / SESSION_FILE, json.dumps({"key_id": self._key_id}).encode())
        self._uploads += 1

    def _evaluate(self, ciphertexts: list[bytes]) -> list[bytes]:
        """One framed round trip; keys the server lost (evicted, new key store) are uploaded again once,
        by one of the requests in flight that met the 404."""
        for attempt in (1, 2):
            uploads = self._uploads
            try:
                response = self._request(
                    "POST",
                    f"{API}/predict",
                    params={"key_id": self._key_id},
                    content=encode_frames(ciphertexts),
                    headers={"content-type": OCTET_STREAM},
                )
                break
            except ServerError as exc:
                if exc.status != 404 or attempt == 2:
                    raise
                with self._upload_lock:
                    if self._uploads == uploads:  # nobody uploaded them since this request was sent
                        self._upload_keys()
        served = response.headers.get(SPEC_HASH_HEADER)
        if served != self.model["client_spec_sha256"]:
            raise FedfheError(
                f"{self.url} answered for client spec {served!r}, not the one these inputs were encrypted for"
            )
        outputs = decode_frames(response.content, len(ciphertexts))
        if len(outputs) != len(ciphertexts):
            raise FedfheError(f"{self.url} answered {len(outputs)} results for {len(ciphertexts)} inputs")
        return outputs

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """An HTTP call whose failures are one-line FedfheErrors; a rate-limited call waits and tries again.

        Its answer must arrive whole within the timeout and hold at most its route's ANSWER_BYTES.
        """
        for _ in range(RATE_RETRIES):
            try:
                response = self._bounded(method, path, **kwargs)
            except httpx.TimeoutException:
                raise FedfheError(f"{self.url}: no answer within {self.timeout:g} s") from None
            except httpx.HTTPError as exc:
                message = f"{self.url}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                raise (Refused if _refused(exc) else FedfheError)(message) from None
            wait = response.headers.get("retry-after", "")
            if response.status_code not in (429, 503) or not wait.isdigit() or int(wait) > MAX_RATE_WAIT:
                break
            time.sleep(int(wait))
        if response.status_code == 401:
            raise ServerError(401, f"{self.url}: 401 the server needs a valid token (--token or FEDFHE_TOKEN)")
        if response.is_error:
            try:
                detail = response.json()["detail"]
            except (ValueError, KeyError, TypeError):
                detail = response.text[:200]
            raise ServerError(response.status_code, f"{self.url}{path}: {response.status_code} {detail}")
        return response

    def _bounded(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The whole answer within the timeout, headers included: a server trickling a byte every few seconds
        never trips httpx's per-read timeout, so the call runs in a thread the caller stops waiting for."""
        deadline = time.monotonic() + self.timeout
        outcome: list[httpx.Response | BaseException] = []

        def call() -> None:
            try:
                outcome.append(self._read_whole(method, path, deadline, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread as it is
                outcome.append(exc)

        caller = threading.Thread(target=call, name="fedfhe-request", daemon=True)  # left to the read timeout
        caller.start()
        caller.join(self.timeout)
        if not outcome:
            raise FedfheError(f"{self.url}{path}: no whole answer within {self.timeout:g} s")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _read_whole(self, method: str, path: str, deadline: float, **kwargs: Any) -> httpx.Response:
        """The whole answer, read as it streams in: refused past its size cap or its deadline."""
        limit = ANSWER_BYTES.get(path.rsplit("/", 1)[-1], ANSWER_BYTES["model"])
        with self._http.stream(method, path, **kwargs) as streamed:
            if streamed.headers.get("content-encoding", "identity").lower() != "identity":
                raise FedfheError(f"{self.url}{path}: a compressed answer, which the client did not ask for; refused")
            body = bytearray()
            for chunk in streamed.iter_bytes():
                body += chunk
                if len(body) > limit:
                    raise FedfheError(f"{self.url}{path}: an answer over {limit} bytes; refused")
                if time.monotonic() > deadline:
                    raise FedfheError(f"{self.url}{path}: no whole answer within {self.timeout:g} s")
            framing = ("content-length", "transfer-encoding")  # undone by iter_bytes
            headers = [(k, v) for k, v in streamed.headers.items() if k.lower() not in framing]
            return httpx.Response(streamed.status_code, headers=headers, content=bytes(body))


def output_file(path: str | os.PathLike[str], option: str, what: str, suffixes: tuple[str, ...]) -> Path:
    """A file to write, refused in one line unless of one of `suffixes` and in a folder that exists."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise FedfheError(f"{option} {path}: write {what} to a {' or a '.join(suffixes)} file")
    if not path.parent.is_dir():
        raise FedfheError(f"{option} {path}: no such directory {path.parent}")
    return path


class ResultsFile:
    """Results written as they arrive, to .csv (scores as score_NAME columns) or .jsonl; PATH.part until complete.

    A run that fails keeps the rows it finished in PATH.part, says so, and never touches an existing PATH.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = output_file(path, "--out", "results", (".csv", ".jsonl"))
        self.part = self.path.with_name(self.path.name + ".part")
        self._file: TextIO | None = None  # opened with the first rows: refused inputs leave no file behind
        self._csv: csv.DictWriter[str] | None = None
        self.rows = 0  # written so far

    def write(self, records: list[dict[str, Any]]) -> None:
        """Append rows and flush them, so what is done is on disk."""
        if self._file is None:
            self._file = self._open()
        if self.path.suffix.lower() == ".jsonl":
            self._file.writelines(json.dumps(r) + "\n" for r in records)
        else:
            flat = [_csv_row(r) for r in records]
            if self._csv is None and flat:
                self._csv = csv.DictWriter(self._file, fieldnames=list(flat[0]))
                self._csv.writeheader()
            if self._csv is not None:
                self._csv.writerows(flat)
        self._file.flush()
        self.rows += len(records)

    def _open(self) -> TextIO:
        try:
            return open(self.part, "w", newline="")
        except OSError as exc:
            raise FedfheError(f"--out {self.path}: cannot write ({exc.strerror or exc})") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, failed: type[BaseException] | None, error: BaseException | None, *_: object) -> None:
        """Every row is in: PATH.part becomes PATH. A failure names what was kept."""
        if self._file is not None:
            self._file.close()
        if failed is None:
            if self._file is None:  # no rows: an empty file
                self._open().close()
            os.replace(self.part, self.path)
        elif isinstance(error, FedfheError) and self.rows:
            raise FedfheError(f"{error} ({self.rows} row(s) done are in {self.part})") from None


FORMULA = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet would run as a formula at the start of a cell


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: names (the server's or a schema's) that start like a formula get a '."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA) else value


def _csv_row(record: dict[str, Any]) -> dict[str, Any]:
    """A record as one CSV row: its scores as score_NAME columns, a list of names as one cell (a;b), every name and
    value safe for a spreadsheet."""
    scores = {f"score_{name}": value for name, value in record.get("scores", {}).items()}
    flat = {k: ";".join(v) if isinstance(v, list) else v for k, v in {**record, **scores}.items() if k != "scores"}
    return {_cell(k): _cell(v) for k, v in flat.items()}


def keep_columns(frame: Any, keep: list[str], schema: Schema, source: str) -> tuple[Any, Any]:
    """The input without its `keep` columns (identifiers: never encoded, encrypted or sent), and those columns.

    A column that is not in the input, is one of the model's inputs, or shares a name with a result's own field
    is refused in one line.
    """
    keep = list(dict.fromkeys(keep))
    columns = [str(c) for c in frame.columns]
    for name in keep:
        if name not in columns:
            raise FedfheError(f"--keep {name}: {source} has no such column (it has: {', '.join(columns)})")
        if name in {f.name for f in schema.features}:
            raise FedfheError(f"--keep {name}: one of the model's inputs; only columns never sent can be kept")
        if name in RECORD_FIELDS + REJECT_FIELDS or name.startswith("score_"):
            raise FedfheError(f"--keep {name}: the results have a field of that name; rename the column")
    return frame.drop(columns=keep), frame[keep]


def kept_values(kept: Any, rows: np.ndarray) -> list[dict[str, Any]]:
    """The kept columns' cells of each row (numbered from 1), as JSON holds them."""
    part = kept.iloc[np.asarray(rows, dtype=np.int64) - 1]
    return [{str(k): plain(v) for k, v in zip(part.columns, cells)} for cells in part.itertuples(index=False)]


def write_rejects(path: Path, problems: tuple[Problem, ...], kept: Any = None) -> None:
    """The rows left out, one line per problem (.csv): the input's row, its kept columns, column, value, reason."""
    ids = [{}] * len(problems) if kept is None else kept_values(kept, np.array([p.row for p in problems]))
    lines = [
        {"row": p.row, **i, "column": p.column, "value": plain(p.value), "reason": p.reason}
        for p, i in zip(problems, ids)
    ]
    fields = ["row", *([] if kept is None else map(str, kept.columns)), "column", "value", "reason"]
    try:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[_cell(name) for name in fields])
            writer.writeheader()
            writer.writerows({_cell(k): _cell(v) for k, v in line.items()} for line in lines)
    except OSError as exc:
        raise FedfheError(f"--rejects {path}: cannot write ({exc.strerror or exc})") from None


def read_inputs(path: Path, n_features: int, input_range: Range, max_bytes: int | None = None) -> np.ndarray:
    """Rows from a .npy/.npz/.csv table, or one row from a PNG/JPEG image; a file over `max_bytes` is not read."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        size, mib = path.stat().st_size, 1 << 20
        if max_bytes is not None and size > max_bytes:
            raise FedfheError(f"{path}: {size / mib:.4g} MiB on disk, more than the {max_bytes / mib:.4g} MiB allowed")
        return image_row(path, n_features, input_range)
    return read_table(path, max_bytes=max_bytes)[0]


def image_row(path: Path, n_features: int, input_range: Range) -> np.ndarray:
    """A square grayscale image as one row in the model's input range, light-on-dark like MNIST."""
    from PIL import Image, UnidentifiedImageError

    side = math.isqrt(n_features)
    if side * side != n_features:
        raise FedfheError(f"the model takes {n_features} features, which is not a square image")
    try:
        with Image.open(path) as image:
            gray = image.convert("L").resize((side, side), Image.Resampling.LANCZOS)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise FedfheError(f"{path}: not a readable image ({exc})") from None
    pixels = np.asarray(gray, dtype=np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if border.mean() > 127.5:
        pixels = 255.0 - pixels
    low, high = input_range
    return low + pixels.reshape(1, -1) / 255.0 * (np.asarray(high) - np.asarray(low))


def _model_problem(answer: dict[str, Any]) -> str | None:
    """What is wrong with a server's model facts, if anything: a client sizes its work by them."""
    n, batch = answer.get("n_features"), answer.get("max_batch")
    if type(n) is not int or not 1 <= n <= 1_000_000:
        return f"n_features {n!r}"
    if type(batch) is not int or batch < 1:
        return f"max_batch {batch!r}"
    for field in ("input_low", "input_high"):
        values = answer[field]
        if not isinstance(values, list) or len(values) != n or not all(type(v) in (int, float) for v in values):
            return f"{field} is not {n} numbers"
    classes = answer["classes"]
    if not isinstance(classes, list) or not all(type(c) is int and c >= 0 for c in classes):
        return "classes are not class numbers"
    if not valid_inputs_used(answer.get("inputs_used", list(range(n))), n):
        return f"inputs_used is not increasing feature indices below {n}"
    return None


def _pins(model: str | None, spec: str | None) -> tuple[str | None, str | None]:
    """The model and client-spec hashes pinned: --expect-model's MODEL, or a card's pin MODEL:SPEC, and --expect-spec."""
    expect_spec = _sha256(spec, "--expect-spec", "a client spec's sha256")
    if model is None:
        return None, expect_spec
    model, colon, pinned = model.partition(":")
    expect_model = _sha256(model, "--expect-model", "a model's sha256 (or a card's pin MODEL:SPEC)")
    if not colon:
        return expect_model, expect_spec
    pinned_spec = _sha256(pinned, "--expect-model", "a card's pin MODEL:SPEC, SPEC a client spec's sha256")
    if expect_spec not in (None, pinned_spec):
        raise FedfheError("--expect-model pins one client spec and --expect-spec another: give one of them")
    return expect_model, pinned_spec


def _sha256(value: str | None, option: str, what: str) -> str | None:
    """A pinned hash, normalized; anything but 64 hex digits is refused in one line."""
    if value is None:
        return None
    if not re.fullmatch(r"[0-9a-f]{64}", value.strip().lower()):
        raise FedfheError(f"{option} must be {what}, 64 hex digits (got {value!r})")
    return value.strip().lower()


def _refused(exc: BaseException) -> bool:
    """Whether an HTTP error is a refused connection (its cause, at any depth)."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ConnectionRefusedError):
        cause = cause.__cause__ or cause.__context__
    return cause is not None


def _loopback(host: str) -> bool:
    """Whether a URL's host is this machine (localhost or a loopback address)."""
    if host == "localhost":
        return True
    try:
        address = ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is this machine too
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _private_dir(path: Path) -> None:
    """Create a directory only its owner may enter."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.chmod(0o700)
    except OSError as exc:
        raise FedfheError(f"{path}: cannot be a key directory ({exc.strerror or exc})") from None


def _write_private(path: Path, data: bytes) -> None:
    """Write atomically with owner-only permissions."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _read_session(key_dir: Path) -> dict[str, Any]:
    """The remembered key id, or nothing if never uploaded or unreadable."""
    try:
        return json.loads((key_dir / SESSION_FILE).read_text())
    except (OSError, ValueError):
        return {}
