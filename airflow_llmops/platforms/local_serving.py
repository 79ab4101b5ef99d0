"""The local platform's deployment half: an endpoint is an ``airflow-llmops serve`` process on loopback.

An endpoint lives in ``<endpoints_root>/<endpoint_name>/``: ``server.json`` (pid, port, URL), the server's
``state.json`` (variants and weights, so a restarted server comes back the same), ``rollout.json`` (the
rollout in progress or the last one: see :class:`~airflow_llmops.platforms.base.RolloutRecord`), ``requests/``
(the request log the drift stage reads), ``server.log`` and ``admin-token`` (mode 0600; the admin API's bearer
token, which never goes to XCom, a log or a command line). The server is started in its own session: it keeps
serving after the task that started it has ended, which is the point of an endpoint.

Every file an endpoint needs is in its folder, so Airflow components on different hosts or containers can share
an endpoint when ``endpoints_root`` is a volume they all mount and the server binds an address they can reach
(``host="0.0.0.0"`` with ``advertise_host`` set to this machine's name).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from airflow_llmops.jsonfiles import read_json_object, write_json_atomic
from airflow_llmops.platforms.base import (
    DeploymentError,
    EndpointChangedError,
    EndpointHandle,
    PlatformCapabilities,
    RolloutRecord,
    VariantMetrics,
    validate_endpoint_name,
    validate_weights,
)
from airflow_llmops.processes import ManagedProcess, ProcessRecord, child_env, free_port, http_ok, tail
from airflow_llmops.specs import RolloutPlan

__all__ = ["DeploymentError", "LocalEndpoints"]
ROLLOUT_FILE = "rollout.json"


class LocalEndpoints:
    """Deployment half of the platform protocol on this machine.

    :param endpoints_root: folder of the endpoints' folders.
    :param env: extra environment of the server (e.g. ``MLFLOW_TRACKING_URI`` for ``models:/`` sources).
    :param port: port of a new endpoint's server (default: a free one; an existing endpoint keeps its port).
    :param host: address the server binds (``0.0.0.0`` where other hosts or containers must reach it).
    :param advertise_host: host name in the endpoint's URL when ``host`` is a wildcard address.
    :param test_faults: start the server with its failure-injection admin route (tests only).
    :param redact_output_pii: start the server with ``--redact-output-pii``: personal data in generated text is
        replaced with placeholders (an endpoint whose server already runs keeps the setting it started with).
    """

    name = "local"
    capabilities = PlatformCapabilities(traffic_split=True, shadow=True, native_guarded_deployment=False)

    def __init__(
        self,
        endpoints_root: str | Path,
        *,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        python: str | None = None,
        test_faults: bool = False,
        redact_output_pii: bool = False,
    ) -> None:
        self.endpoints_root = Path(str(endpoints_root).removeprefix("file://"))
        self.env = dict(env or {})
        self.port = port
        self.host = host
        self.advertise_host = advertise_host
        self.python = python or sys.executable
        self.test_faults = test_faults
        self.redact_output_pii = redact_output_pii

    # -- the server process -----------------------------------------------------------------------------------
    def endpoint_dir(self, endpoint_name: str) -> Path:
        try:
            return self.endpoints_root / validate_endpoint_name(endpoint_name)
        except ValueError as err:
            raise DeploymentError(str(err)) from None

    def admin_token(self, endpoint_name: str) -> str:
        path = self.endpoint_dir(endpoint_name) / "admin-token"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(32))
        return path.read_text().strip()

    def _server_record(self, endpoint_name: str) -> dict[str, Any] | None:
        return read_json_object(self.endpoint_dir(endpoint_name) / "server.json")

    def ensure_server(self, endpoint_name: str, *, timeout: float = 120.0) -> EndpointHandle:
        """The endpoint's running server, started if it is not up."""
        folder = self.endpoint_dir(endpoint_name)
        record = self._server_record(endpoint_name)
        if record and http_ok(f"{record['url']}/healthz"):
            return self._handle(endpoint_name, record)
        running = ProcessRecord.read(folder / "server.json")
        if record and running is not None and running.alive():
            # The supervisor is up and its server restarting (loading models): wait for it, never start a second.
            if _wait_healthy(str(record["url"]), running.alive, timeout):
                return self._handle(endpoint_name, record)
            if running.alive():
                raise DeploymentError(
                    f"endpoint {endpoint_name}: its server (pid {running.pid}) did not answer within {timeout:g}s; "
                    f"log:\n{tail(folder / 'server.log')}"
                )
        folder.mkdir(parents=True, exist_ok=True)
        port = int(record["port"]) if record and not self.port else (self.port or free_port())
        if self.host in ("0.0.0.0", "::") and not self.advertise_host:
            raise DeploymentError(
                f"endpoint {endpoint_name}: the server binds {self.host}, so set advertise_host (this machine's "
                "name as the other Airflow components reach it) for the endpoint's URL"
            )
        url = f"http://{self.advertise_host or self.host}:{port}"
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
            # A supervisor holds the socket and restarts a crashed server on it (old weights first, from the state
            # file), as systemd or Kubernetes would: requests wait in the backlog instead of failing.
            "--supervise",
        ]
        if self.test_faults:
            argv.append("--enable-fault-injection")
        if self.redact_output_pii:  # personal data in generated text replaced before it leaves the server
            argv.append("--redact-output-pii")
        # Only what the server needs: never the worker's Airflow secrets (Fernet key, database URL, connections).
        env = child_env({**self.env, "LLMOPS_ADMIN_TOKEN": self.admin_token(endpoint_name), "PYTHONUNBUFFERED": "1"})
        process = ManagedProcess(f"endpoint {endpoint_name}", argv, folder / "server.log", env=env).start()
        assert process.record is not None
        process.record.write(folder / "server.json", port=port, url=url)
        if not _wait_healthy(url, process.alive, timeout):
            raise DeploymentError(
                f"endpoint {endpoint_name}: the server did not come up; log:\n{tail(folder / 'server.log')}"
            )
        return self._handle(endpoint_name, {"url": url})

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
        record = ProcessRecord.read(self.endpoint_dir(endpoint_name) / "server.json")
        if record is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                record.stop()

    # -- protocol ---------------------------------------------------------------------------------------------
    def deploy(self, endpoint_name: str, *, model_uri: str, variant: str, plan: RolloutPlan) -> EndpointHandle:
        """Load ``model_uri`` as ``variant`` next to what is serving, taking no traffic yet (a shadow gets its
        mirrored share). The first model of an endpoint takes all traffic at once: there is nothing to protect.
        Deploying a variant the endpoint already has (a retry) reuses it, and the split before the rollout comes
        from the endpoint's rollout record when one is in progress for this variant."""
        handle = self.ensure_server(endpoint_name)
        from airflow_llmops.serving.client import ServingClientError

        record = self.get_rollout_record(endpoint_name)
        with self.client(handle) as client:
            variants = {v["name"]: v for v in client.variants()}
            serving = {n: float(v["weight"]) for n, v in variants.items() if not v["shadow"] and v["weight"] > 0}
            serving.pop(variant, None)
            if record and record.in_progress and record.variant == variant:
                serving = dict(record.previous)
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
        record_ = self._server_record(endpoint_name) or {"url": handle.url}
        return self._handle(endpoint_name, record_, variant=variant, previous=serving, model_uri=model_uri)

    def _call(self, handle: EndpointHandle, what: str, fn: Any) -> Any:
        """Run ``fn(client)`` against the endpoint's server (started again from its state file if it is down),
        turning the server's refusals into :class:`DeploymentError`."""
        from airflow_llmops.serving.client import ServingClientError

        live = self.ensure_server(handle.endpoint_name)
        try:
            with self.client(live) as client:
                return fn(client)
        except ServingClientError as err:
            raise DeploymentError(f"endpoint {handle.endpoint_name}: {what}: {err}") from None

    def set_traffic(self, handle: EndpointHandle, weights: Mapping[str, float]) -> None:
        wanted = validate_weights(weights)
        self._call(handle, f"set traffic {wanted}", lambda client: client.set_weights(wanted))

    def get_traffic(self, handle: EndpointHandle) -> dict[str, float]:
        variants = self._call(handle, "read traffic", lambda client: client.variants())
        return {str(v["name"]): float(v["weight"]) for v in variants if not v["shadow"]}

    def read_metrics(
        self, handle: EndpointHandle, *, variants: list[str], since: float | None = None
    ) -> list[VariantMetrics]:
        """Read-only (the triggerer calls it): a server that is down raises instead of being started here, and a
        server that started after ``since`` raises :class:`EndpointChangedError` (its numbers begin later)."""
        from airflow_llmops.serving.client import ServingClientError

        record = self._server_record(handle.endpoint_name) or {}
        url = str(record.get("url") or handle.url)
        try:
            with self.client(EndpointHandle(self.name, handle.endpoint_name, url=url)) as client:
                snapshot = client.metrics_snapshot(since)
                started = _server_started_at(client, record)
        except ServingClientError as err:
            raise DeploymentError(f"endpoint {handle.endpoint_name}: cannot read metrics: {err}") from None
        if since is not None and started is not None and started > since:
            raise EndpointChangedError(
                f"endpoint {handle.endpoint_name}: the server restarted at {time.ctime(started)}, after this step "
                f"began ({time.ctime(since)}); it came back with the weights from before the rollout"
            )
        numbers = snapshot.get("variants") or {}
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

    def rollback(self, handle: EndpointHandle, *, failed_variant: str, previous: Mapping[str, float]) -> None:
        """The previous variants get exactly their weights back first, then the failed one is removed."""
        restore = {str(k): float(v) for k, v in previous.items()}

        def act(client: Any) -> None:
            if not restore:  # nothing served before: removing the only version would leave nothing serving
                return
            loaded = failed_variant in {v["name"] for v in client.variants()}
            client.set_weights({**restore, **({failed_variant: 0.0} if loaded else {})})
            if loaded:
                client.remove_variant(failed_variant, force=True)

        self._call(handle, f"roll back {failed_variant}", act)

    def finish(self, handle: EndpointHandle, *, new_variant: str, keep_new: bool = True) -> None:
        """After a successful rollout: the new variant takes everything and the old ones are unloaded (a shadow
        rollout instead removes the shadow, the serving variants stay)."""

        def act(client: Any) -> None:
            variants = {v["name"]: v for v in client.variants()}
            if not keep_new:
                if new_variant in variants:
                    client.remove_variant(new_variant, force=True)
                return
            old = [n for n, v in variants.items() if n != new_variant and not v["shadow"]]
            client.set_weights({new_variant: 100.0, **dict.fromkeys(old, 0.0)})
            for name in old:
                client.remove_variant(name, force=True)

        self._call(handle, f"promote {new_variant}", act)

    def describe_endpoint(self, handle: EndpointHandle) -> dict[str, Any]:
        variants = self._call(handle, "describe", lambda client: client.variants())
        record = self.get_rollout_record(handle.endpoint_name)
        server = self._server_record(handle.endpoint_name) or {}
        return {
            "url": server.get("url") or handle.url,
            "variants": variants,
            "weights": {str(v["name"]): float(v["weight"]) for v in variants if not v["shadow"]},
            "server": self._server_record(handle.endpoint_name),
            "rollout": record.to_dict() if record else None,
        }

    # -- the rollout record --------------------------------------------------------------------------------------
    def get_rollout_record(self, endpoint_name: str) -> RolloutRecord | None:
        data = read_json_object(self.endpoint_dir(endpoint_name) / ROLLOUT_FILE)
        return RolloutRecord.from_dict(data) if data else None

    def put_rollout_record(self, endpoint_name: str, record: RolloutRecord) -> None:
        """Save the record; while a rollout is in progress the server also keeps its weights from before the
        rollout as the ones to come back with after a crash ("old weights first")."""
        record.updated_at = time.time()
        write_json_atomic(self.endpoint_dir(endpoint_name) / ROLLOUT_FILE, record.to_dict())
        self._sync_fallback(endpoint_name, record)

    def _sync_fallback(self, endpoint_name: str, record: RolloutRecord) -> None:
        server = self._server_record(endpoint_name)
        if not server or not http_ok(f"{server['url']}/healthz"):
            return
        handle = EndpointHandle(self.name, endpoint_name, url=str(server["url"]))
        with self.client(handle) as client:
            if record.in_progress and record.previous:
                # The new variant at 0 when the server has it (weights are relative: others keep theirs).
                loaded = {v["name"] for v in client.variants()}
                extra = {record.variant: 0.0} if record.variant in loaded else {}
                client.set_fallback({**record.previous, **extra})
            else:
                client.clear_fallback()


def _wait_healthy(url: str, alive: Callable[[], bool], timeout: float) -> bool:
    """Poll ``url``'s health until it answers (True), or its process dies or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not http_ok(f"{url}/healthz"):
        if not alive() or time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return True


def _server_started_at(client: Any, record: Mapping[str, Any]) -> float | None:
    """When the serving process started (it changes when a supervisor restarts it)."""
    value = client.server_info().get("started_at")
    if value is None:
        value = record.get("started_at")
    return float(value) if value is not None else None
