"""The FHE inference server: holds evaluation keys and the circuit, never a private key or a clear input.

Artifact hash: `client_spec_sha256` is the sha256 of the client.zip the server hands out (the only
artifact a client sees, so the only one it can check); `model_sha256` is fhe.json's hash of the
trained weights, checked against model.npz at start-up. Predictions carry the client spec hash in
the X-Client-Spec-SHA256 header, so a client notices if the server changed circuits under it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from fedfhe.artifacts import read_artifacts
from fedfhe.errors import FedfheError
from fedfhe.rundir import RunDir
from fedfhe.service.evaluator import EvaluationTimeout, Evaluator, Rejected, WorkerDied
from fedfhe.service.keystore import KEY_ID, KeyStore, KeyTooLarge, UnknownKey
from fedfhe.service.metrics import Metrics
from fedfhe.service.protocol import (
    API,
    OCTET_STREAM,
    SPEC_HASH_HEADER,
    BatchTooLarge,
    decode_frames,
    encode_frames,
)

log = logging.getLogger("fedfhe.service")
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
STATUS = {Rejected: 400, UnknownKey: 404, KeyTooLarge: 413, BatchTooLarge: 413, EvaluationTimeout: 504, WorkerDied: 503}


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one client from exhausting the server."""

    max_body_bytes: int = 16 << 20
    max_batch: int = 256
    timeout_s: float = 60.0
    max_keys: int = 1000
    max_key_store_bytes: int = 1 << 30


class Health(BaseModel):
    """Liveness: answered once every worker has loaded the circuit."""

    status: str
    workers: int
    keys: int


class ModelInfo(BaseModel):
    """What a client needs to encode inputs and to trust the circuit it encrypts for."""

    dataset: str
    kind: str
    n_features: int
    classes: list[int]  # empty for a regressor
    input_low: list[float]  # per feature: the client scales each to [0, 1] before encrypting
    input_high: list[float]
    n_bits: int
    max_bit_width: int
    model_sha256: str
    client_spec_sha256: str
    max_batch: int
    max_body_bytes: int


class Error(BaseModel):
    """Every error answer: one line saying what was wrong."""

    detail: str


