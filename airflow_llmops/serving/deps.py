"""What every route needs: the server's state, the caller's request id, and the two bearer-token checks."""

from __future__ import annotations

import re
import secrets
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from airflow_llmops.serving.config import ServerConfig
from airflow_llmops.serving.errors import ServingError
from airflow_llmops.serving.gateway import Gateway
from airflow_llmops.serving.request_log import RequestLogWriter
from airflow_llmops.serving.telemetry import Telemetry
from airflow_llmops.serving.variants import VariantRegistry

VARIANT_HEADER = "X-LLMOps-Variant"
REQUEST_ID_HEADER = "X-Request-Id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
bearer = HTTPBearer(auto_error=False)


@dataclass
class ServerState:
    config: ServerConfig
    telemetry: Telemetry
    registry: VariantRegistry
    gateway: Gateway
    request_log: RequestLogWriter | None
    started_at: float = field(default_factory=time.time)


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.llmops
    return state


def new_request_id(given: str | None) -> str:
    """The caller's ``X-Request-Id`` when it is a safe token, else a fresh one."""
    return given if given and _SAFE_ID.match(given) else uuid.uuid4().hex


def request_id(request: Request) -> str:
    """The id the ``RequestIds`` middleware gave this request (echoed in ``X-Request-Id`` and in error bodies)."""
    rid = getattr(request.state, "request_id", None)
    return rid if isinstance(rid, str) else new_request_id(request.headers.get(REQUEST_ID_HEADER))


class Unauthorized(ServingError):
    status_code = 401
    error_type = "authentication_error"


class Forbidden(ServingError):
    status_code = 403
    error_type = "permission_error"


def _token(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    if credentials is not None:
        return credentials.credentials
    return request.headers.get("x-api-key")


def check_api_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    expected = server_state(request).config.api_key
    if expected is None:
        return
    given = _token(request, credentials)
    if given is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' (the server runs with --api-key)")
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("invalid API key")


def check_admin(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    expected = server_state(request).config.admin_token
    if expected is None:
        raise Forbidden("the admin API is disabled: start the server with --admin-token or LLMOPS_ADMIN_TOKEN")
    if credentials is None:
        raise Unauthorized("missing admin token: send 'Authorization: Bearer <admin token>'")
    if not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise Forbidden("wrong admin token")
