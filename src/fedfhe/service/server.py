"""The FHE inference server: holds evaluation keys and the circuit, never a private key or a clear input.

Artifact hash: `client_spec_sha256` is the sha256 of the client.zip the server hands out (the only
artifact a client sees, so the only one it can check); `model_sha256` is fhe.json's hash of the
trained weights, checked against model.npz at start-up. Predictions carry the client spec hash in
the X-Client-Spec-SHA256 header, so a client notices if the server changed circuits under it.
"""

from __future__ import annotations

import asyncio
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

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from fedfhe.artifacts import read_artifacts
from fedfhe.errors import FedfheError
from fedfhe.rundir import RunDir
from fedfhe.service.access import Access, RateLimited, Unauthorized
from fedfhe.service.evaluator import EvaluationTimeout, Evaluator, Rejected, WorkerDied
from fedfhe.service.keystore import KEY_ID, KeyStore, KeyTooLarge, UnknownKey
from fedfhe.service.metrics import Metrics
from fedfhe.service.protocol import API, OCTET_STREAM, SPEC_HASH_HEADER, BatchTooLarge, decode_frames, encode_frames

log = logging.getLogger("fedfhe.service")
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
CLIENT_GONE = 499  # nginx's code for a client that closed the connection before the answer
STATUS = {
    Rejected: 400,
    Unauthorized: 401,
    UnknownKey: 404,
    KeyTooLarge: 413,
    BatchTooLarge: 413,
    RateLimited: 429,
    WorkerDied: 503,
    EvaluationTimeout: 504,
}


class ClientGone(FedfheError):
    """The client hung up before its request body arrived."""


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one client from exhausting the server."""

    max_body_bytes: int = 16 << 20
    max_key_bytes: int = 128 << 20  # evaluation keys: 64 bytes for scores outputs, 26-47 MB for label outputs
    max_batch: int = 256
    timeout_s: float = 60.0
    max_keys: int = 1000
    max_key_store_bytes: int = 1 << 30
    max_inflight_bytes: int = 512 << 20  # request bodies held at once, all connections together


class Inflight:
    """The request body bytes the server holds at once: junk uploads in parallel cannot take its memory."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def take(self, request: Request, size: int) -> None:
        """Hold `size` more bytes for this request (given back when it is answered); 503 past the limit."""
        if self.held + size > self.limit:
            raise HTTPException(
                503,
                f"the server holds {self.held} bytes of request bodies, the most it takes is {self.limit}; "
                "try again shortly",
                headers={"Retry-After": "1"},
            )
        self.held += size
        request.state.held = getattr(request.state, "held", 0) + size

    def give_back(self, request: Request) -> None:
        """The request was answered: its bytes are free again."""
        self.held -= getattr(request.state, "held", 0)
        request.state.held = 0


class Health(BaseModel):
    """Liveness: ok while every FHE worker runs, degraded while some are being replaced."""

    status: str
    workers: int  # alive now
    keys: int


class ModelInfo(BaseModel):
    """What a client needs to encode inputs and to trust the circuit it encrypts for."""

    dataset: str
    kind: str
    n_features: int
    feature_names: list[str]  # the input columns, in the order the client encrypts them
    classes: list[int]  # empty for a regressor
    class_names: list[str]  # what each class means, e.g. malignant; empty for a regressor
    input_low: list[float]  # per feature: the client scales each to [0, 1] before encrypting
    input_high: list[float]
    inputs_used: list[int]  # the features the circuit takes, in order: the client encrypts only these
    n_bits: int | dict[str, int]  # one width, or {"op_inputs": I, "op_weights": W}
    outputs: str  # what a client decrypts: "scores", or "label" (the class index only)
    max_bit_width: int
    model_sha256: str
    client_spec_sha256: str
    max_batch: int
    max_body_bytes: int
    max_key_bytes: int


class Error(BaseModel):
    """Every error answer: one line saying what was wrong."""

    detail: str


class KeyId(BaseModel):
    """The id under which uploaded evaluation keys are stored: their sha256."""

    key_id: str