BINARY_BODY = {
    "requestBody": {"required": True, "content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}}
}


def _errors(*codes: int) -> dict[int | str, dict]:
    """OpenAPI entries for the error statuses a route can answer."""
    return {code: {"model": Error} for code in codes}


class KeyId(BaseModel):
    """The id under which uploaded evaluation keys are stored: their sha256."""

    key_id: str


def load_model_info(run: RunDir, limits: Limits) -> tuple[ModelInfo, bytes]:
    """The model facts a client needs and the client.zip bytes, from artifacts checked against the model."""
    model = run.load_model()
    artifacts = read_artifacts(run, model)
    return ModelInfo(
        dataset=str(model.metadata.get("dataset", "unknown")),
        kind=model.kind.name,
        n_features=model.n_features,
        classes=[int(c) for c in model.classes],
        input_low=model.input_range[0].tolist(),
        input_high=model.input_range[1].tolist(),
        n_bits=artifacts.n_bits,
        max_bit_width=artifacts.max_bit_width,
        model_sha256=model.sha256,
        client_spec_sha256=hashlib.sha256(artifacts.client_spec).hexdigest(),
        max_batch=limits.max_batch,
        max_body_bytes=limits.max_body_bytes,
    ), artifacts.client_spec


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 415 unless octet-stream and with 413 past `limit` (declared or actual)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != OCTET_STREAM:
        raise HTTPException(415, f"content type must be {OCTET_STREAM} (got {content_type or 'none'!r})")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPException(413, f"body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    run_dir: str | os.PathLike[str],
    key_dir: str | os.PathLike[str] | None = None,
    workers: int = 2,
    limits: Limits = Limits(),
) -> FastAPI:
    """The service for one run directory; keys default to RUN/keys. Bad artifacts fail here, before serving."""
    run = RunDir(run_dir)
    info, spec = load_model_info(run, limits)
    keys = KeyStore(Path(key_dir) if key_dir is not None else run.keys, limits.max_keys, limits.max_key_store_bytes)
    evaluator = Evaluator(run.fhe, workers)
    metrics = Metrics()
    spec_header = {SPEC_HASH_HEADER: info.client_spec_sha256}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await evaluator.warm_up()
        _log(event="ready", run=str(run.path), keys=str(keys.root), workers=workers, model=info.model_sha256)
        yield
        evaluator.close()
        _log(event="stopped")

    app = FastAPI(title="fedfhe encrypted inference", version="1", lifespan=lifespan)

    def _finish(request: Request, status: int, seconds: float, error: str | None) -> None:
        """Count the request and write its log line."""
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.observe(route, request.method, status, seconds)
        _log(
            event="request",
            request_id=request.state.request_id,
            method=request.method,
            path=request.url.path,
            status=status,
            seconds=round(seconds, 6),
            error=error,
        )

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Request id in and out, one JSON log line and the metrics for every request."""
        given = request.headers.get("x-request-id", "")
        request.state.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        request.state.error = None
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:
            _finish(request, 500, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
            raise
        _finish(request, response.status_code, time.perf_counter() - start, request.state.error)
        response.headers["X-Request-ID"] = request.state.request_id
        return response

    @app.exception_handler(FedfheError)
    async def domain_error(request: Request, exc: FedfheError) -> JSONResponse:
        """Our errors become their HTTP status (400 unless listed in STATUS) with a one-line detail."""
        status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 400)
        request.state.error = str(exc)
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        """Record the detail for the log line, then answer as FastAPI would."""
        request.state.error = str(exc.detail)
        return await http_exception_handler(request, exc)

    @app.get(f"{API}/health")
    def health() -> Health:
        """Liveness and the number of stored keys."""
        return Health(status="ok", workers=workers, keys=len(keys))

    @app.get(f"{API}/model")
    def model() -> ModelInfo:
        """The served model's facts and artifact hashes."""
        return info

    @app.get(f"{API}/client-spec", response_class=Response, responses={200: {"content": {"application/zip": {}}}})
    def client_spec() -> Response:
        """client.zip: the quantizers and crypto parameters a client needs to encrypt and decrypt."""
        return Response(spec, media_type="application/zip", headers=spec_header)

    @app.post(f"{API}/keys", openapi_extra=BINARY_BODY, responses=_errors(400, 413, 415, 504))
    async def upload_key(request: Request) -> KeyId:
        """Store evaluation keys (raw bytes); uploading the same keys again returns the same id."""
        body = await read_body(request, limits.max_body_bytes)
        await evaluator.check_key(body, limits.timeout_s)
        return KeyId(key_id=await run_in_threadpool(keys.put, body))

    @app.post(
        f"{API}/predict",
        response_class=Response,
        openapi_extra=BINARY_BODY,
        responses={200: {"content": {OCTET_STREAM: {}}}, **_errors(400, 404, 413, 415, 503, 504)},
    )
    async def predict(request: Request, key_id: Annotated[str, Query(pattern=KEY_ID.pattern)]) -> Response:
        """Evaluate a framed batch of ciphertexts (see protocol.py) and answer the framed encrypted outputs."""
        key = await run_in_threadpool(keys.get, key_id)
        frames = decode_frames(await read_body(request, limits.max_body_bytes), limits.max_batch)
        outputs = await evaluator.run(frames, key, limits.timeout_s)
        metrics.ciphertexts += len(outputs)
        return Response(encode_frames(outputs), media_type=OCTET_STREAM, headers=spec_header)

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> str:
        """Counters and latency histograms in Prometheus' text format."""
        return metrics.render()

    return app


def _log(**fields: object) -> None:
    """One JSON object per line, so logs can be parsed without guessing."""
    log.info(json.dumps({"ts": round(time.time(), 3), **fields}))
