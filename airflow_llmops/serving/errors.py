"""Errors the server turns into HTTP answers: each carries its status code and a message a caller can act on."""

from __future__ import annotations


class ServingError(Exception):
    """A request the server refuses or cannot answer; rendered as ``{"error": {"message", "type"}}``."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, status_code: int | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        if error_type is not None:
            self.error_type = error_type


class BadRequest(ServingError):
    status_code = 400
    error_type = "invalid_request_error"


class NotFound(ServingError):
    status_code = 404
    error_type = "not_found_error"


class Conflict(ServingError):
    status_code = 409
    error_type = "conflict_error"


class Unavailable(ServingError):
    """No variant can take the request now (still loading, or none has traffic)."""

    status_code = 503
    error_type = "unavailable_error"


class InjectedFault(ServingError):
    """A failure the variant's ``fault`` option asked for (failure injection for tests)."""

    status_code = 500
    error_type = "injected_fault"


class ModelLoadError(ServingError):
    """A variant's model source cannot be found or loaded."""

    status_code = 422
    error_type = "model_load_error"


class FaultInjectionDisabled(NotFound):
    """A request asked for failure injection on a server started without ``--enable-fault-injection``: the
    feature does not exist there (404), so a production server cannot be broken through its admin API."""

    def __init__(self) -> None:
        super().__init__(
            "failure injection is disabled on this server: it is a test feature, available only when the server "
            "is started with --enable-fault-injection (or LLMOPS_ENABLE_FAULT_INJECTION=1)"
        )


class InternalError(ServingError):
    """An unexpected failure: the caller gets this generic message and the request id; the details are logged."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, rid: str) -> None:
        super().__init__(f"internal error; request id {rid}")
        self.request_id = rid
