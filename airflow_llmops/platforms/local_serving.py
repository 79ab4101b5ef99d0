"""The local platform's deployment half: an endpoint is an ``airflow-llmops serve`` process on loopback.

An endpoint lives in ``<endpoints_root>/<endpoint_name>/``: ``server.json`` (pid, port, URL), the server's
``state.json`` (variants and weights, so a restarted server comes back the same), ``requests/`` (the request log
the drift stage reads), ``server.log`` and ``admin-token`` (mode 0600; the admin API's bearer token, which never
goes to XCom or a log). The server is started in its own session: it keeps serving after the task that started
it has ended, which is the point of an endpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airflow_llmops.platforms.base import EndpointHandle, VariantMetrics
from airflow_llmops.processes import ManagedProcess, free_port, http_ok, tail
from airflow_llmops.specs import RolloutPlan


class DeploymentError(RuntimeError):
    """The endpoint could not be started or changed; the message says what the server answered."""


class LocalEndpoints:
    """Deployment half of the platform protocol on this machine.

    :param endpoints_root: folder of the endpoints' folders.
    :param env: extra environment of the server (e.g. ``MLFLOW_TRACKING_URI`` for ``models:/`` sources).
    :param port: port of a new endpoint's server (default: a free one; an existing endpoint keeps its port).
    """

    name = "local"

    def __init__(
        self,
        endpoints_root: str | Path,
        *,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        python: str | None = None,
    ) -> None:
        self.endpoints_root = Path(str(endpoints_root).removeprefix("file://"))
        self.env = dict(env or {})
        self.port = port
        self.host = host
        self.python = python or sys.executable

    # -- the server process -----------------------------------------------------------------------------------
    def endpoint_dir(self, endpoint_name: str) -> Path:
        return self.endpoints_root / endpoint_name

    def admin_token(self, endpoint_name: str) -> str:
        path = self.endpoint_dir(endpoint_name) / "admin-token"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(32))
        return path.read_text().strip()

    def _server_record(self, endpoint_name: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.endpoint_dir(endpoint_name) / "server.json").read_text()))
        except (OSError, ValueError):
            return None

    def ensure_server(self, endpoint_name: str, *, timeout: float = 120.0) -> EndpointHandle:
        """The endpoint's running server, started if it is not up."""
        folder = self.endpoint_dir(endpoint_name)
        record = self._server_record(endpoint_name)
        if record and http_ok(f"{record['url']}/healthz"):
            return self._handle(endpoint_name, record)
        folder.mkdir(parents=True, exist_ok=True)
        port = int(record["port"]) if record and not self.port else (self.port or free_port())
        url = f"http://{self.host}:{port}"
        argv = [
            self.python,
            "-m",
            "airflow_llmops.cli",
            "serve",
            "--host",
            self.host,
            "--port",
            str(port),
            "--state-file",
            str(folder / "state.json"),
            "--request-log",
            str(folder / "requests"),
            "--model-cache",
            str(folder / "models"),
        ]
        env = {**os.environ, **self.env, "LLMOPS_ADMIN_TOKEN": self.admin_token(endpoint_name), "PYTHONUNBUFFERED": "1"}
        process = ManagedProcess(f"endpoint {endpoint_name}", argv, folder / "server.log", env=env).start()
        record = {"pid": process.pid, "port": port, "url": url, "started_at": time.time()}
        (folder / "server.json").write_text(json.dumps(record))
        deadline = time.monotonic() + timeout
        while not http_ok(f"{url}/healthz"):
            if not process.alive() or time.monotonic() > deadline:
                raise DeploymentError(
                    f"endpoint {endpoint_name}: the server did not come up; log:\n{tail(folder / 'server.log')}"
                )
            time.sleep(0.3)
        return self._handle(endpoint_name, record)

    def _handle(self, endpoint_name: str, record: Mapping[str, Any], **extra: Any) -> EndpointHandle:
        return EndpointHandle(
            platform=self.name,
            endpoint_name=endpoint_name,
            url=str(record["url"]),
            extra={"endpoint_dir": str(self.endpoint_dir(endpoint_name)), **extra},
        )

    def client(self, handle: EndpointHandle) -> Any:
        from airflow_llmops.serving.client import ServingClient

        assert handle.url is not None
        return ServingClient(handle.url, self.admin_token(handle.endpoint_name), timeout=600)

    def stop_server(self, endpoint_name: str) -> None:
        from airflow_llmops.processes import stop_process_group

        record = self._server_record(endpoint_name)
        if record:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                stop_process_group(int(record["pid"]))

    # -- protocol ---------------------------------------------------------------------------------------------
    def deploy(self, endpoint_name: str, *, model_uri: str, variant: str, plan: RolloutPlan) -> EndpointHandle:
        """Load ``model_uri`` as ``variant`` next to what is serving, taking no traffic yet (a shadow gets its
        mirrored share). The first model of an endpoint takes all traffic at once: there is nothing to protect.
        Deploying a variant the endpoint already has (a retry) reuses it."""
        handle = self.ensure_server(endpoint_name)
        from airflow_llmops.serving.client import ServingClientError

        with self.client(handle) as client:
            variants = {v["name"]: v for v in client.variants()}
            serving = {n: float(v["weight"]) for n, v in variants.items() if not v["shadow"] and v["weight"] > 0}
            serving.pop(variant, None)
            try:
                if variant in variants:
                    pass
                elif not serving:
                    client.add_variant(variant, model_uri, weight=100.0)
                elif plan.strategy == "shadow":
                    client.add_variant(variant, model_uri, weight=0.0, shadow=True, mirror_percent=plan.shadow_percent)
                else:
                    client.add_variant(variant, model_uri, weight=0.0)
            except ServingClientError as err:
                raise DeploymentError(
                    f"endpoint {endpoint_name}: cannot load {model_uri} as {variant}: {err}"
                ) from None
        record = self._server_record(endpoint_name) or {"url": handle.url}
        return self._handle(endpoint_name, record, variant=variant, previous=serving, model_uri=model_uri)

    def set_traffic(self, handle: EndpointHandle, weights: Mapping[str, float]) -> None:
        with self.client(handle) as client:
            client.set_weights(dict(weights))

    def read_metrics(
        self, handle: EndpointHandle, *, variants: list[str], since: float | None = None
    ) -> list[VariantMetrics]:
        with self.client(handle) as client:
            numbers = client.metrics(since)
        out = []
        for name in variants:
            row = numbers.get(name) or {}
            out.append(
                VariantMetrics(
                    variant=name,
                    requests=int(row.get("requests", 0)),
                    errors=int(row.get("errors", 0)),
                    p50_latency_ms=row.get("p50_latency_ms"),
                    p95_latency_ms=row.get("p95_latency_ms"),
                    window_seconds=row.get("window_seconds"),
                )
            )
        return out

    def rollback(self, handle: EndpointHandle, *, failed_variant: str) -> None:
        """The previous variants get their weights back first, then the failed one is removed."""
        previous = dict(handle.extra.get("previous") or {})
        with self.client(handle) as client:
            if previous:
                client.set_weights({**previous, failed_variant: 0.0})
            client.remove_variant(failed_variant, force=True)

    def finish(self, handle: EndpointHandle, *, new_variant: str, keep_new: bool = True) -> None:
        """After a successful rollout: the new variant takes everything and the old ones are unloaded (a shadow
        rollout instead removes the shadow, the serving variants stay)."""
        with self.client(handle) as client:
            if not keep_new:
                client.remove_variant(new_variant, force=True)
                return
            client.set_weights({new_variant: 100.0, **dict.fromkeys(handle.extra.get("previous") or {}, 0.0)})
            for old in handle.extra.get("previous") or {}:
                client.remove_variant(old, force=True)

    def describe_endpoint(self, handle: EndpointHandle) -> dict[str, Any]:
        with self.client(handle) as client:
            return {
                "url": handle.url,
                "variants": client.variants(),
                "server": self._server_record(handle.endpoint_name),
            }