BINARY_BODY = {
    "requestBody": {"required": True, "content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}}
}


def _errors(*codes: int) -> dict[int | str, dict]:
    """OpenAPI entries for the error statuses a route can answer."""
    return {code: {"model": Error} for code in codes}


def load_model_info(run: RunDir, limits: Limits) -> tuple[ModelInfo, bytes]:
    """The model facts a client needs and the client.zip bytes, from artifacts checked against the model."""
    model = run.load_model()
    artifacts = read_artifacts(run, model)
    return ModelInfo(
        dataset=str(model.metadata.get("dataset", "unknown")),
        kind=model.kind.name,
        n_features=model.n_features,
        feature_names=model.feature_names,
        classes=[int(c) for c in model.classes],
        class_names=model.class_names,
        input_low=model.input_range[0].tolist(),
        input_high=model.input_range[1].tolist(),
        inputs_used=artifacts.inputs_used.tolist(),
        n_bits=artifacts.n_bits,
        outputs=artifacts.outputs,
        max_bit_width=artifacts.max_bit_width,
        model_sha256=model.sha256,
        client_spec_sha256=hashlib.sha256(artifacts.client_spec).hexdigest(),
        max_batch=limits.max_batch,
        max_body_bytes=limits.max_body_bytes,
        max_key_bytes=limits.max_key_bytes,
    ), artifacts.client_spec


async def read_body(request: Request, limit: int, inflight: Inflight) -> bytes:
    """The raw body, refused with 415 unless octet-stream, with 413 past `limit` (declared or actual) and with
    503 while other bodies hold the server's in-flight bytes (a declared length is held before any is read)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != OCTET_STREAM:
        raise HTTPException(415, f"content type must be {OCTET_STREAM} (got {content_type[:40] or 'none'!r})")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPException(413, f"body of {declared[:20]} bytes is over the limit of {limit}")
    held = int(declared or 0)
    inflight.take(request, held)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"body is over the limit of {limit} bytes")
            if size > held:  # no length was declared, or more came than was: held as it arrives
                inflight.take(request, size - held)
                held = size
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone(f"client hung up after {size} bytes of the body") from None
    return b"".join(chunks)


def key_id_of(request: Request) -> str:
    """The key_id query parameter, one anchored pattern; 422 without repeating what was sent."""
    given = request.query_params.get("key_id", "")
    if not KEY_ID.fullmatch(given):
        raise HTTPException(422, "key_id must be 64 lowercase hex digits")
    return given


def create_app(
    run_dir: str | os.PathLike[str],
    key_dir: str | os.PathLike[str] | None = None,
    workers: int = 2,
    limits: Limits = Limits(),
    access: Access | None = None,
    evaluator: Evaluator | None = None,
) -> FastAPI:
    """The service for one run directory; keys default to RUN/keys. Bad artifacts fail here, before serving.

    The FHE workers start with the app (or before, when `evaluator` is given already started).
    With `access`, every route but /v1/health needs a bearer token, at the rate it allows.
    """
    run = RunDir(run_dir)
    info, spec = load_model_info(run, limits)
    keys = KeyStore(Path(key_dir) if key_dir is not None else run.keys, limits.max_keys, limits.max_key_store_bytes)
    pool = evaluator or Evaluator(run.fhe, workers)
    metrics = Metrics()
    inflight = Inflight(limits.max_inflight_bytes)
    spec_header = {SPEC_HASH_HEADER: info.client_spec_sha256}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(pool.start)
        supervisor = asyncio.create_task(_supervise(pool))
        _log(event="ready", run=str(run.path), keys=str(keys.root), workers=pool.workers, model=info.model_sha256)
        yield
        supervisor.cancel()
        pool.close()
        _log(event="stopped")

    async def authorized(request: Request) -> None:
        """With tokens configured: the request's token, identified and within its rate."""
        if access is None:
            return
        request.state.token = None
        label = access.identify(request.headers.get("authorization"))
        request.state.token = label
        access.admit(label)

    # With tokens the API's description is for token holders: /openapi.json needs one, and the /docs and /redoc
    # pages are off (a browser page cannot send the token when it fetches the description).
    open_docs = access is None
    app = FastAPI(
        title="fedfhe encrypted inference",
        version="1",
        lifespan=lifespan,
        docs_url="/docs" if open_docs else None,
        redoc_url="/redoc" if open_docs else None,
        openapi_url="/openapi.json" if open_docs else None,
    )
    protected = APIRouter(prefix=API, dependencies=[Depends(authorized)])
    if access is not None:

        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorized)])
        def openapi() -> JSONResponse:
            """The OpenAPI description, for a caller with a token."""
            return JSONResponse(app.openapi())

    def _finish(request: Request, status: int, seconds: float, error: str | None) -> None:
        """Count the request and write its log line."""
        route = getattr(request.scope.get("route"), "path", "unmatched")
        token = getattr(request.state, "token", None)
        metrics.observe(route, request.method, status, seconds, token)
        _log(
            event="request",
            request_id=request.state.request_id,
            method=request.method,
            path=request.url.path,
            status=status,
            seconds=round(seconds, 6),
            token=token,
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
        finally:
            inflight.give_back(request)
        _finish(request, response.status_code, time.perf_counter() - start, request.state.error)
        response.headers["X-Request-ID"] = request.state.request_id
        return response

    @app.exception_handler(FedfheError)
    async def domain_error(request: Request, exc: FedfheError) -> Response:
        """Our errors become their HTTP status (400 unless listed in STATUS) with a one-line detail."""
        request.state.error = str(exc)
        if isinstance(exc, ClientGone):
            return Response(status_code=CLIENT_GONE)  # nobody reads it; the log line and the count remain
        status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 400)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else {}
        if isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Record the detail for the log line; answer it as one line."""
        request.state.error = str(exc.detail)
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        """A malformed request in one line naming the field, never repeating the input."""
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        request.state.error = f"{where}: {first.get('msg', 'invalid')}"
        return JSONResponse({"detail": request.state.error}, status_code=422)

    @app.get(f"{API}/health", responses=_errors(503))
    def health(response: Response) -> Health:
        """Liveness, the FHE workers alive and the number of stored keys; 503 while no worker runs."""
        alive = pool.alive()
        if alive == 0:
            response.status_code = 503
        status = "ok" if alive == pool.workers else "degraded" if alive else "starting"
        return Health(status=status, workers=alive, keys=len(keys))

    @protected.get("/model", responses=_errors(401, 429))
    def model() -> ModelInfo:
        """The served model's facts and artifact hashes."""
        return info

    @protected.get("/client-spec", response_class=Response, responses={200: {"content": {"application/zip": {}}}})
    def client_spec() -> Response:
        """client.zip: the quantizers and crypto parameters a client needs to encrypt and decrypt."""
        return Response(spec, media_type="application/zip", headers=spec_header)

    @protected.post("/keys", openapi_extra=BINARY_BODY, responses=_errors(400, 401, 413, 415, 429, 504))
    async def upload_key(request: Request) -> KeyId:
        """Store evaluation keys (raw bytes); uploading the same keys again returns the same id."""
        body = await read_body(request, limits.max_key_bytes, inflight)
        await pool.check_key(body, limits.timeout_s)
        return KeyId(key_id=await run_in_threadpool(keys.put, body))

    @protected.post(
        "/predict",
        response_class=Response,
        openapi_extra={**BINARY_BODY, "parameters": [{"name": "key_id", "in": "query", "required": True}]},
        responses={200: {"content": {OCTET_STREAM: {}}}, **_errors(400, 401, 404, 413, 415, 422, 429, 503, 504)},
    )
    async def predict(request: Request, key_id: str = Depends(key_id_of)) -> Response:
        """Evaluate a framed batch of ciphertexts (see protocol.py) and answer the framed encrypted outputs."""
        key_path = await run_in_threadpool(keys.locate, key_id)
        frames = decode_frames(await read_body(request, limits.max_body_bytes, inflight), limits.max_batch)
        outputs = await pool.run(frames, key_id, key_path, limits.timeout_s)
        metrics.ciphertexts += len(outputs)
        return Response(encode_frames(outputs), media_type=OCTET_STREAM, headers=spec_header)

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(authorized)])
    def prometheus() -> str:
        """Counters, latency histograms and the live workers, in Prometheus' text format."""
        return metrics.render(pool.alive())

    app.include_router(protected)
    return app


async def _supervise(pool: Evaluator) -> None:
    """Keep the worker pool whole; a failure to restart it is logged, then tried again."""
    while True:
        try:
            await pool.supervise()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the service goes on answering health and errors
            _log(event="workers-restart-failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            await asyncio.sleep(5)


def _log(**fields: object) -> None:
    """One JSON object per line, so logs can be parsed without guessing."""
    log.info(json.dumps({"ts": round(time.time(), 3), **{k: v for k, v in fields.items() if v is not None}}))
