"""``ServingClient``: the admin API of the model server from Python (what the Airflow operators use).

Needs only ``httpx``. Errors raise :class:`ServingClientError` with the server's message and status code.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx


class ServingClientError(RuntimeError):
    """The server refused or failed a call; ``status_code`` is its HTTP status (``None`` when unreachable)."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ServingClient:
    """Talks to one model server.

    :param base_url: e.g. ``http://127.0.0.1:8080``.
    :param admin_token: bearer token of ``/admin/*``.
    :param api_key: bearer token of ``/v1/*`` when the server requires one.
    :param timeout: seconds per call; adding a variant waits for its model to load, so give it room.
    """

    def __init__(
        self,
        base_url: str,
        admin_token: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.admin_token = admin_token
        self.api_key = api_key
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, *, token: str | None, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", None) or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            response = self._http.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as err:
            raise ServingClientError(f"{method} {self.base_url}{path} failed: {type(err).__name__}: {err}") from err
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise ServingClientError(
                f"{method} {path} → HTTP {response.status_code}: {message}", status_code=response.status_code
            )
        return response.json()

    def _admin(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._call(method, f"/admin{path}", token=self.admin_token, **kwargs)

    # ---- admin -----------------------------------------------------------------------------------------------
    def variants(self) -> list[dict[str, Any]]:
        """Each variant: name, source, weight, traffic_percent, shadow, mirror_percent, status, kind, error, fault."""
        return list(self._admin("GET", "/variants")["variants"])

    def variant(self, name: str) -> dict[str, Any]:
        return dict(self._admin("GET", f"/variants/{name}"))

    def add_variant(
        self,
        name: str,
        source: str,
        *,
        weight: float = 0.0,
        shadow: bool = False,
        mirror_percent: float = 100.0,
        fault: Mapping[str, float] | None = None,
        max_batch_size: int | None = None,
        max_batch_delay_ms: float | None = None,
        redact_output_pii: bool | None = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Add a variant; with ``wait`` it returns once the model is loaded (raises with the load error otherwise).

        ``fault`` (``{"error_rate": 0.5, "extra_latency_ms": 200}``) is failure injection, for tests only.
        ``redact_output_pii``: redact personal data in its generated text (None: the server's setting).
        """
        payload: dict[str, Any] = {
            "name": name,
            "source": source,
            "weight": weight,
            "shadow": shadow,
            "mirror_percent": mirror_percent,
            "wait": wait,
        }
        optional = {
            "fault": fault,
            "max_batch_size": max_batch_size,
            "max_batch_delay_ms": max_batch_delay_ms,
            "redact_output_pii": redact_output_pii,
        }
        payload.update({k: v for k, v in optional.items() if v is not None})
        return dict(self._admin("POST", "/variants", json=payload))

    def update_variant(self, name: str, **changes: Any) -> dict[str, Any]:
        """Change ``weight``, ``shadow``, ``mirror_percent``, ``fault`` or ``clear_fault`` of one variant."""
        return dict(self._admin("PATCH", f"/variants/{name}", json=changes))

    def remove_variant(self, name: str, *, force: bool = False) -> None:
        self._admin("DELETE", f"/variants/{name}", params={"force": "true"} if force else None)

    def set_weights(
        self, weights: Mapping[str, float], fallback: Mapping[str, float] | None = None
    ) -> list[dict[str, Any]]:
        """Relative weights of the named variants (others keep theirs); returns every variant afterwards.

        ``fallback`` also records, in the same call, the weights the server starts with if it restarts before the
        next change (a rollout step passes its last safe weights); ``None`` leaves the recorded fallback as it is.
        """
        payload: dict[str, Any] = {"weights": dict(weights)}
        if fallback is not None:
            payload["fallback"] = dict(fallback)
        return list(self._admin("PUT", "/weights", json=payload)["variants"])

    def set_fallback(self, weights: Mapping[str, float]) -> dict[str, Any]:
        """Record the weights a restarted server starts with ("old weights first"); returns :meth:`server_info`."""
        return dict(self._admin("PUT", "/fallback", json={"weights": dict(weights)}))

    def clear_fallback(self) -> dict[str, Any]:
        """Forget the fallback weights (the rollout ended); returns :meth:`server_info`."""
        return dict(self._admin("DELETE", "/fallback"))

    def server_info(self) -> dict[str, Any]:
        """``boot_count`` and ``started_at`` (another value than before: the server restarted), ``pid``,
        ``supervisor_restarts``, ``fallback`` (``{"weights", "set_at"}`` or ``None``), ``fallback_applied_at``
        (this boot started on the fallback weights) and the current ``weights``."""
        return dict(self._admin("GET", "/state"))

    def metrics(self, since: float | None = None, *, window_s: float | None = None) -> dict[str, dict[str, Any]]:
        """Per variant: requests, errors, error_rate, p50_latency_ms, p95_latency_ms, tokens since ``since``."""
        return dict(self.metrics_snapshot(since, window_s=window_s)["variants"])

    def metrics_snapshot(self, since: float | None = None, *, window_s: float | None = None) -> dict[str, Any]:
        """The whole snapshot: ``variants`` (as :meth:`metrics`), ``process`` (the server's CPU seconds since
        ``since``), ``now`` and ``since``."""
        params: dict[str, float] = {}
        if since is not None:
            params["since"] = since
        if window_s is not None:
            params["window_s"] = window_s
        return dict(self._admin("GET", "/metrics", params=params))

    # ---- health and inference --------------------------------------------------------------------------------
    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        """Block until ``/readyz`` answers 200; raise after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise ServingClientError(f"{self.base_url} not ready after {timeout:g} s (GET /readyz)")
            time.sleep(interval)

    def classify(self, inputs: str | list[str], *, variant: str | None = None) -> dict[str, Any]:
        headers = {"X-LLMOps-Variant": variant} if variant else None
        return dict(self._call("POST", "/v1/classify", token=self.api_key, json={"inputs": inputs}, headers=headers))
