"""``create_app(config)``: the FastAPI model server (health, Prometheus metrics, inference and admin routes)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from airflow_llmops import __version__
from airflow_llmops.serving import api_admin, api_inference
from airflow_llmops.serving.config import ServerConfig
from airflow_llmops.serving.deps import REQUEST_ID_HEADER, ServerState, new_request_id, request_id
from airflow_llmops.serving.errors import ServingError
from airflow_llmops.serving.gateway import Gateway
from airflow_llmops.serving.request_log import RequestLogShipper, RequestLogWriter
from airflow_llmops.serving.telemetry import Telemetry
from airflow_llmops.serving.variants import VariantRegistry

log = logging.getLogger(__name__)


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error may echo the caller's input, lone surrogates included."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, default=str).encode("ascii")


def error_body(message: str, error_type: str, code: int, **extra: Any) -> dict[str, Any]:
    """OpenAI's error shape, which the ``openai`` client turns into its exceptions' messages."""
    return {"error": {"message": message, "type": error_type, "code": code, **extra}}


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413 before the route parses them (Content-Length or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send: Send, size: str) -> None:
        message = f"request body is {size} bytes; this server accepts at most {self.max_bytes} (--max-body-bytes)"
        body = json.dumps(error_body(message, "request_too_large", 413)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, declared.decode())
            return
        # Read the whole body now (it is small by construction), so a chunked upload is bounded too.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, f"more than {self.max_bytes}")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class RequestIds:
    """Give every request an id (the caller's ``X-Request-Id`` when safe), answer it in ``X-Request-Id``, and turn
    an exception nothing else handled into a generic 500 that names the id; the details go to the log only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(_REQUEST_ID_KEY)
        rid = new_request_id(given.decode("latin-1") if given is not None else None)
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                if not any(k.lower() == _REQUEST_ID_KEY for k, _ in headers):
                    headers.append((_REQUEST_ID_KEY, rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s: unhandled error on %s %s", rid, scope.get("method"), scope.get("path"))
            if started:  # part of the answer is out (a stream): nothing sensible to add, let the server close it
                raise
            await ErrorResponse(_internal_error(rid), 500, {REQUEST_ID_HEADER: rid})(scope, receive, send)


_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode()


def _internal_error(rid: str) -> dict[str, Any]:
    return error_body(f"internal error; request id {rid}", "server_error", 500, request_id=rid)


_FIELD = re.compile(r"^(\w+|\d+)$")


def _describe_validation(errors: list[dict[str, Any]]) -> str:
    parts: list[str] = []
    for error in errors[:5]:
        # Union members show up in loc as type descriptions ("list[str]"): keep only field names and indexes.
        loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body" and _FIELD.match(str(p))) or "body"
        msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if error.get("type") != "missing" and "input" in error:
            shown = json.dumps(error["input"], default=str)
            msg += f" (got {shown[:80] + '...' if len(shown) > 80 else shown})"
        if f"{loc}: {msg}" not in parts:
            parts.append(f"{loc}: {msg}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> ErrorResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return ErrorResponse(error_body(exc.message, exc.error_type, exc.status_code), exc.status_code, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> ErrorResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            message = "request body is not valid JSON: " + "; ".join(
                f"{e.get('ctx', {}).get('error', e.get('msg'))} at position {e.get('loc', ('', '?'))[-1]}"
                for e in errors
            )
            return ErrorResponse(error_body(message, "invalid_request_error", 400), 400)
        detail = jsonable_encoder(errors, custom_encoder={Exception: str})
        body = error_body(_describe_validation(errors), "invalid_request_error", 422)
        return ErrorResponse({**body, "detail": detail}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> ErrorResponse:
        return ErrorResponse(error_body(str(exc.detail), "http_error", exc.status_code), exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> ErrorResponse:
        # Reached only by errors outside RequestIds (which answers the same); never echo the exception.
        rid = request_id(request)
        log.error("request %s: unhandled error on %s", rid, request.url.path, exc_info=exc)
        return ErrorResponse(_internal_error(rid), 500, {REQUEST_ID_HEADER: rid})


def _open_request_log(config: ServerConfig, telemetry: Telemetry) -> tuple[RequestLogWriter | None, Path | None]:
    """The request-log writer (``None`` when off), with its shipper when a ship URI is set, and the temporary
    folder it writes to when the config names none (a cloud container: the log only passes through)."""
    folder, temporary = config.request_log, None
    if folder is None and config.request_log_ship_uri:
        folder = temporary = Path(tempfile.mkdtemp(prefix="llmops-request-log-"))
    if folder is None:
        return None, None
    shipper = None
    if config.request_log_ship_uri:
        folder.mkdir(parents=True, exist_ok=True)
        shipper = RequestLogShipper(folder, config.request_log_ship_uri)
        log.info("request log: %s, shipped to %s as %s", folder, shipper.uri, shipper.server)
    writer = RequestLogWriter(
        folder,
        max_bytes=config.request_log_max_bytes,
        max_age_s=config.request_log_max_age_s,
        retention_s=config.request_log_retention_s,
        max_total_bytes=config.request_log_max_total_bytes,
        on_drop=telemetry.log_dropped.inc,
        shipper=shipper,
    )
    return writer, temporary


def _close_request_log(writer: RequestLogWriter, temporary: Path | None) -> None:
    writer.close()  # and ships the last file
    if temporary is None or writer.shipper is None:
        return
    left = writer.shipper.pending()
    if left:
        log.error("request log: %d file(s) not shipped to %s are left in %s", len(left), writer.shipper.uri, temporary)
    else:
        shutil.rmtree(temporary, ignore_errors=True)


def create_app(config: ServerConfig) -> FastAPI:
    """The server for ``config``; variants start loading when the app starts (``/readyz`` says when done)."""
    config = config.with_env_defaults()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.torch_threads is not None:
            import torch

            torch.set_num_threads(config.torch_threads)
        if config.backend == "vllm":  # causal-LM folders load through vLLM (refused here without CUDA/vllm)
            from airflow_llmops.serving.vllm_backend import install

            install()
        telemetry = Telemetry(retention_s=config.metrics_retention_s)
        writer, temporary = _open_request_log(config, telemetry)
        registry = VariantRegistry(config, telemetry)
        gateway = Gateway(registry, telemetry, writer, shadow_max_pending=config.shadow_max_pending)
        app.state.llmops = ServerState(config, telemetry, registry, gateway, writer)
        await registry.start()
        # The socket is not served until startup ends: connections wait in the listen backlog meanwhile.
        if config.wait_for_models_s > 0 and not await registry.wait_loaded(config.wait_for_models_s):
            log.warning("variants still loading after %.0f s; serving anyway", config.wait_for_models_s)
        try:
            yield
        finally:
            await gateway.close()
            await registry.close()
            if writer is not None:
                _close_request_log(writer, temporary)

    app = FastAPI(
        title="airflow-llmops model server",
        version=__version__,
        description="Variants of a model behind one endpoint: weighted traffic split, shadow copies, dynamic "
        "batching, request log, Prometheus metrics and an admin API.",
        lifespan=lifespan,
    )
    _install_error_handlers(app)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is up (it may still be loading models)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "a variant with traffic is not loaded"}})
    async def readyz(request: Request) -> JSONResponse:
        """Ready when every non-shadow variant with weight > 0 is loaded."""
        state: ServerState = request.app.state.llmops
        ready, variants = state.registry.readiness()
        return JSONResponse({"ready": ready, "variants": variants}, 200 if ready else 503)

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus text format: per-variant requests, errors, latency histogram, tokens, batch sizes."""
        state: ServerState = request.app.state.llmops
        return Response(generate_latest(state.telemetry.registry), media_type=CONTENT_TYPE_LATEST)

    # Vertex AI's routes first: the paths it gives are the ones its calls must reach.
    app.include_router(api_inference.vertex_router(config.health_route, config.predict_route))
    app.include_router(api_inference.router)
    app.include_router(api_inference.sagemaker_router)
    app.include_router(api_admin.router)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestIds)  # added last: outermost, so 413s and every error carry the id too
    return app
